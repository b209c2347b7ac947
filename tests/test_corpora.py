"""The second corpus (issue 9): wiki markup to plain text, and the build from a wheel-like zip."""
import bz2
import json
import lzma
import zipfile

from conftest import load_module

wiki = load_module("data/corpora/make_wiki_sample.py")

MARKUP = """{{Infobox person|name=X|birth={{birth date|1900|1|1}}}}
'''Ada''' was a [[mathematician|mathematical]] writer<ref name="a">Some book.</ref> in [[London]].[[File:Ada.jpg|thumb|A [[portrait]]]]
== Early life ==
She wrote &quot;notes&quot; <math>x^2</math>on the [http://example.org engine].
{| class="wikitable"
| a || b
|}
* A list item
== See also ==
* [[Babbage]]"""


def test_wiki_markup_becomes_plain_text():
    assert wiki.wiki_to_text(MARKUP) == ('Ada was a mathematical writer in London.\nEarly life\n'
                                        'She wrote "notes" on the engine.\nA list item')


def test_the_build_keeps_articles_and_puts_every_eighth_in_validation(tmp_path, monkeypatch):
    pages = "".join(
        f"<page><title>T{i}</title><ns>0</ns><revision><text>{'#REDIRECT [[X]]' if i == 3 else ('word ' * 500) + str(i)}"
        f"</text></revision></page>" for i in range(20))
    dump = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{pages}</mediawiki>'.encode()
    blob = bz2.compress(dump)
    wheel = tmp_path / "gensim.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(wiki.MEMBER, blob)
    assert wiki.main([str(wheel), "--out-dir", str(tmp_path / "out")]) == 2  # not the real dump: refused
    monkeypatch.setattr(wiki, "MEMBER_SHA256", __import__("hashlib").sha256(blob).hexdigest())
    assert wiki.main([str(wheel), "--out-dir", str(tmp_path / "out")]) == 0
    docs = [json.loads(line) for line in lzma.open(tmp_path / "out" / "wiki_sample.jsonl.xz", "rt")]
    meta = json.loads((tmp_path / "out" / "wiki_sample.meta.json").read_text())
    titles = [f"T{i}" for i in range(20) if i != 3]
    assert meta["docs_val"] == 3 and [d["title"] for d in docs[:3]] == titles[::8]
    assert sorted(d["title"] for d in docs) == sorted(titles)
