"""Where an H-Net's router cuts: boundary statistics, a terminal view and a self-contained HTML page.

    report = analyse(trainer, model, hp, val_tokens, device)          # a dict, JSON-ready
    print(report["example"])                                          # [The ][quick ][brown ]...
    write_html("chunks.html", [view_of(...), view_of(...)], [report, report2])

Used by eval_bpb.py (--json, --html), the launcher's demo summary and the bench/ scripts. It
reads a model through its forward only (the router is captured with a hook), so it works for
both studies' trainers and for byte260 and SentencePiece models alike. Conventions:
- A byte260 word start is a non-whitespace byte after whitespace (or at the start of a text);
  "on the space" puts the boundary on that whitespace byte instead. A SentencePiece word start
  is a piece with a leading "▁" (the space is inside the piece, so both conventions coincide).
- A token's bytes and which ids are control tokens are the trainer's own (build_byte_luts and
  target_bytes, the BPB denominator), so eval_bpb prints one byte count for an artifact.
- The first position of every window is a forced boundary (p_0 = 1) and is never counted.
- Chunk lengths leave out each window's first and last chunk (cut by the window's edges).
"""

from __future__ import annotations

import codecs
import functools
import html
from typing import NamedTuple

import torch

from harness import files

WHITESPACE = b" \t\n\r\f\v"
HIST_BINS = 16  # chunk lengths 1..15 and one bin for 16 or more


@functools.lru_cache(maxsize=4)
def sentencepiece_pieces(model_file: str) -> tuple[str, ...]:
    """Every piece of a SentencePiece model, by id (read once per model file)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_file)
    return tuple(sp.id_to_piece(i) for i in range(sp.vocab_size()))


def token_texts(hp, tokens) -> list[bytes]:
    """The UTF-8 bytes each token stands for, for display (control ids: none; "▁" shown as a space)."""
    if hp.uses_sentencepiece:
        vocab = sentencepiece_pieces(hp.tokenizer_path)
        out = []
        for t in tokens.tolist():
            piece = vocab[t]
            if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # byte fallback
                out.append(bytes([int(piece[3:5], 16)]))
            elif piece.startswith("<") and piece.endswith(">"):
                out.append(b"")
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
        return out
    return [bytes([t - 4]) if t >= 4 else b"" for t in tokens.tolist()]


class Targets(NamedTuple):
    word_start: torch.Tensor  # (..., L) bool: the token begins a word
    on_space: torch.Tensor  # (..., L) bool: the whitespace byte just before a word start (byte260)
    counted: torch.Tensor  # (..., L) bool: real text (not control ids)
    unit_bytes: torch.Tensor  # (..., L) int64: UTF-8 bytes the token stands for


@functools.lru_cache(maxsize=8)
def byte_luts(trainer, tokenizer_path: str, vocab_size: int):
    """The trainer's own byte-count tables (one definition of a token's bytes and of control ids)."""
    hp = trainer.Hyperparameters(tokenizer_path=tokenizer_path, vocab_size=vocab_size)
    return trainer.build_byte_luts(hp, torch.device("cpu"))


def targets(trainer, hp, tokens: torch.Tensor) -> Targets:
    """Word starts under both conventions, for a (R, L) or (L,) tensor of token ids. Each row is
    read on its own: a row's first token counts as following whitespace (and, for its bytes, a
    control token). Byte counts and control ids are the trainer's (its BPB denominator)."""
    luts = byte_luts(trainer, hp.tokenizer_path, hp.vocab_size)
    prev = torch.cat((torch.ones_like(tokens[..., :1]), tokens[..., :-1]), dim=-1)  # id 1 is BOS
    unit_bytes = trainer.target_bytes(luts, prev, tokens)
    counted = ~luts.is_control[tokens]
    if hp.uses_sentencepiece:
        lead = luts.has_leading_space[tokens] & (luts.base_bytes[tokens] > 0)  # "▁word", not a bare "▁"
        return Targets(lead, lead, counted, unit_bytes)
    space = torch.zeros(hp.vocab_size, dtype=torch.bool)
    space[[b + 4 for b in WHITESPACE]] = True
    is_space = space[tokens]
    prev_space = torch.cat((torch.ones_like(is_space[..., :1]), is_space[..., :-1] | ~counted[..., :-1]), dim=-1)
    start = counted & ~is_space & prev_space
    on_space = is_space & torch.cat((start[..., 1:], torch.zeros_like(start[..., :1])), dim=-1)
    return Targets(start, on_space, counted, unit_bytes)


