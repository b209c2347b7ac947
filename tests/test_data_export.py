"""Exporter (SPEC 3.2-3.3): byte260 ids, the sample export for both tokenizers, the manifest,
and a SentencePiece that never trains on validation documents unless asked to."""
import gzip
import hashlib
import json
import lzma
import random

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

from conftest import ROOT, SAMPLE, export_docs, load_module, read_sample_docs

ex = load_module("data/download_hf_docs_and_tokenize.py")
BYTE_SPEC = ROOT / "data" / "tokenizer_specs_byte260.json"
SP_SPEC = ROOT / "data" / "tokenizer_specs_sp1024.json"


@pytest.fixture(scope="module")
def sample_docs():
    return read_sample_docs()


@pytest.fixture(scope="module")
def byte_export(tmp_path_factory):  # several shards per split
    return export_docs(SAMPLE, tmp_path_factory.mktemp("byte260"), "byte260", ("--shard-size", "200000"))


@pytest.fixture(scope="module")
def sp_export(tmp_path_factory):
    return export_docs(SAMPLE, tmp_path_factory.mktemp("sp1024"), "sp1024", ("--shard-size", "100000"))


def split_documents(stream: np.ndarray) -> list[np.ndarray]:
    starts = np.flatnonzero(stream == 1)
    return np.split(stream, starts[1:])


def shards(root, dataset, split):
    return sorted((root / "datasets" / dataset).glob(f"fineweb_{split}_*.bin"))


def test_byte260_ids_bos_prefix_and_count(tmp_path):
    docs = ["héllo wörld", "日本語 text", "", "plain ascii\nwith a newline", "emoji 🙂"]
    manifest = ex.export(docs, tmp_path, BYTE_SPEC, num_val_docs=2, progress=False)
    stream = np.concatenate([ex.read_shard(p) for split in ("val", "train")
                             for p in shards(tmp_path, "fineweb10B_byte260", split)])
    expected = []
    for doc in docs:
        expected += [1] + [b + 4 for b in doc.encode("utf-8")]
    assert stream.tolist() == expected
    assert len(stream) == sum(len(d.encode("utf-8")) for d in docs) + len(docs)
    assert ex.encode_byte260("é").tolist() == [0xC3 + 4, 0xA9 + 4]
    stats = manifest["datasets"][0]["stats"]
    assert (stats["docs_val"], stats["docs_train"]) == (2, 3)
    description = json.loads((tmp_path / "tokenizers" / "fineweb_pure_byte_260.json").read_text())
    assert (description["pad_id"], description["bos_id"], description["eos_id"],
            description["unk_id"], description["byte_offset"]) == (0, 1, 2, 3, 4)


def test_sample_byte260_val_is_the_first_documents(byte_export, sample_docs):
    val = np.concatenate([ex.read_shard(p) for p in shards(byte_export, "fineweb10B_byte260", "val")])
    texts = [bytes((doc[1:] - 4).astype(np.uint8)).decode("utf-8") for doc in split_documents(val)]
    assert texts == sample_docs[:7]  # the sidecar's docs_val, validation first
    train = np.concatenate([ex.read_shard(p) for p in shards(byte_export, "fineweb10B_byte260", "train")])
    assert int((train == 1).sum()) == len(sample_docs) - 7
    assert bytes((train[1:] - 4).astype(np.uint8)[:200]).decode() == sample_docs[7][:200]


@pytest.mark.parametrize("export_name", ["byte_export", "sp_export"])
def test_manifest_stats_match_the_files_on_disk(export_name, request):
    root = request.getfixturevalue(export_name)
    manifest = json.loads((root / "manifest.json").read_text())
    assert (manifest["num_docs"], manifest["num_val_docs"]) == (62, 7)
    (dataset,) = manifest["datasets"]
    (tokenizer,) = manifest["tokenizers"]
    assert dataset["tokenizer_name"] == tokenizer["name"] and dataset["bos_id"] == 1
    for key in ("model_path", "vocab_path", "path"):
        if key in tokenizer:
            assert (root / tokenizer[key]).is_file()
    # the digest of the file a trainer's TOKENIZER_PATH names, so a trainer can refuse another one
    named = root / (tokenizer.get("model_path") or tokenizer["path"])
    assert tokenizer["sha256"] == hashlib.sha256(named.read_bytes()).hexdigest()
    stats = dataset["stats"]
    for split in ("val", "train"):
        files = shards(root, dataset["name"], split)
        assert len(files) == stats[f"files_{split}"] > 0
        tokens = [ex.read_shard(p) for p in files]
        assert sum(map(len, tokens)) == stats[f"tokens_{split}"]
        assert int(sum((t == 1).sum() for t in tokens)) == stats[f"docs_{split}"]
        assert all(len(t) == manifest["shard_size"] for t in tokens[:-1])  # only the last is partial
    assert stats["bytes_val"] + stats["bytes_train"] == 2_143_019
    assert not list(root.rglob("*.tmp"))
    if export_name == "byte_export":
        assert stats["tokens_val"] + stats["tokens_train"] == 2_143_019 + 62


