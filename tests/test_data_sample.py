"""The shipped sample corpus (SPEC 9): content, order, sidecar and provenance."""
import hashlib
import json
import lzma
from pathlib import Path

import pytest

from conftest import ROOT, load_module

SAMPLE_DIR = ROOT / "data" / "sample"


def records():
    with lzma.open(SAMPLE_DIR / "sotu_1961_2021.jsonl.xz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_validation_speeches_come_first_then_training_in_year_order():
    docs = records()
    assert len(docs) == 62 and all(set(d) == {"text", "year", "president"} for d in docs)
    years = [d["year"] for d in docs]
    assert years[:7] == list(range(2015, 2022))
    assert years[7:] == sorted(years[7:]) and years[7] == 1961 and years[-1] == 2014
    assert years.count(1961) == 2  # Eisenhower's last and Kennedy's first
    assert docs[7]["president"] == "Dwight D Eisenhower" and docs[6]["president"] == "Joseph R Biden"


def test_sidecar_and_texts_match_the_package_files():
    meta = json.loads((SAMPLE_DIR / "sotu_1961_2021.meta.json").read_text())
    assert (meta["num_docs"], meta["docs_val"]) == (62, 7)
    assert meta["source"]["tarball_sha256"] == \
        "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
    docs = records()
    # Each speech file is its text plus one line terminator; the hashes are of those files.
    for doc, source in zip(docs, meta["files"]):
        assert source["year"] == doc["year"]
        assert hashlib.sha256((doc["text"] + "\n").encode()).hexdigest() == source["sha256"]
    assert sum(len(d["text"].encode()) for d in docs) == meta["text_bytes"] == 2_143_019
    assert any(ord(c) > 127 for c in docs[6]["text"])  # kept as published: curly quotes, dashes
    assert (SAMPLE_DIR / "PROVENANCE.md").is_file()


def package_tarball(path: Path, extra_years=(1960, 2022)) -> Path:
    """A tarball laid out as the npm package is (package/data/<year>_<name>.txt holding the speech
    and a line terminator, and a .json beside it), rebuilt from the shipped texts, plus speeches
    outside 1961-2021 that the converter must leave out."""
    import io
    import tarfile

    meta = json.loads((SAMPLE_DIR / "sotu_1961_2021.meta.json").read_text())
    docs = {source["file"]: doc for source, doc in zip(meta["files"], records())}
    docs.update({f"data/{y}_someone_party.txt": {"text": f"speech of {y}", "president": "X"} for y in extra_years})
    with tarfile.open(path, "w:gz") as tar:
        for name, doc in sorted(docs.items()):
            for member, data in ((name, doc["text"] + "\n"),
                                 (name[:-4] + ".json", json.dumps({"text": doc["text"], "name": doc["president"]}))):
                info = tarfile.TarInfo("package/" + member)
                info.size = len(data.encode())
                tar.addfile(info, io.BytesIO(data.encode()))
    return path


def converter_with_pinned_fixture(tmp_path: Path, monkeypatch):
    """make_sample.py with the package fixture's checksum as the pinned one, and that fixture."""
    make_sample = load_module("data/sample/make_sample.py")
    tarball = package_tarball(tmp_path / "pkg.tgz")
    monkeypatch.setattr(make_sample, "TARBALL_SHA256", hashlib.sha256(tarball.read_bytes()).hexdigest())
    return make_sample, tarball


def test_conversion_reproduces_the_shipped_files(tmp_path, monkeypatch):
    make_sample = load_module("data/sample/make_sample.py")
    tarball = package_tarball(tmp_path / "pkg.tgz")
    assert make_sample.main([str(tarball), "--out-dir", str(tmp_path)]) == 1  # not the pinned package
    monkeypatch.setattr(make_sample, "TARBALL_SHA256", hashlib.sha256(tarball.read_bytes()).hexdigest())
    assert make_sample.main([str(tarball), "--out-dir", str(tmp_path)]) == 0
    shipped = SAMPLE_DIR / "sotu_1961_2021.jsonl.xz"
    assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes()
    made = json.loads((tmp_path / "sotu_1961_2021.meta.json").read_text())
    expected = json.loads((SAMPLE_DIR / "sotu_1961_2021.meta.json").read_text())
    made["source"]["tarball_sha256"] = expected["source"]["tarball_sha256"]
    assert made == expected


def test_a_later_first_year_keeps_validation_and_cuts_only_training(tmp_path, monkeypatch):
    make_sample, tarball = converter_with_pinned_fixture(tmp_path, monkeypatch)
    out = tmp_path / "not" / "made" / "yet"  # as in the README's command, a folder that does not exist
    assert make_sample.main([str(tarball), "--out-dir", str(out), "--first-year", "2000"]) == 0
    meta = json.loads((out / "sotu_2000_2021.meta.json").read_text())
    assert meta["docs_val"] == 7 and meta["val_years"] == [2015, 2021] and meta["train_years"] == [2000, 2014]
    docs = [json.loads(line) for line in lzma.open(out / "sotu_2000_2021.jsonl.xz", "rt")]
    assert [d["year"] for d in docs[7:]] == sorted(d["year"] for d in docs[7:]) and docs[7]["year"] == 2000


def test_shuffled_training_order_is_deterministic_and_keeps_validation_first(tmp_path, monkeypatch):
    make_sample, tarball = converter_with_pinned_fixture(tmp_path, monkeypatch)
    years = {}
    for run, extra in (("year", []), ("a", ["--shuffle-train", "7"]), ("b", ["--shuffle-train", "7"])):
        (tmp_path / run).mkdir()
        assert make_sample.main([str(tarball), "--out-dir", str(tmp_path / run), *extra]) == 0
        name = "sotu_1961_2021" + ("_shuf7" if extra else "")
        years[run] = [json.loads(line)["year"] for line in lzma.open(tmp_path / run / f"{name}.jsonl.xz", "rt")]
        meta = json.loads((tmp_path / run / f"{name}.meta.json").read_text())
        assert meta["docs_val"] == 7 and meta["train_years"] == [1961, 2014]
    assert years["a"] == years["b"]  # the same seed, the same order
    assert years["a"][:7] == years["year"][:7] == list(range(2015, 2022))  # validation untouched, first
    assert sorted(years["a"][7:]) == years["year"][7:] != years["a"][7:]  # the same documents, reordered
    assert "random.Random(7)" in meta["train_order"]


def test_training_pieces_reassemble_to_the_speeches_and_leave_validation_whole(tmp_path, monkeypatch):
    make_sample, tarball = converter_with_pinned_fixture(tmp_path, monkeypatch)
    made = {}
    for run, extra in (("whole", []), ("a", ["--train-pieces", "2048"]), ("b", ["--train-pieces", "2048"])):
        (tmp_path / run).mkdir()
        assert make_sample.main([str(tarball), "--out-dir", str(tmp_path / run), "--shuffle-train", "7", *extra]) == 0
        name = "sotu_1961_2021_shuf7" + ("_pieces2048" if extra else "")
        made[run] = [json.loads(line) for line in lzma.open(tmp_path / run / f"{name}.jsonl.xz", "rt")]
    assert made["a"] == made["b"]  # deterministic
    whole, pieces = made["whole"], made["a"]
    assert pieces[:7] == whole[:7]  # the validation speeches, whole and first
    by_speech = {}
    for doc in pieces[7:]:
        by_speech.setdefault((doc["year"], doc["president"]), {})[doc["piece"]] = doc["text"]  # 1961 had two
    assert len(pieces) - 7 > 10 * (len(whole) - 7)  # about 15 pieces a speech
    for speech in whole[7:]:
        key = speech["year"], speech["president"]
        own = [by_speech[key][i] for i in range(len(by_speech[key]))]
        assert " ".join(own) == speech["text"]  # nothing lost but the one space at each cut
        assert all(len(p.encode()) >= 2048 and p[-1] in ".?!\"')\u201d\u2019" for p in own[:-1])
    years = [d["year"] for d in pieces[7:]]
    assert sum(a != b for a, b in zip(years, years[1:])) > 0.9 * len(years)  # neighbours from other speeches
    meta = json.loads((tmp_path / "a" / "sotu_1961_2021_shuf7_pieces2048.meta.json").read_text())
    assert meta["num_docs"] == len(pieces) and meta["docs_val"] == 7 and "cut_into_pieces" in meta["train_pieces"]
    with pytest.raises(SystemExit):  # pieces in year order would read one speech after another
        make_sample.main([str(tarball), "--out-dir", str(tmp_path), "--train-pieces", "2048"])


def test_a_piece_ends_only_at_a_sentence_end_and_keeps_a_trailing_space():
    cut = load_module("data/sample/make_sample.py").cut_into_pieces
    text = "One two. Three (four.) Five? \u201cSix.\u201d Seven 3.5 eight. "
    assert cut(text, 5) == ["One two.", "Three (four.)", "Five?", "\u201cSix.\u201d", "Seven 3.5 eight. "]
    assert cut(text, 1000) == [text] and cut("", 5) == [""]