def chunk_lengths(mask: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Lengths (summed `units`) of every chunk that both starts and ends inside its row: (R, L) in."""
    out = []
    for m, u in zip(mask.tolist(), units.tolist()):
        starts = [i for i, b in enumerate(m) if b]
        out += [sum(u[a:b]) for a, b in zip(starts[:-1], starts[1:]) if a > 0]  # the chunk at 0 is cut by the edge
    return torch.tensor(out, dtype=torch.float64)


def length_stats(lengths: torch.Tensor, prefix: str) -> dict:
    if lengths.numel() == 0:
        return {f"{prefix}_mean": float("nan"), f"{prefix}_cv": float("nan"), f"{prefix}_hist": [0] * HIST_BINS}
    hist = torch.bincount(lengths.long().clamp(1, HIST_BINS) - 1, minlength=HIST_BINS)
    mean = lengths.mean().item()
    return {f"{prefix}_mean": mean, f"{prefix}_cv": lengths.std(unbiased=False).item() / mean,
            f"{prefix}_hist": hist.tolist()}


def mask_stats(mask: torch.Tensor, t: Targets, byte_level: bool) -> dict:
    """Every statistic of a (R, L) boundary mask against its text (no model needed: tests build both)."""
    counted = t.counted.clone()
    counted[:, 0] = False  # the forced boundary at each window's start
    b = mask & counted
    nb, nbytes = int(b.sum()), int((t.unit_bytes * counted).sum())

    def prf(target: torch.Tensor) -> tuple[float, float]:
        w = target & counted
        hits = int((b & w).sum())
        return hits / max(nb, 1), hits / max(int(w.sum()), 1)
    precision, recall = prf(t.word_start)
    precision_space, recall_space = prf(t.on_space)
    # A router can settle one byte off word starts (still word-like units): precision against word
    # starts moved by -1 and +1 tells that apart from noise.
    shifted = {s: prf(torch.roll(t.word_start, s, dims=1))[0] for s in (-1, 1)}
    out = {"tokens": int(counted.sum()), "bytes": nbytes, "boundaries": nb,
           "tokens_per_chunk": int(counted.sum()) / max(nb, 1), "bytes_per_chunk": nbytes / max(nb, 1),
           "boundaries_per_256_bytes": 256 * nb / max(nbytes, 1),
           "precision": precision, "recall": recall,
           "precision_on_space": precision_space, "recall_on_space": recall_space,
           "precision_shift_minus1": shifted[-1], "precision_shift_plus1": shifted[1]}
    out.update(length_stats(chunk_lengths(mask, t.unit_bytes), "chunk_bytes"))
    if not byte_level:  # SentencePiece: lengths in tokens as well
        out.update(length_stats(chunk_lengths(mask, torch.ones_like(t.unit_bytes)), "chunk_tokens"))
    out["chunk_len_cv"] = out["chunk_bytes_cv"]  # the name eval_bpb's JSON used before chunk_bytes_cv
    return out


def cap_stats(mask: torch.Tensor, cap: int) -> dict:
    """How often a fixed chunk cap truncates a row, and how many boundaries it drops."""
    counts = mask.sum(dim=1)
    return {"cap": cap, "rows": int(mask.size(0)), "rows_truncated": int((counts > cap).sum()),
            "boundaries_dropped": int((counts - cap).clamp(min=0).sum())}


def flip_rate(a: torch.Tensor, b: torch.Tensor, counted: torch.Tensor) -> float:
    """Fraction of counted positions whose boundary decision differs between two masks."""
    c = counted.clone()
    c[:, 0] = False
    return int(((a != b) & c).sum()) / max(int(c.sum()), 1)


class Collected(NamedTuple):
    tokens: torch.Tensor  # (R, L) windows of validation, non-overlapping
    mask: torch.Tensor  # (R, L) bool boundary_mask
    prob: torch.Tensor  # (R, L) boundary_prob
    nll: torch.Tensor  # (R, L) loss of predicting token t from the tokens before it (nan at t=0)


@torch.no_grad()
def collect(model, hp, val_tokens: torch.Tensor, device, max_tokens: int = 200_000, offset: int = 0) -> Collected:
    """Run the model over non-overlapping windows of validation from `offset`; keep the router's
    output (captured from model.routing) and each token's surprise."""
    seq = hp.train_seq_len
    n = min(val_tokens.numel() - 1 - offset, max_tokens) // seq * seq
    if n <= 0:
        raise ValueError(f"validation has fewer than TRAIN_SEQ_LEN={seq} tokens after offset {offset}")
    x = val_tokens[offset:offset + n].view(-1, seq).to(device, torch.int64)
    y = val_tokens[offset + 1:offset + n + 1].view(-1, seq).to(device, torch.int64)
    captured = []
    hook = model.routing.register_forward_hook(lambda m, i, out: captured.append(out))
    was_training = model.training
    model.eval()
    masks, probs, nlls = [], [], []
    try:
        for i in range(0, x.size(0), hp.eval_batch_seqs):
            captured.clear()
            loss = model(x[i:i + hp.eval_batch_seqs], y[i:i + hp.eval_batch_seqs]).loss.float().cpu()
            masks.append(captured[-1].boundary_mask.cpu())
            probs.append(captured[-1].boundary_prob.float().cpu())
            # the loss at position t-1 is the surprise of token t
            nlls.append(torch.cat((torch.full_like(loss[:, :1], float("nan")), loss[:, :-1]), dim=1))
    finally:
        hook.remove()
        model.train(was_training)
    return Collected(x.cpu(), torch.cat(masks), torch.cat(probs), torch.cat(nlls))


def surprise_stats(c: Collected, t: Targets) -> dict:
    """Mean surprise (nats) of the tokens the router cuts before vs the rest: does it cut where the
    model is surprised?"""
    counted = t.counted.clone()
    counted[:, 0] = False
    at, rest = c.mask & counted, ~c.mask & counted
    return {"surprise_at_boundaries": c.nll[at].mean().item() if at.any() else float("nan"),
            "surprise_elsewhere": c.nll[rest].mean().item() if rest.any() else float("nan")}


def analyse(trainer, model, hp, val_tokens, device, max_tokens: int = 200_000, shifts: int = 4,
            compare_model=None) -> dict:
    """Every statistic of the module docstring for one model over the first max_tokens of validation.
    compare_model (e.g. the float model of a quantised one): boundary flips between the two."""
    c = collect(model, hp, val_tokens, device, max_tokens)
    t = targets(trainer, hp, c.tokens)
    report = mask_stats(c.mask, t, not hp.uses_sentencepiece)
    report.update(surprise_stats(c, t))
    if hasattr(hp, "chunk_divisor"):  # study 02's fixed cap; study 01 has none to truncate
        report["fixed_cap"] = cap_stats(c.mask, max(1, hp.train_seq_len // hp.chunk_divisor))
    # The same text read from a window shifted by s tokens: how many decisions change with context.
    report["shift_flip_rate"] = {}
    seq = hp.train_seq_len
    for s in range(1, shifts + 1):
        shifted = collect(model, hp, val_tokens, device, max_tokens, offset=s)
        rows = min(shifted.mask.size(0), c.mask.size(0))
        # position j of a shifted window is position j + s of the original one
        a = c.mask[:rows, s:]
        b = shifted.mask[:rows, :seq - s]
        report["shift_flip_rate"][s] = flip_rate(a, b, t.counted[:rows, s:])
    if compare_model is not None:
        other = collect(compare_model, hp, val_tokens, device, max_tokens)
        report["flip_rate_vs_compare"] = flip_rate(c.mask, other.mask, t.counted)
    report["example"] = chunked_text(hp, c.tokens[0], c.mask[0])
    return report


def chunked_text(hp, tokens, mask, max_chars: int = 600) -> str:
    """A window as [chunk][chunk]..., from its first cut after position 0 (the first chunk starts
    mid-word at the window's edge)."""
    texts = token_texts(hp, tokens)
    out, current = [], []
    for piece, cut in zip(texts, mask.tolist()):
        if cut and current:
            out.append(b"".join(current))
            current = []
        current.append(piece)
    out.append(b"".join(current))
    return "".join(f"[{c.decode('utf-8', 'replace')}]" for c in out[1:])[:max_chars]


# ---------------------------------------------------------------------------------------------
# The HTML page: no external resource (it must work offline and from a file), one column per model.
# ---------------------------------------------------------------------------------------------

class View(NamedTuple):
    title: str
    texts: list  # bytes per token
    mask: list  # bool per token
    prob: list  # float per token


def view_of(title: str, hp, c: Collected, row: int = 0) -> View:
    return View(title, token_texts(hp, c.tokens[row]), c.mask[row].tolist(), c.prob[row].tolist())


def histogram_svg(hist: list, label: str) -> str:
    width, height, bar = 320, 120, 320 // len(hist)
    top = max(max(hist), 1)
    bars = "".join(
        f'<rect x="{i * bar + 1}" y="{height - 20 - (height - 30) * n / top:.1f}" width="{bar - 2}" '
        f'height="{(height - 30) * n / top:.1f}" fill="#4a78b5"><title>{i + 1}{"+" if i == len(hist) - 1 else ""}: '
        f'{n}</title></rect>' for i, n in enumerate(hist))
    ticks = "".join(f'<text x="{i * bar + bar / 2:.0f}" y="{height - 6}" font-size="9" text-anchor="middle">'
                    f'{i + 1}{"+" if i == len(hist) - 1 else ""}</text>' for i in range(0, len(hist), 3))
    return (f'<svg width="{width}" height="{height}" role="img" '
            f'aria-label="{html.escape(label)}">{bars}{ticks}</svg>')


STAT_ROWS = (("bytes per chunk", "bytes_per_chunk", "{:.2f}"), ("boundaries per 256 bytes", "boundaries_per_256_bytes", "{:.1f}"),
             ("word-start precision / recall", ("precision", "recall"), "{:.3f} / {:.3f}"),
             ("on the space: precision / recall", ("precision_on_space", "recall_on_space"), "{:.3f} / {:.3f}"),
             ("precision 1 before / after", ("precision_shift_minus1", "precision_shift_plus1"), "{:.3f} / {:.3f}"),
             ("chunk length mean / CV (bytes)", ("chunk_bytes_mean", "chunk_bytes_cv"), "{:.2f} / {:.2f}"),
             ("surprise at cuts / elsewhere (nats)", ("surprise_at_boundaries", "surprise_elsewhere"), "{:.2f} / {:.2f}"),
             ("boundary flips vs the compared model", "flip_rate_vs_compare", "{:.4f}"))


def stats_table(report: dict) -> str:
    rows = []
    for label, keys, fmt in STAT_ROWS:
        keys = keys if isinstance(keys, tuple) else (keys,)
        if all(k in report for k in keys):
            rows.append(f"<tr><td>{label}</td><td>{fmt.format(*(report[k] for k in keys))}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def chunks_html(view: View) -> str:
    """Chunks as alternating shaded spans; each token carries its boundary probability on hover."""
    parts, shade = [], 1
    decode = codecs.getincrementaldecoder("utf-8")("replace")  # a character split over byte tokens shows once
    for i, (text, cut, p) in enumerate(zip(view.texts, view.mask, view.prob)):
        if i == 0 and not cut:
            parts.append(f'<span class="c{1 - shade}">')
        if cut and i > 0:
            parts.append(html.escape(decode.decode(b"", final=True)) + "</span>")
        if cut:
            shade = 1 - shade
            parts.append(f'<span class="c{shade}">')
        shown = html.escape(decode.decode(text)).replace("\n", "\u21b5<br>")
        parts.append(f'<span class="t" data-cut="{int(cut)}" title="p={p:.3f}">{shown}</span>')
    return "".join(parts) + html.escape(decode.decode(b"", final=True)) + "</span>"


PAGE_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.cols{display:flex;gap:2em;align-items:flex-start}.col{flex:1;min-width:0}
.text{font-family:ui-monospace,monospace;font-size:14px;line-height:1.9;white-space:pre-wrap;word-break:break-all}
.c0{background:#dbe8f7;border-left:2px solid #4a78b5}.c1{background:#f7e6cf;border-left:2px solid #b5874a}
.t:hover{outline:1px solid #000}table{border-collapse:collapse;margin:.5em 0}td{padding:2px 10px;border-bottom:1px solid #ddd}
h2{font-size:1.1em}"""


def write_html(path, views: list, reports: list) -> None:
    """One self-contained page: per model, its chunked text, its statistics and its chunk-length histogram."""
    cols = []
    for view, report in zip(views, reports):
        cols.append(f'<div class="col"><h2>{html.escape(view.title)}</h2><div class="text">{chunks_html(view)}</div>'
                    f"<h3>statistics</h3>{stats_table(report)}<h3>chunk lengths (bytes)</h3>"
                    f'{histogram_svg(report.get("chunk_bytes_hist", [0] * HIST_BINS), "chunk length histogram")}</div>')
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>H-Net chunks</title>'
            f"<style>{PAGE_STYLE}</style></head><body><h1>Where the router cuts</h1>"
            f"<p>Each shaded span is one chunk; hover a character for its boundary probability.</p>"
            f'<div class="cols">{"".join(cols)}</div></body></html>\n')
    files.write_atomic(path, page)
