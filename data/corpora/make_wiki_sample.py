"""Build a second English corpus, encyclopedic rather than spoken, from the gensim 4.4.0 wheel.

    pip download gensim==4.4.0 --no-deps -d /tmp/gensim      # a registry package: reachable offline-ish
    python data/corpora/make_wiki_sample.py /tmp/gensim/gensim-4.4.0-*.whl      # -> data/wiki_sample/

The wheel ships a shortened English Wikipedia dump (April 2016) as test data:
`gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`.
Its article text is CC BY-SA 3.0 (Wikipedia's licence), so this repository ships the script,
not the text: every user builds the same corpus from the same wheel. The script checks the
dump's sha256, keeps articles (no redirects), turns wiki markup into plain text (templates,
references, tables, files and categories out; link text kept; headings as lines), and writes
  wiki_sample.jsonl.xz   one {"text", "title"} a line, validation first
  wiki_sample.meta.json  docs_val (read by the exporter), the source and its sha256
The validation split is every 8th article in dump order (so both splits span the alphabet).
Export it like the sample: `python data/download_hf_docs_and_tokenize.py --docs
data/wiki_sample/wiki_sample.jsonl.xz --output-root data/wiki_export --tokenizer-config
data/tokenizer_specs_byte260.json`.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import json
import lzma
import os
import re
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MEMBER_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
MIN_CHARS = 2000  # shorter articles are stubs or lists
VAL_EVERY = 8


def strip_nested(text: str, open_: str, close: str) -> str:
    """Remove every (possibly nested) open_ ... close span, e.g. {{templates}} and {| tables |}."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def link_text(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    if re.match(r"(?i)(file|image|category|media):", target):
        return ""
    return (label or target).split("|")[-1]


def wiki_to_text(markup: str) -> str:
    t = html.unescape(markup)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<math[^>]*>.*?</math>", "", t, flags=re.S)  # formulas are not prose
    t = re.sub(r"<ref[^>]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = strip_nested(t, "{{", "}}")
    t = strip_nested(t, "{|", "|}")
    for _ in range(2):  # links inside file captions
        t = re.sub(r"\[\[([^\[\]]*)\]\]", link_text, t)
    t = re.sub(r"\[https?://[^\s\]]+ ?([^\]]*)\]", r"\1", t)
    t = re.sub(r"<[^>]+>", "", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", t, flags=re.M)
    lines = []
    for line in t.splitlines():
        line = re.sub(r"^[*#:;]+\s*", "", line).strip()
        if line.lower() in ("see also", "references", "external links", "further reading", "notes", "bibliography"):
            break  # the rest of an article is lists of links
        if line:
            lines.append(re.sub(r"[ \t]+", " ", line))
    return "\n".join(lines)


def articles(dump: bytes) -> list[dict]:
    root = ET.fromstring(dump)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    out = []
    for page in root.iter(f"{ns}page"):
        title = page.findtext(f"{ns}title") or ""
        body = page.findtext(f"{ns}revision/{ns}text") or ""
        if page.findtext(f"{ns}ns") != "0" or body.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = wiki_to_text(body)
        if len(text) >= MIN_CHARS:
            out.append({"text": text, "title": title})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("wheel", type=Path, help="gensim-4.4.0-*.whl from pip download gensim==4.4.0 --no-deps")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "wiki_sample")
    args = p.parse_args(argv)
    try:
        blob = zipfile.ZipFile(args.wheel).read(MEMBER)
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        print(f"error: {args.wheel}: not a gensim 4.4.0 wheel with {MEMBER}: {e}", file=sys.stderr)
        return 2
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MEMBER_SHA256:
        print(f"error: {args.wheel}: the dump's sha256 is {digest}, expected {MEMBER_SHA256}", file=sys.stderr)
        return 2
    docs = articles(bz2.decompress(blob))
    val = docs[::VAL_EVERY]
    train = [d for i, d in enumerate(docs) if i % VAL_EVERY]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in val + train).encode()
    meta = {"docs_val": len(val), "source": f"{args.wheel.name}:{MEMBER}", "source_sha256": digest,
            "licence": "CC BY-SA 3.0 (Wikipedia article text); build it, do not redistribute it without attribution",
            "docs_train": len(train), "bytes": sum(len(d["text"].encode()) for d in docs)}
    for name, data in (("wiki_sample.jsonl.xz", lzma.compress(lines, preset=9)),
                       ("wiki_sample.meta.json", (json.dumps(meta, indent=2) + "\n").encode())):
        tmp = args.out_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, args.out_dir / name)
    print(f"{len(docs)} articles ({len(val)} validation), {meta['bytes']:,} bytes of text -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
