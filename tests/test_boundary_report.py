"""boundaries.py: statistics on hand-made masks over known text, computed by hand; the HTML page;
and analyse() end to end on a stand-in model whose cuts we choose."""
import html
import json
import re
from types import SimpleNamespace

import pytest
import torch

import boundaries
from conftest import study01, study02, tiny_hparams

TEXT = b"the cat sat on a mat"  # word starts at 0, 4, 8, 12, 15, 17


def row(text: bytes) -> torch.Tensor:
    return torch.tensor([[b + 4 for b in text]])


def mask_at(positions, length=len(TEXT)) -> torch.Tensor:
    m = torch.zeros(1, length, dtype=torch.bool)
    m[0, positions] = True
    return m


def test_statistics_of_a_hand_made_mask_equal_a_hand_count():
    hp = tiny_hparams(study02())
    t = boundaries.targets(study02(), hp, row(TEXT))
    assert t.word_start[0].nonzero().flatten().tolist() == [0, 4, 8, 12, 15, 17]
    assert t.on_space[0].nonzero().flatten().tolist() == [3, 7, 11, 14, 16]
    s = boundaries.mask_stats(mask_at([0, 4, 8, 13, 16, 17]), t, byte_level=True)
    # counted cuts (position 0 is forced): 4, 8, 13, 16, 17; word starts after 0: 4, 8, 12, 15, 17
    assert (s["boundaries"], s["bytes"]) == (5, 19)
    assert (s["precision"], s["recall"]) == (3 / 5, 3 / 5)  # 4, 8, 17
    assert (s["precision_on_space"], s["recall_on_space"]) == (1 / 5, 1 / 5)  # 16
    assert s["precision_shift_minus1"] == 1 / 5  # word starts moved one earlier: 3, 7, 11, 14, 16 -> 16
    assert s["precision_shift_plus1"] == 2 / 5  # one later: 5, 9, 13, 16, 18 -> 13, 16
    assert s["bytes_per_chunk"] == 19 / 5 and s["boundaries_per_256_bytes"] == 256 * 5 / 19
    # whole chunks inside the window: [cat ][sat o][n a][ ] -> 4, 5, 3, 1 bytes
    assert s["chunk_bytes_mean"] == 3.25
    assert s["chunk_bytes_cv"] == pytest.approx((8.75 / 4) ** 0.5 / 3.25)
    assert s["chunk_bytes_hist"] == [1, 0, 1, 1, 1] + [0] * 11
    assert boundaries.chunked_text(hp, row(TEXT)[0], mask_at([0, 4, 8, 13, 16, 17])[0]) == "[cat ][sat o][n a][ ][mat]"


def test_cap_truncation_and_flip_counts_equal_a_hand_count():
    masks = torch.zeros(3, 10, dtype=torch.bool)
    masks[0, [0, 2, 4, 6, 8, 9]] = True  # 6 boundaries
    masks[1, [0, 5]] = True  # 2
    masks[2, [0, 1, 2, 3, 4]] = True  # 5
    assert boundaries.cap_stats(masks, 4) == {"cap": 4, "rows": 3, "rows_truncated": 2, "boundaries_dropped": 3}
    other = masks.clone()
    other[0, 0] = False  # position 0 is never counted
    other[1, [3, 7]] = True
    counted = torch.ones(3, 10, dtype=torch.bool)
    assert boundaries.flip_rate(masks, other, counted) == 2 / 27


def test_sentencepiece_word_starts_and_lengths_in_tokens(tmp_path):
    from conftest import export_docs, read_sample_docs
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in read_sample_docs()[:25]))
    out = export_docs(docs, tmp_path / "sp", spec="sp1024", extra=("--num-val-docs", "5"))
    model = next((out / "tokenizers").glob("*.model"))
    hp = tiny_hparams(study02(), VOCAB_SIZE="1024", TOKENIZER_PATH=str(model))
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=hp.tokenizer_path)
    ids = torch.tensor([sp.encode("the cat sat on the mat")])
    t = boundaries.targets(study02(), hp, ids)
    pieces = [sp.id_to_piece(i) for i in ids[0].tolist()]
    assert t.word_start[0].tolist() == [p.startswith("\u2581") and len(p) > 1 for p in pieces]
    assert int(t.unit_bytes.sum()) == len("the cat sat on the mat")  # each "▁" is the space before its word
    # the trainer's definitions, not boundaries.py's own: a leading "▁" right after BOS is no byte (the
    # decoder drops it), and an id the tokenizer calls control counts none, whatever its piece looks like
    luts = study02().build_byte_luts(hp, torch.device("cpu"))
    with_bos = torch.tensor([[1] + sp.encode("the cat sat")[1:]])  # BOS, then "▁cat"
    assert sp.id_to_piece(with_bos[0, 1].item()).startswith("\u2581")
    t2 = boundaries.targets(study02(), hp, with_bos)
    assert t2.unit_bytes[0].tolist() == study02().target_bytes(luts, with_bos[:, [0] + list(range(with_bos.size(1) - 1))],
                                                               with_bos)[0].tolist()
    assert t2.unit_bytes[0, 1].item() == len(sp.id_to_piece(with_bos[0, 1].item())) - 1  # "▁cat": 3, not 4
    assert t2.counted[0].tolist() == (~luts.is_control[with_bos[0]]).tolist() and not t2.counted[0, 0]
    s = boundaries.mask_stats(t.word_start, t, byte_level=False)
    assert s["precision"] == 1.0 and s["recall"] == 1.0 and "chunk_tokens_mean" in s


