"""Bad input to the exporter: each case exits non-zero with `error: ...` naming the file and
what was expected, and leaves no manifest behind."""
import gzip
import json
import lzma

import pytest
import zstandard

from conftest import ROOT, load_module

ex = load_module("data/download_hf_docs_and_tokenize.py")
BYTE_SPEC = ROOT / "data" / "tokenizer_specs_byte260.json"


def run(capsys, tmp_path, docs, spec=BYTE_SPEC, *extra):
    code = ex.main(["--docs", str(docs), "--output-root", str(tmp_path / "out"),
                    "--tokenizer-config", str(spec), *extra])
    err = capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()
    return code, err


def jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def spec_file(tmp_path, entries):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"tokenizers": entries}))
    return path


def test_missing_docs_file(capsys, tmp_path):
    code, err = run(capsys, tmp_path, tmp_path / "nope.jsonl")
    assert code == 1 and err.startswith("error: ") and "nope.jsonl: docs file not found" in err


@pytest.mark.parametrize("suffix, compress", [
    ("xz", lzma.compress), ("gz", gzip.compress), ("zst", zstandard.ZstdCompressor().compress),
])
def test_truncated_compressed_file(capsys, tmp_path, suffix, compress):
    path = tmp_path / f"docs.jsonl.{suffix}"
    path.write_bytes(compress(b'{"text": "some words"}\n' * 1000)[:-20])
    code, err = run(capsys, tmp_path, path)
    assert code == 1 and str(path) in err and "cannot read documents" in err


def test_unreadable_docs_file(capsys, tmp_path, monkeypatch):
    path = jsonl(tmp_path / "docs.jsonl", ["a", "b"])

    def denied(file, *a, **k):  # what open() raises for a file without read permission
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *a, **k)
    monkeypatch.setattr(ex, "open", denied, raising=False)  # the exporter's plain-file opener
    code, err = run(capsys, tmp_path, path)
    assert code == 1 and str(path) in err and "Permission denied" in err


@pytest.mark.parametrize("line, expected", [
    ("not json", "line 2 (byte offset 17): cannot read documents"),
    ('{"body": "no text field"}', "line 2: expected a JSON object with a string 'text' field"),
])
def test_bad_jsonl_line_is_named(capsys, tmp_path, line, expected):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    code, err = run(capsys, tmp_path, path)
    assert code == 1 and f"{path} {expected}" in err


def test_non_utf8_text(capsys, tmp_path):
    path = tmp_path / "docs.txt"
    path.write_bytes(b"caf\xe9\n")
    code, err = run(capsys, tmp_path, path)
    assert code == 1 and str(path) in err and "utf-8" in err


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_corpus(capsys, tmp_path, content):
    path = tmp_path / "docs.txt"
    path.write_text(content)
    code, err = run(capsys, tmp_path, path)
    assert code == 1 and f"{path}: no documents found" in err


def test_fewer_documents_than_validation(capsys, tmp_path):
    path = jsonl(tmp_path / "docs.jsonl", ["a", "b", "c"])
    code, err = run(capsys, tmp_path, path, BYTE_SPEC, "--num-val-docs", "3")
    assert code == 1 and f"{path}: 3 documents, but the first 3 are validation" in err
    code, err = run(capsys, tmp_path, path)  # the default is 50,000
    assert code == 1 and "the first 50000 are validation" in err


@pytest.mark.parametrize("entries, expected", [
    ([{"name": "w", "kind": "wordpiece", "vocab_size": 1000}], "unknown kind 'wordpiece'"),
    ([{"name": "a", "kind": "byte", "vocab_size": 260},
      {"name": "a", "kind": "sentencepiece_bpe", "vocab_size": 1024}], "duplicate name a"),
    ([{"name": "a", "kind": "sentencepiece_bpe", "vocab_size": 1024, "dataset_suffix": "x"},
      {"name": "b", "kind": "sentencepiece_bpe", "vocab_size": 2048, "dataset_suffix": "x"}],
     "duplicate dataset_suffix x"),
    ([{"name": "big", "kind": "sentencepiece_bpe", "vocab_size": 70000}],
     "vocab_size 70000 does not fit uint16 shard ids (at most 65536)"),
    ([{"name": "b", "kind": "byte", "vocab_size": 256}], "a byte tokenizer has vocab_size 260"),
    ([], "expected a non-empty 'tokenizers' list"),
], ids=["unknown-kind", "duplicate-name", "duplicate-suffix", "vocab-over-uint16", "byte-vocab",
        "empty"])
def test_bad_tokenizer_spec(capsys, tmp_path, entries, expected):
    docs = jsonl(tmp_path / "docs.jsonl", ["a", "b"])
    spec = spec_file(tmp_path, entries)
    code, err = run(capsys, tmp_path, docs, spec, "--num-val-docs", "1")
    assert code == 1 and str(spec) in err and expected in err


def test_spec_that_is_not_json(capsys, tmp_path):
    docs = jsonl(tmp_path / "docs.jsonl", ["a", "b"])
    spec = tmp_path / "spec.json"
    spec.write_text("{tokenizers: oops")
    code, err = run(capsys, tmp_path, docs, spec, "--num-val-docs", "1")
    assert code == 1 and f"{spec}: cannot read JSON" in err


def test_bad_flag_returns_2_from_main(capsys, tmp_path):
    assert ex.main(["--output-root", str(tmp_path)]) == 2  # --tokenizer-config missing
    assert "--tokenizer-config" in capsys.readouterr().err


def test_sidecar_count_that_disagrees_with_the_file(capsys, tmp_path):
    path = jsonl(tmp_path / "docs.jsonl", ["a", "b", "c"])
    (tmp_path / "docs.meta.json").write_text(json.dumps({"docs_val": 1, "num_docs": 5}))
    code, err = run(capsys, tmp_path, path)
    assert code == 1 and f"{path}: read 3 documents, its sidecar says 5" in err


def test_non_utf8_line_is_named_by_its_own_line_and_byte_offset(capsys, tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [b'{"text": "one"}\n', b'{"text": "two"}\n', b'{"text": "three"}\n', b'{"text": "caf\xe9"}\n']
    path.write_bytes(b"".join(lines * 300))  # the bad line recurs; the first one is line 4
    code, err = run(capsys, tmp_path, path)
    offset = sum(len(x) for x in lines[:3]) + lines[3].index(b"\xe9")
    assert code == 1 and f"{path} line 4 (byte offset {offset}): cannot read documents" in err


def test_an_empty_validation_split_is_refused(capsys, tmp_path):
    code, err = run(capsys, tmp_path, jsonl(tmp_path / "docs.jsonl", ["a", "b", "c"]), BYTE_SPEC,
                    "--num-val-docs", "0")
    assert code == 1 and "--num-val-docs must be at least 1" in err


def test_an_output_root_that_is_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    code = ex.main(["--docs", str(jsonl(tmp_path / "docs.jsonl", ["a", "b"])), "--output-root",
                    str(tmp_path / "out"), "--tokenizer-config", str(BYTE_SPEC), "--num-val-docs", "1"])
    assert code == 1 and "exists and is not a directory" in capsys.readouterr().err
