"""Let an artifact write: sampling with the router's chunks marked, by exact incremental decoding.

    python eval_bpb.py ARTIFACT --sample "PROMPT" [--bytes N] [--temperature T] [--top-k K] [--seed S]
    python eval_bpb.py ARTIFACT --sample "PROMPT" --no-cache      # the slow reference: a full forward per byte

The fast path keeps a key/value cache in every attention layer and feeds one token at a time:
the encoder and decoder advance every token; the main stage advances only when the router
marks a boundary (one main-stage step per chunk, where an H-Net saves work at inference), and
the dechunk EMA carries its state from chunk to chunk. Everything else is the trainer's own code
(blocks, stages, router, residual projection, head): only attention is given a cache here.

The window: the model reads at most TRAIN_SEQ_LEN tokens, as in training. When the text would
outgrow it, the window jumps forward to keep the last TRAIN_SEQ_LEN // 2 tokens (re-read from
scratch, the caches rebuilt), so a prompt longer than the window keeps its end. Both paths
slide the same way. The prompt starts a document (BOS first); a slid window starts mid-text, as
training windows do. Study 02's fixed chunk cap (TRAIN_SEQ_LEN // CHUNK_DIVISOR chunks a window)
holds here too: past it, later bytes read the last kept chunk.

--no-cache recomputes the trainer's full forward for every token over the window padded to
TRAIN_SEQ_LEN (by causality the padding changes nothing before it); a test checks that both
paths give the same logits at every position and the same greedy text.
"""

from __future__ import annotations

import contextlib
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

BOS = 1