class FixedRouting(torch.nn.Module):
    def __init__(self, t, rule):
        super().__init__()
        self.t, self.rule = t, rule

    def forward(self, x):
        mask = self.rule(x)
        p = mask.float() * 0.9 + 0.05
        return self.t.RoutingModuleOutput(p, mask, torch.where(mask, p, 1 - p))


class FixedModel(torch.nn.Module):
    """Stands in for an H-Net: cuts where `rule` says, and is surprised exactly at its cuts."""

    def __init__(self, t, rule):
        super().__init__()
        self.routing = FixedRouting(t, rule)

    def forward(self, x, y):
        cuts = self.routing(x).boundary_mask
        surprise_next = torch.cat((cuts[:, 1:], torch.zeros_like(cuts[:, :1])), dim=1)  # loss at t-1 is token t's
        return SimpleNamespace(loss=surprise_next.float() * 3.0 + 1.0)


SPEECH = ("We are fifteen years into this new century, and the state of our union is strong. " * 30).encode()


@pytest.mark.parametrize("study", [study01, study02])
def test_analyse_on_a_model_that_cuts_at_word_starts(study):
    t = study()
    hp = tiny_hparams(t)  # byte260, sequence 64
    tokens = torch.tensor([1] + [b + 4 for b in SPEECH])
    space = torch.zeros(260, dtype=torch.bool)
    space[ord(" ") + 4] = True

    def at_word_starts(x):
        prev = torch.cat((torch.ones_like(x[:, :1], dtype=torch.bool), space[x[:, :-1]] | (x[:, :-1] < 4)), dim=1)
        return prev & ~space[x] & (x >= 4)  # a document's first byte (after BOS) starts a word
    r = boundaries.analyse(t, FixedModel(t, at_word_starts), hp, tokens, torch.device("cpu"), shifts=2)
    assert r["precision"] == 1.0 and r["recall"] == 1.0 and r["precision_shift_plus1"] == 0.0
    assert r["recall_on_space"] == 0.0
    assert r["example"].startswith("[We ][are ][fifteen ][years ][into ][this ][new ][century, ][and ]")
    assert r["shift_flip_rate"] == {1: 0.0, 2: 0.0}  # the cuts depend on the text only
    assert r["surprise_at_boundaries"] == 4.0 and r["surprise_elsewhere"] == 1.0
    assert abs(r["bytes_per_chunk"] - len(SPEECH) / len(SPEECH.split())) < 0.3
    assert ("fixed_cap" in r) == (t is study02())
    every_fourth = FixedModel(t, lambda x: (torch.arange(x.size(1)) % 4 == 0).expand_as(x))
    r = boundaries.analyse(t, every_fourth, hp, tokens, torch.device("cpu"), shifts=2)
    # shift 2: positions 3..63 of a window are compared (61); cuts at j % 4 == 0 against j % 4 == 2: 15 + 15 differ
    assert r["shift_flip_rate"][2] == 30 / 61
    assert r["chunk_bytes_cv"] == 0.0 and r["chunk_bytes_hist"][3] > 0


def page_chunks(page: str) -> list[str]:
    """The text of each shaded chunk span, read back from the page."""
    body = page[page.index('<div class="text">'):]
    body = body[:body.index("</div>")]
    chunks = re.findall(r'<span class="c[01]">(.*?)</span></span>(?=<span class="c|$)', body + "</span>")
    return [html.unescape(re.sub(r"<[^>]+>", "", c.replace("\u21b5<br>", "\n"))) for c in chunks]


def test_the_html_page_is_self_contained_and_shows_every_byte_in_its_chunks(tmp_path):
    hp = tiny_hparams(study02())
    text = b'The <b>union</b> & "state"\nis strong. Caf\xc3\xa9 au lait.'
    tokens = row(text)[0]
    mask = torch.zeros(len(text), dtype=torch.bool)
    cuts = [0, 4, 16, 18, 26, 27, 30, 38, 45]
    mask[cuts] = True
    c = boundaries.Collected(tokens[None], mask[None], mask[None].float(), torch.zeros(1, len(text)))
    view = boundaries.view_of("byte260", hp, c)
    report = boundaries.mask_stats(mask[None], boundaries.targets(study02(), hp, tokens[None]), True)
    path = tmp_path / "page.html"
    boundaries.write_html(path, [view, view], [report, report])
    page = path.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page
    expected = [text[a:b].decode("utf-8") for a, b in zip(cuts, cuts[1:] + [len(text)])]
    assert page_chunks(page) == expected
    assert "".join(page_chunks(page)) == text.decode("utf-8")
    assert page.count("<svg") == 2 and 'title="p=0.000"' in page and 'title="p=1.000"' in page
