"""Bits per byte: every target scored once, and the byte denominator equals the raw UTF-8 bytes."""
import json
import math

import pytest
import torch

from conftest import ROOT, export_docs, read_sample_docs, study02, tiny_hparams

@pytest.mark.parametrize("total, seq, stride", [(1000, 64, 64), (1000, 64, 16), (1001, 64, 7), (64, 64, 8),
                                                (513, 128, 100), (5000, 512, 64)])
def test_every_target_is_scored_exactly_once(total, seq, stride):
    t = study02()
    scored = torch.zeros(total, dtype=torch.long)
    windows = t.eval_windows(total, seq, stride)
    for start, first in windows:
        assert 0 <= start and start + seq <= total
        scored[start + first:start + seq] += 1
    assert torch.equal(scored, torch.ones(total, dtype=torch.long))
    assert windows[0] == (0, 0)
    if stride == seq and total % seq == 0:  # the non-overlapping evaluation
        assert windows == [(s, 0) for s in range(0, total, seq)]


def test_too_little_validation_is_an_error():
    t = study02()
    with pytest.raises(t.ConfigError, match="TRAIN_SEQ_LEN=64"):
        t.eval_windows(63, 64, 64)


def val_tokens_of(dataset_dir, **env):
    """All validation tokens, read by the trainer's own loader (no VAL_MAX_TOKENS cut)."""
    t = study02()
    hp = tiny_hparams(t, DATA_PATH=str(dataset_dir), VAL_MAX_TOKENS="0", **env)
    return t.load_validation(hp).tokens.long()


def denominator(t, luts, tokens):
    return int(t.target_bytes(luts, tokens[None, :-1], tokens[None, 1:]).sum())


def test_byte260_denominator_is_the_raw_utf8_byte_count(sample_byte260):
    t = study02()
    hp = tiny_hparams(t)
    luts = t.build_byte_luts(hp, torch.device("cpu"))
    docs = read_sample_docs()
    meta = json.loads((ROOT / "data" / "sample" / "sotu_1961_2021.meta.json").read_text())
    raw = sum(len(d.encode("utf-8")) for d in docs[:meta["docs_val"]])
    assert any(ord(c) > 127 for c in docs[0])  # the check covers multi-byte characters
    assert denominator(t, luts, val_tokens_of(sample_byte260)) == raw


def test_sp1024_denominator_is_the_raw_utf8_byte_count(tmp_path):
    """Validation text the normaliser leaves as it is (single spaces, NFKC-stable) must count
    exactly its UTF-8 bytes, including byte-fallback characters and digits."""
    t = study02()
    val = ["The quick brown fox jumps over 13 lazy dogs.",
           "Caf\u00e9 cr\u00e8me costs 4.50 euros; na\u00efve r\u00e9sum\u00e9s \u2014 \u201cquoted\u201d.",
           "Emoji \U0001F600 and CJK \u6f22\u5b57 fall back to bytes: \U0001F680\U0001F30D!",
           "A line with tabs\tand, (parentheses) [brackets] {braces} #hash @at 100% ok?"]
    docs = tmp_path / "docs.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for text in val + read_sample_docs()[7:27]:
            f.write(json.dumps({"text": text}) + "\n")
    out = export_docs(docs, tmp_path / "export", "sp1024", ("--num-val-docs", str(len(val))))
    model = next((out / "tokenizers").glob("*.model"))
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model))
    def normalize(text):  # the normaliser writes spaces as "▁"
        return sp.normalize(text).replace("\u2581", " ")
    stable = [v for v in val if normalize(v) == v]
    assert len(stable) >= 3, "the test text must survive normalisation"
    hp = tiny_hparams(t, VOCAB_SIZE="1024", TOKENIZER_PATH=str(model))
    luts = t.build_byte_luts(hp, torch.device("cpu"))
    tokens = val_tokens_of(out / "datasets" / "fineweb10B_sp1024", VOCAB_SIZE="1024", TOKENIZER_PATH=str(model))
    assert denominator(t, luts, tokens) == sum(len(normalize(v).encode("utf-8")) for v in val)
    assert sum(len(normalize(v).encode()) for v in stable) == sum(len(v.encode()) for v in stable)
    assert any(sp.is_byte(int(i)) for i in tokens)  # byte fallback was exercised
    with pytest.raises(t.ConfigError, match=r"TOKENIZER_PATH=.*has vocab 1024 but VOCAB_SIZE=512"):
        t.build_byte_luts(tiny_hparams(t, VOCAB_SIZE="512", TOKENIZER_PATH=str(model)), torch.device("cpu"))


def test_evaluate_bpb_equals_a_hand_count(sample_byte260):
    """The trainer's evaluation vs a plain loop: windows one by one, bytes counted from ids."""
    t = study02()
    hp = tiny_hparams(t, DATA_PATH=str(sample_byte260), VAL_MAX_TOKENS="1000")
    torch.manual_seed(0)
    model = t.HNet(hp).eval()
    val = t.load_validation(hp).tokens.long()
    rt = t.Runtime(torch.device("cpu"))
    luts = t.build_byte_luts(hp, rt.device)
    res = t.evaluate_bpb(model, rt, hp, val, luts)
    nats, nbytes, count, seq = 0.0, 0, 0, hp.train_seq_len
    done = 0
    total = val.numel() - 1
    with torch.no_grad():
        for start in list(range(0, total - seq + 1, seq)) + ([total - seq] if total % seq else []):
            x, y = val[start:start + seq][None], val[start + 1:start + seq + 1][None]
            loss = model(x, y).loss[0]
            keep = slice(done - start, seq) if done > start else slice(0, seq)
            nats += loss[keep].double().sum().item()
            nbytes += int((y[0, keep] >= 4).sum())
            count += loss[keep].numel()
            done = start + seq
    assert res.tokens == count == total
    assert res.bytes == nbytes
    assert res.val_bpb == pytest.approx(nats / nbytes / math.log(2), rel=1e-6)  # batched vs one by one
    sliding = t.evaluate_bpb(model, rt, hp, val, luts, stride=16)
    assert sliding.tokens == total and sliding.bytes == res.bytes
    assert sliding.val_bpb != res.val_bpb  # more context per target: a different (usually lower) number