class CachedAttention:
    """One trainer CausalSelfAttention given a key/value cache: its forward takes the next
    position(s) of the sequence and attends over everything cached before them. A stage that runs
    its blocks K times (study 03's MAIN_LOOPS) calls each attention K times a position, one pass
    after the other: one cache a pass."""

    def __init__(self, trainer, attn, passes: int = 1):
        self.trainer, self.attn, self.passes = trainer, attn, passes
        self.reset()

    def reset(self) -> None:
        self.caches = [{"k": None, "v": None, "pos": 0} for _ in range(self.passes)]
        self.calls = 0

    def forward(self, x):
        cache = self.caches[self.calls % self.passes]
        self.calls += 1
        return self.attend(x, cache)

    def attend(self, x, cache: dict):  # (1, n, D) -> (1, n, D): the trainer's attention, positions pos..pos+n
        a, t = self.attn, self.trainer
        b, n, d = x.shape
        q = a.c_q(x).view(b, n, a.num_heads, a.head_dim).transpose(1, 2)
        k = a.c_k(x).view(b, n, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = a.c_v(x).view(b, n, a.num_kv_heads, a.head_dim).transpose(1, 2)
        q, k = F.rms_norm(q, (a.head_dim,)), F.rms_norm(k, (a.head_dim,))
        # the rotary angles of these positions alone: Rotary's torch.outer(positions, inv_freq), row by row
        positions = torch.arange(cache["pos"], cache["pos"] + n, device=x.device, dtype=torch.float32)
        angles = positions[:, None] * a.rotary.inv_freq[None, :]
        cos, sin = angles.cos().to(q.dtype)[None, None], angles.sin().to(q.dtype)[None, None]
        q = t.apply_rotary(q, cos, sin) * a.q_gain.to(q.dtype)[None, :, None, None]
        k = t.apply_rotary(k, cos, sin)
        cache["k"] = k if cache["k"] is None else torch.cat((cache["k"], k), dim=2)
        cache["v"] = v if cache["v"] is None else torch.cat((cache["v"], v), dim=2)
        cache["pos"] += n
        # One query against every cached key (n == 1, so no causal mask). Written out: on a CPU the
        # fused kernel's setup costs more than this whole product at one position.
        group = a.num_heads // a.num_kv_heads
        keys, values = cache["k"].repeat_interleave(group, dim=1), cache["v"].repeat_interleave(group, dim=1)
        weights = torch.softmax((q @ keys.transpose(-1, -2)).float() / a.head_dim ** 0.5, dim=-1)
        y = weights.to(values.dtype) @ values
        return a.proj(y.transpose(1, 2).reshape(b, n, d))


class IncrementalModel:
    """A trainer's model fed one token at a time. feed(token) returns the logits for the token after
    it and records whether the router started a chunk at it."""

    def __init__(self, trainer, model, hp):
        self.trainer, self.model, self.hp = trainer, model, hp
        stages = [model.main] + ([model.encoder, model.decoder] if hp.is_hnet else [])
        self.caches = {}
        for stage in stages:
            for block in stage.blocks:
                self.caches[block.attn] = CachedAttention(trainer, block.attn, getattr(stage, "loops", 1))
        self.cap = max(1, hp.train_seq_len // hp.chunk_divisor) if hasattr(hp, "chunk_divisor") else None
        self.reset()

    def reset(self) -> None:
        for cache in self.caches.values():
            cache.reset()
        self.h_prev = self.s = None  # the encoder's last output; the dechunk EMA's state
        self.chunks, self.boundaries, self.main_steps, self.ids = 0, [], 0, []

    def __enter__(self):
        for attn, cache in self.caches.items():
            attn.forward = cache.forward  # an instance attribute: nn.Module calls it instead
        return self

    def __exit__(self, *exc):
        for attn in self.caches:
            del attn.forward

    @torch.no_grad()
    def feed(self, token: int):
        m, hp = self.model, self.hp
        self.ids.append(token)
        recent = torch.tensor([self.ids[-3:]], device=m.tok_emb.weight.device)
        # study 03's input sees the token before (bigram, smear gate) and, through the smear, the one
        # before that: its own embed() over the last three tokens of the window is exact at the last
        x = m.embed(recent)[:, -1:] if hasattr(m, "embed") else m.tok_emb(recent[:, -1:])  # (1, 1, D)
        if not hp.is_hnet:  # a plain GPT: every token through the one stage, no chunks
            self.boundaries.append(False)
            return m.logits(m.main(x))[0, -1]
        h = m.encoder(x)
        if getattr(hp, "router", "learned") != "learned":  # study 03's rule: after whitespace
            p = m.routing(recent[:, -2:]).boundary_prob[0, -1]
        elif self.h_prev is None:  # the first position of a window always starts a chunk (p_0 = 1)
            p = torch.ones((), device=h.device)
        else:
            p = m.routing(torch.cat((self.h_prev, h), dim=1)).boundary_prob[0, 1]
        self.h_prev = h
        cut = bool(p >= 0.5)
        self.boundaries.append(cut)
        if cut and (self.cap is None or self.chunks < self.cap):  # past the cap: read the last kept chunk
            z = m.run_main(h) if hasattr(m, "run_main") else m.main(h)  # its next position: one step a chunk
            self.main_steps += 1
            if self.s is None:
                self.s = z.float()  # s_0 = z_0
            else:
                pc = p.float().clamp(1e-4, 1 - 1e-4)
                self.s = pc * z.float() + (1 - pc) * self.s
            self.chunks += 1
        up = self.s.to(h.dtype)
        y = m.decoder(up + m.residual_proj(h))  # STE(c) is exactly 1 in the forward pass
        return m.logits(y)[0, -1]


@torch.no_grad()
def full_forward(trainer, model, hp, window: list[int]):
    """(logits (T, V), boundaries (T,)) of the trainer's own forward over a window, padded to
    TRAIN_SEQ_LEN: the reference the cached path must match."""
    seq, n = hp.train_seq_len, len(window)
    device = model.tok_emb.weight.device
    ids = torch.tensor([window + [window[-1]] * (seq - n)], device=device)  # padding after: unseen by causality
    routed = []
    hook = model.routing.register_forward_hook(lambda mod, i, out: routed.append(out)) if hp.is_hnet else None
    try:
        x = model.hidden_states(ids)[0]
    finally:
        if hook is not None:
            hook.remove()
    cuts = routed[0].boundary_mask[0, :n] if routed else torch.zeros(n, dtype=torch.bool)
    return model.logits(x)[0, :n], cuts


class Sample(NamedTuple):
    ids: list  # the prompt's ids then the continuation's (BOS first)
    boundaries: list  # per id: did the router start a chunk there (in the window it was read in)
    prompt_len: int
    seconds: float
    main_steps: int  # main-stage positions computed (the cached path), or 0


def pick(logits, temperature: float, top_k: int, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=gen))


def sample(trainer, model, hp, prompt: list[int], n: int, temperature: float = 0.8, top_k: int = 40,
           seed: int = 0, cache: bool = True, on_logits=None, token_bytes=None) -> Sample:
    """Continue `prompt` (token ids, BOS first) until the continuation is n tokens, or, with
    token_bytes (bytes per id), n bytes. on_logits(start, position, logits) sees every prediction
    the cached path makes, with its window's start (tests compare each with the full forward over
    ids[start:position + 1])."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids, cuts = list(prompt), [False] * len(prompt)
    seq, start, fed, main_steps = hp.train_seq_len, 0, 0, 0
    t0 = time.perf_counter()
    inc = IncrementalModel(trainer, model, hp) if cache else None
    with inc if inc else contextlib.nullcontext():
        while True:
            if len(ids) - start > seq:  # the window is full: keep its second half, read it afresh
                start, fed = len(ids) - seq // 2, 0
            if inc:
                if fed == 0:
                    main_steps += inc.main_steps
                    inc.reset()
                while fed < len(ids) - start:  # the window's tokens not fed yet (all, after a slide)
                    logits = inc.feed(ids[start + fed])
                    cuts[start + fed] = inc.boundaries[-1]
                    if on_logits:
                        on_logits(start, start + fed, logits)
                    fed += 1
            else:
                window_logits, window_cuts = full_forward(trainer, model, hp, ids[start:])
                cuts[start:] = window_cuts.tolist()
                logits = window_logits[-1]
            made = ids[len(prompt):]
            if (sum(token_bytes[i] for i in made) if token_bytes is not None else len(made)) >= n:
                break
            ids.append(pick(logits, temperature, top_k, gen))
            cuts.append(False)
    main_steps += inc.main_steps if inc else 0
    return Sample(ids, cuts, len(prompt), time.perf_counter() - t0, main_steps)


SPECIALS = {0: "<pad>", 1: "<bos>", 2: "<eos>", 3: "<unk>"}


def marked_text(hp, ids: list[int], cuts: list[bool], prompt_len: int) -> tuple[str, bool]:
    """The text with each chunk in [ ] (the boundary view's marking) and a "|" where the
    continuation begins; control ids shown by name. Returns it and whether any bytes were not valid
    UTF-8 (shown as replacement characters)."""
    import codecs

    import boundaries

    texts = boundaries.token_texts(hp, torch.tensor(ids))
    decode = codecs.getincrementaldecoder("utf-8")("replace")
    out, bad = [], False
    for i, (token, text, cut) in enumerate(zip(ids, texts, cuts)):
        if i == prompt_len:
            out.append("|")
        if cut and hp.is_hnet:
            out.append("][" if i else "[")
        if not text:
            shown = SPECIALS.get(token, f"<{token}>") if not hp.uses_sentencepiece or token < 4 else ""
        else:
            shown = decode.decode(text)
            bad = bad or "\ufffd" in shown
        out.append(shown)
    tail = decode.decode(b"", final=True)
    bad = bad or "\ufffd" in tail
    out.append(tail + ("]" if hp.is_hnet else ""))
    return "".join(out).replace("[]", ""), bad


def text_ids(trainer, hp, text: str) -> list[int]:
    """A prompt as the model's ids, BOS first: UTF-8 bytes + 4 (byte260), or SentencePiece pieces."""
    if hp.uses_sentencepiece:
        import sentencepiece as spm

        return [BOS] + spm.SentencePieceProcessor(model_file=hp.tokenizer_path).encode(text)
    return [BOS] + [b + 4 for b in text.encode("utf-8")]


def bytes_per_id(trainer, hp) -> list[int]:
    """What each id adds to the text (its leading space counted): the continuation's byte budget."""
    luts = trainer.build_byte_luts(hp, torch.device("cpu"))
    return (luts.base_bytes + luts.has_leading_space.long()).tolist()


def report(trainer, model, hp, prompt: str, n_bytes: int, temperature: float, top_k: int, seed: int,
           cache: bool) -> dict:
    """Sample and describe it: the marked text, its bytes, the decoding speed."""
    per_id = bytes_per_id(trainer, hp)
    ids = text_ids(trainer, hp, prompt)
    s = sample(trainer, model, hp, ids, n_bytes, temperature, top_k, seed, cache=cache, token_bytes=per_id)
    made = sum(per_id[i] for i in s.ids[s.prompt_len:])
    text, bad = marked_text(hp, s.ids, s.boundaries, s.prompt_len)
    return {"text": text, "invalid_utf8": bad, "bytes": made, "tokens": len(s.ids) - s.prompt_len,
            "seconds": s.seconds, "bytes_per_s": made / max(s.seconds, 1e-9), "cache": cache,
            "main_steps": s.main_steps, "chunks": sum(s.boundaries[s.prompt_len:])}


def print_report(r: dict) -> None:
    how = "cached" if r["cache"] else "no cache: a full forward per token"
    print(f"sample ({r['bytes']} bytes in {r['tokens']} tokens, {r['chunks']} chunks; {r['bytes_per_s']:,.0f} bytes/s, "
          f"{how}); each chunk in [ ], the continuation after |:")
    print(r["text"])
    if r["invalid_utf8"]:
        print("(some sampled bytes were not valid UTF-8: shown as \ufffd)")