def test_sample_sp1024_val_tokens_and_training_split(sp_export, sample_docs):
    manifest = json.loads((sp_export / "manifest.json").read_text())
    training = manifest["tokenizers"][0]["training"]
    assert training["includes_val"] is False and training["docs"] == 55
    sp = spm.SentencePieceProcessor(model_file=str(sp_export / "tokenizers" / "fineweb_1024_bpe.model"))
    assert sp.vocab_size() == 1024
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    val = np.concatenate([ex.read_shard(p) for p in shards(sp_export, "fineweb10B_sp1024", "val")])
    expected = [tok for doc in sample_docs[:7] for tok in [1] + sp.encode(doc)]
    assert val.tolist() == expected
    assert sp.decode(sp.encode(sample_docs[0]))[:300] == sample_docs[0][:300]


def test_tokenizer_training_text_excludes_validation_unless_asked(sample_docs):
    probes = [doc[1000:1200] for doc in sample_docs[:7]]  # a passage from each val speech
    default = "\n".join(ex.tokenizer_training_lines(sample_docs, 7))
    assert not any(probe in default for probe in probes)
    assert sample_docs[7][1000:1200] in default
    included = "\n".join(ex.tokenizer_training_lines(sample_docs, 7, include_val=True))
    assert all(probe in included for probe in probes)


def tiny_corpus():
    """Training text over a few words that never use 'z' or 'q'; one validation document
    made of a word that is nothing but those letters."""
    rng = random.Random(0)
    words = "the of and to in is that for it as was with be by on not he this are".split()
    train = [" ".join(rng.choice(words) for _ in range(300)) for _ in range(30)]
    return [" ".join(["zqzqz"] * 300)] + train


@pytest.mark.parametrize("include_val", [False, True])
def test_sentencepiece_learns_a_val_only_word_only_when_val_is_included(tmp_path, include_val):
    spec = ex.TokenizerSpec("sp_tiny", "sentencepiece_bpe", 300, "sp300")
    ex.train_sentencepiece(ex.tokenizer_training_lines(tiny_corpus(), 1, include_val), spec, tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizers" / "fineweb_300_bpe.model"))
    pieces = {sp.id_to_piece(i) for i in range(sp.vocab_size())}
    assert ("z" in pieces or "zq" in pieces) == include_val


def test_sentencepiece_training_is_deterministic(tmp_path):
    spec = ex.TokenizerSpec("sp_tiny", "sentencepiece_bpe", 300, "sp300")
    models = []
    for run in range(2):
        ex.train_sentencepiece(ex.tokenizer_training_lines(tiny_corpus(), 1), spec, tmp_path / str(run))
        models.append((tmp_path / str(run) / "tokenizers" / "fineweb_300_bpe.model").read_bytes())
    assert models[0] == models[1]


def test_character_coverage_is_lowered_when_the_vocab_cannot_hold_the_characters(tmp_path):
    rng = random.Random(1)
    common = "abcdefghij"
    rare = [chr(0x4E00 + i) for i in range(120)]  # each seen once: about 1% of the characters
    text = " ".join("".join(rng.choice(common) for _ in range(4)) for _ in range(3000))
    docs = ["val", text + " " + " ".join(rare)]
    spec = ex.TokenizerSpec("sp_cov", "sentencepiece_bpe", 300, "sp300")
    result = ex.train_sentencepiece(ex.tokenizer_training_lines(docs, 1), spec, tmp_path)
    assert result["character_coverage"] < 0.999


def test_long_lines_are_cut_under_the_sentencepiece_limit():
    line = " ".join(["word"] * 3000)  # 14,999 bytes, one line
    pieces = list(ex.split_for_sentencepiece(line))
    assert "".join(pieces) == line and len(pieces) == 4
    assert all(len(p.encode()) <= ex.SP_MAX_SENTENCE_BYTES for p in pieces)
    assert all(p.startswith(" ") for p in pieces[1:])  # cut at spaces
    unbroken = "é" * 5000  # no space at all: cut between characters, never inside one
    pieces = list(ex.split_for_sentencepiece(unbroken, max_bytes=1001))
    assert "".join(pieces) == unbroken and all(len(p.encode()) <= 1001 for p in pieces)
    assert list(ex.split_for_sentencepiece("a\nb")) == ["a", "b"]


def test_second_tokenizer_export_keeps_the_first_in_the_manifest(tmp_path):
    docs = tiny_corpus()
    sp_spec = [ex.TokenizerSpec("sp_bpe_300", "sentencepiece_bpe", 300, "sp300")]
    ex.export(docs, tmp_path, BYTE_SPEC, num_val_docs=1, progress=False)
    manifest = ex.export(docs, tmp_path, sp_spec, num_val_docs=1, progress=False)
    assert [d["name"] for d in manifest["datasets"]] == ["fineweb10B_byte260", "fineweb10B_sp300"]
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert [t["name"] for t in on_disk["tokenizers"]] == ["pure_byte_260", "sp_bpe_300"]


@pytest.mark.parametrize("suffix", ["txt", "txt.gz", "txt.xz", "txt.zst", "jsonl.gz"])
def test_docs_file_formats_and_compression(tmp_path, suffix):
    docs = ["First document,\nits second line.", "Second — with ünïcode.", "Third."]
    if suffix.startswith("jsonl"):
        data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    else:
        data = ("\n\n\n".join(docs) + "\n").encode()
    def zstd_two_frames(data):
        half = len(data) // 2
        return b"".join(zstandard.ZstdCompressor().compress(part) for part in (data[:half], data[half:]))

    compress = {"gz": gzip.compress, "xz": lzma.compress,
                "zst": zstd_two_frames}.get(suffix.rsplit(".", 1)[-1])
    path = tmp_path / f"docs.{suffix}"
    path.write_bytes(compress(data) if compress else data)
    assert list(ex.DocumentFile(path)) == docs


def test_sidecar_sets_the_split_and_the_flag_overrides_it(tmp_path):
    docs = tmp_path / "corpus.jsonl"
    docs.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    (tmp_path / "corpus.meta.json").write_text(json.dumps({"docs_val": 3}))
    manifest = ex.export(docs, tmp_path / "a", BYTE_SPEC, progress=False)
    assert manifest["datasets"][0]["stats"]["docs_val"] == 3
    manifest = ex.export(docs, tmp_path / "b", BYTE_SPEC, num_val_docs=4, progress=False)
    assert manifest["datasets"][0]["stats"]["docs_val"] == 4


def test_vocab_file_matches_the_one_sentencepiece_writes(tmp_path):
    lines = list(ex.tokenizer_training_lines(tiny_corpus(), 1))
    spec = ex.TokenizerSpec("sp_tiny", "sentencepiece_bpe", 300, "sp300")
    ex.train_sentencepiece(lines, spec, tmp_path)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "reference"), model_type="bpe",
        vocab_size=300, byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=1,
        minloglevel=2)
    ours = (tmp_path / "tokenizers" / "fineweb_300_bpe.vocab").read_text(encoding="utf-8")
    assert ours == (tmp_path / "reference.vocab").read_text(encoding="utf-8")


def test_interrupted_reexport_leaves_no_manifest_entry_for_deleted_shards(tmp_path, monkeypatch):
    docs = tiny_corpus()
    ex.export(docs, tmp_path, BYTE_SPEC, num_val_docs=1, shard_size=1000, progress=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex.ShardWriter, "flush", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ex.export(docs, tmp_path, BYTE_SPEC, num_val_docs=1, shard_size=1000, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["datasets"] == []
    assert not list(tmp_path.rglob("*.tmp"))


def test_cli_flag_lets_sentencepiece_read_validation(tmp_path):
    docs = tmp_path / "tiny.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus()))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"tokenizers": [
        {"name": "sp_bpe_300", "kind": "sentencepiece_bpe", "vocab_size": 300}]}))
    for flag in ([], ["--tokenizer-train-includes-val"]):
        out = tmp_path / ("with_val" if flag else "default")
        assert ex.main(["--docs", str(docs), "--output-root", str(out), "--tokenizer-config",
                        str(spec), "--num-val-docs", "1", *flag]) == 0
        training = json.loads((out / "manifest.json").read_text())["tokenizers"][0]["training"]
        assert training["includes_val"] == bool(flag) and training["docs"] == (31 if flag else 30)
        sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizers" / "fineweb_300_bpe.model"))
        assert (sp.piece_to_id("z") != sp.unk_id()) == bool(flag)
