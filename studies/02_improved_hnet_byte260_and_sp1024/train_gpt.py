"""Study 02: the improved byte-level H-Net (1-stage dynamic chunking) for Parameter Golf.

Trains an H-Net (encoder -> router -> chunk -> main stage -> dechunk -> decoder) on byte260 or
sp1024 shards, then exports a GPTQ int6 + zstd-22 artifact (and an int8 + zlib one beside it),
reads both back and scores them in bits per byte, non-overlapping and sliding-window.

    torchrun --standalone --nproc_per_node=8 studies/02_improved_hnet_byte260_and_sp1024/train_gpt.py

All configuration comes from environment variables (see Hyperparameters); a bare run is the
study's headline byte260 H-Net. The same code runs on CPU (gloo, fp32, no compile) and on CUDA
(NCCL, bf16 autocast, torch.compile). This file's bytes are the artifact's counted code, so it is
self-contained and kept under the challenge's 1,500-line cap.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import glob
import hashlib
import io
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import zstandard
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------
# HYPERPARAMETERS
# Every knob is an environment variable NAME read into field `name` by from_env(), the
# challenge's convention. Defaults are the study's headline byte260 run; runs.json beside this
# file holds the exact env of every published and CPU run.
# ----------------------------------------------------------------------------------------------

# Unknown variables starting with one of these are errors (they can only be meant for us).
OWN_PREFIXES = ("HNET_", "GPTQ_", "EVAL_", "TRAIN_", "VAL_", "MUON_", "LATE_QAT_", "EMA_", "CHUNK_",
                "RATIO_", "OUTER_", "TARGET_AVG_", "TIED_EMBED_", "SUBMISSION_", "CHECKPOINT_", "PRUNE_")


@dataclass
class Hyperparameters:
    # data and outputs
    data_path: str = "./data/byte260_export/datasets/fineweb10B_byte260"
    tokenizer_path: str = ""  # "" or a .json: byte260; a .model file: SentencePiece
    vocab_size: int = 260
    run_id: str = ""  # default: a fresh timestamped id
    output_dir: str = ""  # default: runs/<RUN_ID>
    seed: int = 1337
    # schedule (steps are optimizer steps over TRAIN_BATCH_TOKENS global tokens)
    iterations: int = 20000
    warmdown_iters: int = 1200
    warmup_steps: int = 20  # compile-priming steps, undone before training starts
    max_wallclock_seconds: float = 600.0  # 0: no cap
    val_loss_every: int = 1000
    train_log_every: int = 200
    train_batch_tokens: int = 524288
    train_seq_len: int = 2048
    val_max_tokens: int = 0  # 0: the whole validation split
    # model
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    num_layers: int = 12
    outer_layers: int = 3  # encoder and decoder blocks each; 0 is a plain GPT baseline
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    tied_embed_init_std: float = 0.005
    # dynamic chunking
    target_avg_chunk_len: float = 6.0
    ratio_loss_weight: float = 0.05
    chunk_divisor: int = 4
    hnet_lr_diff: float = 0.75
    # optimisers
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    tied_embed_lr: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    grad_clip_norm: float = 0.0  # 0: off
    # study 02 training extras
    late_qat_threshold: float = 0.15  # QAT switches on once the LR multiplier drops below this
    ema_decay: float = 0.0  # 0: off
    compile_model: int = -1  # -1: on for CUDA, off for CPU
    checkpoint_every: int = 0  # 0: only at the end
    resume_from: str = ""
    # evaluation and export
    eval_stride: int = 64
    eval_batch_seqs: int = 32
    eval_sliding: int = 1
    dynamic_cap: int = 0
    gptq_calib_batches: int = 16
    gptq_reserve_seconds: float = 30.0
    gptq_block_size: int = 128
    gptq_damp: float = 0.01
    prune_pct: float = 0.03
    keep_float_max_numel: int = 65536  # float tensors this small skip quantisation (CPU-size runs lower it)
    submission_author: str = ""
    submission_name: str = ""

    @classmethod
    def from_env(cls, env: dict | None = None) -> tuple["Hyperparameters", list[str]]:
        """Parse env into a config; returns it and a list of warnings (likely misspellings)."""
        env = os.environ if env is None else env
        known = {f.name.upper(): f for f in fields(cls)}
        values, warnings = {}, []
        for name, f in known.items():
            if name not in env:
                continue
            raw = env[name].strip()
            try:
                values[f.name] = raw if f.type == "str" else (int(raw) if f.type == "int" else float(raw))
            except ValueError:
                raise ConfigError(f"{name}={env[name]!r} is not a valid {f.type}") from None
        for name in env:
            if name in known:
                continue
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.88)
            hint = f": did you mean {close[0]}?" if close else " (see the fields of Hyperparameters)"
            if name.startswith(OWN_PREFIXES):
                raise ConfigError(f"unknown variable {name}{hint}")
            if close:
                warnings.append(f"{name} is not a known variable{hint}")
        hp = cls(**values)
        hp.check()
        return hp, warnings

    def check(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)
        for name in ("vocab_size", "train_seq_len", "train_batch_tokens", "model_dim", "num_heads",
                     "num_kv_heads", "mlp_mult", "num_layers", "chunk_divisor", "eval_stride",
                     "eval_batch_seqs", "gptq_block_size"):
            need(getattr(self, name) > 0, f"{name.upper()} must be a positive integer, got {getattr(self, name)}")
        need(self.vocab_size <= 65536, f"VOCAB_SIZE={self.vocab_size} does not fit the uint16 shards")
        need(self.model_dim % self.num_heads == 0, f"MODEL_DIM={self.model_dim} must divide by NUM_HEADS={self.num_heads}")
        need((self.model_dim // self.num_heads) % 2 == 0, "MODEL_DIM // NUM_HEADS must be even (RoPE)")
        need(self.num_heads % self.num_kv_heads == 0, f"NUM_HEADS={self.num_heads} must divide by NUM_KV_HEADS={self.num_kv_heads}")
        need(0 <= 2 * self.outer_layers < self.num_layers,
             f"OUTER_LAYERS={self.outer_layers} leaves no main stage in NUM_LAYERS={self.num_layers}")
        need(self.target_avg_chunk_len > 1, f"TARGET_AVG_CHUNK_LEN must exceed 1, got {self.target_avg_chunk_len}")
        need(0 < self.hnet_lr_diff, f"HNET_LR_DIFF must be positive, got {self.hnet_lr_diff}")
        need(self.eval_stride <= self.train_seq_len, f"EVAL_STRIDE={self.eval_stride} exceeds TRAIN_SEQ_LEN")
        need(0 <= self.prune_pct < 1, f"PRUNE_PCT must be in [0, 1), got {self.prune_pct}")
        need(0 <= self.ema_decay < 1, f"EMA_DECAY must be in [0, 1), got {self.ema_decay}")

    @property
    def is_hnet(self) -> bool:
        return self.outer_layers > 0

    @property
    def uses_sentencepiece(self) -> bool:
        return self.tokenizer_path.endswith(".model")


class ConfigError(ValueError):
    """A configuration or input problem; the message names the variable or file."""


class TrainingStopped(RuntimeError):
    """A run stopped early (NaN loss, signal); carries the process exit code."""

    def __init__(self, msg: str, exit_code: int):
        super().__init__(msg)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------------------------
# MUON
# Muon (from the modded-nanogpt speedruns, as in the challenge baseline): SGD-momentum whose
# update is orthogonalised by a quintic Newton-Schulz iteration. In DDP each rank
# orthogonalises every world_size-th matrix and one flat fp32 buffer is all-reduced.
# ----------------------------------------------------------------------------------------------

def zeropower_via_newtonschulz5(g: Tensor, steps: int, dtype: torch.dtype) -> Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315  # coefficients tuned for fast convergence near 0
    x = g.to(dtype)
    x = x / (x.norm() + 1e-7)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, backend_steps: int, rank: int,
                 world_size: int, ns_dtype: torch.dtype):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps))
        self.rank, self.world_size, self.ns_dtype = rank, world_size, ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = group["params"]
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.float32)
            offset = 0
            for i, p in enumerate(params):
                # Momentum is kept on every rank (cheap) so that rank 0's state is the whole state.
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                if i % self.world_size == self.rank:
                    g = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                    g = zeropower_via_newtonschulz5(g, group["backend_steps"], self.ns_dtype)
                    g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    flat[offset:offset + p.numel()] = g.flatten().float()
                offset += p.numel()
            if self.world_size > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                p.add_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


# ----------------------------------------------------------------------------------------------
# BPB EVALUATION
# Tokenizer-agnostic bits per byte: CE nats of every scored target over the UTF-8 bytes those
# targets stand for. Byte counts come from per-token lookup tables; the sum over the val split
# equals the raw byte count of the val documents (tests/test_bpb.py checks it).
# ----------------------------------------------------------------------------------------------

class ByteLuts(NamedTuple):
    base_bytes: Tensor  # (V,) int64 UTF-8 bytes of the piece without its leading "▁"
    has_leading_space: Tensor  # (V,) bool, piece starts with "▁" (one more byte unless after a control token)
    is_control: Tensor  # (V,) bool, control/unknown/unused ids (count 0, and no space after them)


def build_byte_luts(hp: Hyperparameters, device: torch.device) -> ByteLuts:
    v = hp.vocab_size
    base = np.zeros(v, dtype=np.int64)
    lead = np.zeros(v, dtype=bool)
    control = np.zeros(v, dtype=bool)
    if hp.uses_sentencepiece:
        if not os.path.isfile(hp.tokenizer_path):
            raise ConfigError(f"TOKENIZER_PATH={hp.tokenizer_path}: file not found")
        sp = spm.SentencePieceProcessor(model_file=hp.tokenizer_path)
        if sp.vocab_size() != v:
            raise ConfigError(f"TOKENIZER_PATH={hp.tokenizer_path} has vocab {sp.vocab_size()} but VOCAB_SIZE={v}")
        for i in range(v):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                control[i] = True
            elif sp.is_byte(i):
                base[i] = 1
            else:
                piece = sp.id_to_piece(i)
                lead[i] = piece.startswith("\u2581")
                base[i] = len(piece.lstrip("\u2581").encode("utf-8")) if lead[i] else len(piece.encode("utf-8"))
    else:
        if v != 260:
            raise ConfigError(f"VOCAB_SIZE={v} but TOKENIZER_PATH={hp.tokenizer_path!r} means byte260 (vocab 260)")
        base[4:] = 1  # ids 0-3 are pad/bos/eos/unk; id b+4 is byte b
        control[:4] = True
    as_t = lambda a: torch.from_numpy(a).to(device)
    return ByteLuts(as_t(base), as_t(lead), as_t(control))


def target_bytes(luts: ByteLuts, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
    """UTF-8 bytes each target stands for, given the token before it. Shapes (B, L)."""
    return luts.base_bytes[target_ids] + (luts.has_leading_space[target_ids] & ~luts.is_control[prev_ids]).long()


class EvalResult(NamedTuple):
    val_loss: float  # mean nats per scored token
    val_bpb: float
    tokens: int  # scored targets
    bytes: int


def eval_windows(total_targets: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored offset) for each window so every target is scored exactly once.

    Windows of seq_len start every `stride` tokens; each scores only the targets no earlier
    window scored (all of the first window, the last `stride` of the others), and a final window
    ending at the last target scores the tail. stride == seq_len is the non-overlapping eval."""
    if total_targets < seq_len:
        raise ConfigError(f"validation has {total_targets} targets, fewer than TRAIN_SEQ_LEN={seq_len}")
    starts = list(range(0, total_targets - seq_len + 1, stride))
    if starts[-1] + seq_len < total_targets:
        starts.append(total_targets - seq_len)
    windows, scored_until = [], 0
    for s in starts:
        windows.append((s, scored_until - s if scored_until > s else 0))
        scored_until = s + seq_len
    return windows


@torch.no_grad()
def evaluate_bpb(model: nn.Module, rt: "Runtime", hp: Hyperparameters, val_tokens: Tensor, luts: ByteLuts,
                 stride: int | None = None, dynamic_cap: bool = False) -> EvalResult:
    seq_len, stride = hp.train_seq_len, stride or hp.train_seq_len
    windows = eval_windows(val_tokens.numel() - 1, seq_len, stride)
    mine = windows[rt.rank::rt.world_size]
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # nats, tokens, bytes
    was_training = model.training
    model.eval()
    positions = torch.arange(seq_len, device=rt.device)
    for i in range(0, len(mine), hp.eval_batch_seqs):
        batch = mine[i:i + hp.eval_batch_seqs]
        span = torch.stack([val_tokens[s:s + seq_len + 1] for s, _ in batch]).to(rt.device, torch.int64)
        x, y = span[:, :-1], span[:, 1:]
        first = torch.tensor([f for _, f in batch], device=rt.device)
        with rt.autocast():
            nll = model(x, y, dynamic_cap=dynamic_cap).loss
        scored = positions[None, :] >= first[:, None]
        sums[0] += (nll.double() * scored).sum()
        sums[1] += scored.sum()
        sums[2] += (target_bytes(luts, x, y) * scored).sum()
    if rt.world_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    model.train(was_training)
    nats, tokens, nbytes = sums.tolist()
    return EvalResult(nats / tokens, nats / math.log(2) / nbytes, int(tokens), int(nbytes))


# ----------------------------------------------------------------------------------------------
# EXPORT (quantisation and compression)
# Two formats, both a torch.save'd dict that also records the trainer (path, sha256) and the
# config, so eval_bpb.py can rebuild the model: int8 per-row + zlib-9 (the baseline's export),
# and GPTQ int6 + pruning + zstd-22 (this study's). The score is always the round trip.
# ----------------------------------------------------------------------------------------------

SIZE_CAP_BYTES = 16_000_000
CONTROL_NAMES = ("resid_mix", "skip_weights", "q_gain", "attn_scale", "mlp_scale")  # kept in fp32
INT8_CLIP_QUANTILE = 0.9999984
INT6_MAX = 31
INT6_CLIP_QUANTILES = (1.0, 0.9999, 0.999, 0.995)


def code_bytes() -> int:
    return len(Path(__file__).read_bytes())


def trainer_record() -> dict:
    here = Path(__file__).resolve()
    return {"path": os.path.relpath(here, Path.cwd()), "study_file": f"{here.parent.name}/{here.name}",
            "sha256": hashlib.sha256(here.read_bytes()).hexdigest()}


def keep_small(name: str, t: Tensor) -> Tensor:
    return t.float() if any(k in name for k in CONTROL_NAMES) else t.half()


def quantize_int8_rows(w: Tensor, clip_quantile: float = INT8_CLIP_QUANTILE) -> tuple[Tensor, Tensor]:
    w = w.float()
    clip = torch.quantile(w.abs(), clip_quantile, dim=1).clamp_min(1e-12)
    scale = (clip / 127.0).half()
    q = torch.clamp(torch.round(w.clamp(-clip[:, None], clip[:, None]) / scale.float()[:, None]), -127, 127)
    return q.to(torch.int8), scale


def quantize_int6_rows(w: Tensor, clip_quantile: float = 1.0) -> tuple[Tensor, Tensor]:
    """Round-to-nearest per-row int6: the export without a Hessian, and late QAT's forward."""
    w = w.float()
    clip = (w.abs().amax(dim=1) if clip_quantile >= 1.0 else torch.quantile(w.abs(), clip_quantile, dim=1))
    scale = (clip.clamp_min(1e-12) / INT6_MAX).half()
    q = torch.clamp(torch.round(w / scale.float()[:, None]), -INT6_MAX, INT6_MAX)
    return q.to(torch.int8), scale


def gptq_quantize_int6(w: Tensor, hessian: Tensor, block_size: int, damp: float,
                       clip_quantile: float) -> tuple[Tensor, Tensor]:
    """GPTQ (Frantar et al. 2022): quantise columns in Hessian order, spreading each column's
    error onto the not-yet-quantised columns through the inverse Hessian's Cholesky factor."""
    w = w.float().clone()
    h = hessian.float().clone()
    cols = w.size(1)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(cols, device=h.device)
    _, scale = quantize_int6_rows(w, clip_quantile)
    s = scale.float()[:, None]
    perm = torch.argsort(torch.diag(h), descending=True)  # act-order: most active inputs first
    w, h = w[:, perm], h[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        wb, hb = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err = torch.zeros_like(wb)
        for i in range(i2 - i1):
            qi = torch.clamp(torch.round(wb[:, i:i + 1] / s), -INT6_MAX, INT6_MAX)
            q[:, i1 + i] = qi[:, 0]
            e = (wb[:, i:i + 1] - qi * s) / hb[i, i]
            wb[:, i:] -= e * hb[i:i + 1, i:]
            err[:, i:i + 1] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    return q.to(torch.int8), scale


def quantize_int6_best(w: Tensor, hessian: Tensor | None, hp: Hyperparameters) -> tuple[Tensor, Tensor]:
    """Per row, the clip quantile whose quantisation error (weighted by H when known) is least."""
    h = hessian if hessian is not None else torch.eye(w.size(1), device=w.device)
    best_q, best_s, best_err = None, None, None
    for cq in INT6_CLIP_QUANTILES:
        if hessian is None:
            q, s = quantize_int6_rows(w, cq)
        else:
            q, s = gptq_quantize_int6(w, hessian, hp.gptq_block_size, hp.gptq_damp, cq)
        d = w.float() - q.float() * s.float()[:, None]
        err = ((d @ h) * d).sum(dim=1)  # per-row output error d H d^T
        if best_err is None:
            best_q, best_s, best_err = q, s, err
        else:
            better = err < best_err
            best_q = torch.where(better[:, None], q, best_q)
            best_s = torch.where(better, s, best_s)
            best_err = torch.minimum(err, best_err)
    return best_q, best_s


def prune_smallest(q: Tensor, scale: Tensor, pct: float) -> Tensor:
    """Zero the pct smallest-magnitude quantised weights (zeros compress well under zstd)."""
    k = int(round(pct * q.numel()))
    if k == 0:
        return q
    magnitude = (q.float().abs() * scale.float()[:, None]).flatten()
    idx = torch.argsort(magnitude, stable=True)[:k]
    q = q.flatten().clone()
    q[idx] = 0
    return q.view(scale.numel(), -1)


def quantize_state_dict(state: dict[str, Tensor], fmt: str, hp: Hyperparameters,
                        hessians: dict[str, Tensor] | None = None) -> dict:
    tensors = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if not t.is_floating_point() or t.numel() <= hp.keep_float_max_numel or t.ndim != 2:
            tensors[name] = {"w": keep_small(name, t) if t.is_floating_point() else t}
        elif fmt == "int8" or name == "tok_emb.weight":
            q, s = quantize_int8_rows(t)
            tensors[name] = {"q": q, "scale": s, "bits": 8}
        else:
            h = (hessians or {}).get(name)
            q, s = quantize_int6_best(t, None if h is None else h.cpu(), hp)
            tensors[name] = {"q": prune_smallest(q, s, hp.prune_pct), "scale": s, "bits": 6}
    return {"format": fmt, "trainer": trainer_record(), "config": asdict(hp), "tensors": tensors}


def dequantize_state_dict(payload: dict) -> dict[str, Tensor]:
    out = {}
    for name, e in payload["tensors"].items():
        if "q" in e:
            out[name] = e["q"].float() * e["scale"].float()[:, None]
        else:
            out[name] = e["w"].float() if e["w"].is_floating_point() else e["w"]
    return out


def compress(payload: dict, fmt: str) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf)
    raw = buf.getvalue()
    return zlib.compress(raw, 9) if fmt == "int8" else zstandard.ZstdCompressor(level=22).compress(raw)


def read_artifact(path: str | Path) -> dict:
    """Decompress (zlib or zstd, told by the magic bytes) and unpickle safely; clear errors."""
    blob = Path(path).read_bytes()
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob) if blob[:4] == b"\x28\xb5\x2f\xfd" else zlib.decompress(blob)
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # zlib.error, zstandard.ZstdError, pickle errors: all mean a bad file
        raise ConfigError(f"{path}: not a readable artifact (corrupt or truncated?): {e}") from None
    if not isinstance(payload, dict) or "tensors" not in payload or "config" not in payload:
        raise ConfigError(f"{path}: decompressed, but it is not an artifact of this trainer")
    return payload


def write_atomic(path: str | Path, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def save_atomic(obj, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def model_from_payload(payload: dict, device: torch.device) -> "HNet":
    hp = Hyperparameters(**{k: v for k, v in payload["config"].items() if k in {f.name for f in fields(Hyperparameters)}})
    model = HNet(hp).to(device)
    try:
        model.load_state_dict(dequantize_state_dict(payload), strict=True)
    except RuntimeError as e:
        raise ConfigError(f"artifact tensors do not fit the model its config describes: {e}") from None
    return model


# ----------------------------------------------------------------------------------------------
# DATA
# Challenge shards: a 256 x int32 header (magic, version, token count) then uint16 ids. Train
# shards are read in sorted order as one wrapping stream; each micro-step takes one contiguous
# span and gives each rank its own slice, so 1, 2, 4 or 8 processes see the same global batch.
# ----------------------------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


def load_data_shard(path: str | Path, vocab_size: int | None = None) -> Tensor:
    path = Path(path)
    try:
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read shard: {e}") from None
    if header.size != HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ConfigError(f"{path}: not a shard (expected magic {SHARD_MAGIC}, version {SHARD_VERSION})")
    n = int(header[2])
    expected = HEADER_INTS * 4 + 2 * n
    if path.stat().st_size != expected:
        raise ConfigError(f"{path}: size {path.stat().st_size} bytes, header says {n} tokens = {expected} bytes")
    tokens = np.fromfile(path, dtype="<u2", count=n, offset=HEADER_INTS * 4)
    if vocab_size is not None and n and int(tokens.max()) >= vocab_size:
        raise ConfigError(f"{path}: holds id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}; "
                          "was it exported with another tokenizer?")
    return torch.from_numpy(tokens.astype(np.int32))


def shard_files(hp: Hyperparameters, split: str) -> list[str]:
    if not os.path.isdir(hp.data_path):
        raise ConfigError(f"DATA_PATH={hp.data_path}: no such directory (see README, Data)")
    files = sorted(glob.glob(os.path.join(hp.data_path, f"fineweb_{split}_*.bin")))
    if not files:
        raise ConfigError(f"DATA_PATH={hp.data_path}: no fineweb_{split}_*.bin shards")
    return files


class TokenStream:
    """The train shards as one endless stream; (file index, position) is its whole state."""

    def __init__(self, files: list[str], vocab_size: int):
        self.files, self.vocab_size = files, vocab_size
        self.load_state({"file": 0, "pos": 0})

    def state(self) -> dict:
        return {"file": self.file, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.file, self.pos = state["file"], state["pos"]
        self.tokens = load_data_shard(self.files[self.file], self.vocab_size)

    def take(self, n: int) -> Tensor:
        parts = []
        while n > 0:
            if self.pos >= self.tokens.numel():
                self.load_state({"file": (self.file + 1) % len(self.files), "pos": 0})
                continue
            part = self.tokens[self.pos:self.pos + n]
            parts.append(part)
            self.pos += part.numel()
            n -= part.numel()
        return torch.cat(parts)


class DistributedTokenLoader:
    def __init__(self, hp: Hyperparameters, rt: "Runtime"):
        self.stream = TokenStream(shard_files(hp, "train"), hp.vocab_size)
        self.rt, self.seq_len = rt, hp.train_seq_len
        self.local_tokens = hp.train_batch_tokens // (rt.world_size * rt.grad_accum_steps)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        span = self.local_tokens + 1  # one extra token: the last target
        chunk = self.stream.take(span * self.rt.world_size)
        local = chunk[self.rt.rank * span:(self.rt.rank + 1) * span].to(self.rt.device, torch.int64)
        return local[:-1].view(-1, self.seq_len), local[1:].view(-1, self.seq_len)


def load_validation_tokens(hp: Hyperparameters) -> Tensor:
    tokens = torch.cat([load_data_shard(f, hp.vocab_size) for f in shard_files(hp, "val")])
    if hp.val_max_tokens > 0:
        tokens = tokens[:hp.val_max_tokens + 1]
    if hp.uses_sentencepiece and tokens.numel() > 100_000 and int(tokens.max()) < 260:
        raise ConfigError(f"DATA_PATH={hp.data_path} holds only ids < 260 (byte260 data?) "
                          f"but TOKENIZER_PATH={hp.tokenizer_path} is a SentencePiece model")
    return tokens


# ----------------------------------------------------------------------------------------------
# MODEL
# The Parameter Golf baseline block (x0 residual mix, GQA attention with q/k RMS-norm, RoPE and a
# learned q gain, relu^2 MLP, zero-init output projections) grouped into U-Net-style stages.
# An H-Net runs three stages (encoder, main, decoder); OUTER_LAYERS=0 runs one (a plain GPT).
# ----------------------------------------------------------------------------------------------

class CastedLinear(nn.Linear):
    """Bias-free linear with fp32 master weights cast to the activation dtype. Late QAT: the
    `qat_delta` buffer holds (int6 rounding of the weight) - (weight), refreshed once per optimizer
    step, zeros before QAT. The training forward adds it, so it sees int6 weights while gradients
    reach the float ones (straight through); a buffer, so compiled graphs need no recompile."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)
        self.register_buffer("qat_delta", torch.zeros_like(self.weight), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight + self.qat_delta if self.training else self.weight
        return F.linear(x, w.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        angles = torch.outer(torch.arange(length, device=self.inv_freq.device, dtype=torch.float32), self.inv_freq)
        return angles.cos().to(dtype)[None, None], angles.sin().to(dtype)[None, None]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.num_heads, self.num_kv_heads = hp.num_heads, hp.num_kv_heads
        self.head_dim = hp.model_dim // hp.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(hp.model_dim, hp.model_dim)
        self.c_k = CastedLinear(hp.model_dim, kv_dim)
        self.c_v = CastedLinear(hp.model_dim, kv_dim)
        self.proj = CastedLinear(hp.model_dim, hp.model_dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((hp.num_heads,), hp.qk_gain_init))
        self.rotary = Rotary(self.head_dim, hp.rope_base)

    def forward(self, x: Tensor) -> Tensor:
        b, length, d = x.shape
        q = self.c_q(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        cos, sin = self.rotary(length, q.dtype)
        q = apply_rotary(q, cos, sin) * self.q_gain.to(q.dtype)[None, :, None, None]
        k = apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.proj(y.transpose(1, 2).reshape(b, length, d))


class MLP(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.fc = CastedLinear(hp.model_dim, hp.mlp_mult * hp.model_dim)
        self.proj = CastedLinear(hp.mlp_mult * hp.model_dim, hp.model_dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.attn, self.mlp = CausalSelfAttention(hp), MLP(hp)
        self.attn_scale = nn.Parameter(torch.ones(hp.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(hp.model_dim))
        # Per-channel mix of the running stream with the stage input x0 (starts as "stream only").
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(hp.model_dim), torch.zeros(hp.model_dim))))

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(F.rms_norm(x, (x.size(-1),)))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(F.rms_norm(x, (x.size(-1),)))


class Stage(nn.Module):
    """Blocks with U-Net skips: the first half push their outputs, the second half add them back
    (popped, weighted per channel). Input and output are RMS-normalised."""

    def __init__(self, hp: Hyperparameters, num_blocks: int):
        super().__init__()
        self.num_push = num_blocks // 2
        self.blocks = nn.ModuleList(Block(hp) for _ in range(num_blocks))
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_push, num_blocks - self.num_push), hp.model_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x0 = F.rms_norm(x, (x.size(-1),))
        skips = []
        for i, block in enumerate(self.blocks):
            j = i - self.num_push
            if 0 <= j < self.skip_weights.size(0):
                x = x + self.skip_weights[j].to(x.dtype) * skips.pop()
            x = block(x, x0)
            if i < self.num_push:
                skips.append(x)
        return F.rms_norm(x, (x.size(-1),))


class ModelOutput(NamedTuple):
    loss: Tensor  # (B, L) next-token CE in nats, fp32
    ratio_loss: Tensor  # () the H-Net ratio loss; 0 for the plain GPT (never added in eval)
    boundary_mask: Tensor | None  # (B, L) bool, chunk starts; None for the plain GPT


class HNet(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.hp = hp
        self.tok_emb = nn.Embedding(hp.vocab_size, hp.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=hp.tied_embed_init_std)
        if hp.is_hnet:
            self.encoder = Stage(hp, hp.outer_layers)
            self.routing = RoutingModule(hp.model_dim)
            self.chunk = ChunkLayer()
            self.main = Stage(hp, hp.num_layers - 2 * hp.outer_layers)
            self.dechunk = DeChunkLayer()
            self.residual_proj = CastedLinear(hp.model_dim, hp.model_dim, zero_init=True)
            self.decoder = Stage(hp, hp.outer_layers)
        else:
            self.main = Stage(hp, hp.num_layers)

    def forward(self, input_ids: Tensor, target_ids: Tensor, dynamic_cap: bool = False) -> ModelOutput:
        x, ratio, boundary_mask = self.hidden_states(input_ids, dynamic_cap)
        loss = F.cross_entropy(self.logits(x).flatten(0, 1), target_ids.flatten(), reduction="none")
        return ModelOutput(loss.view_as(target_ids), ratio, boundary_mask)

    def logits(self, x: Tensor) -> Tensor:
        """Tied head with the baseline's soft cap 30 * tanh(x / 30), in fp32."""
        logits = F.linear(x, self.tok_emb.weight.to(x.dtype)).float()
        return self.hp.logit_softcap * torch.tanh(logits / self.hp.logit_softcap)

    def hidden_states(self, input_ids: Tensor, dynamic_cap: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """Final hidden states (B, L, D), the ratio loss and the boundary mask (None for a GPT)."""
        x = self.tok_emb(input_ids)
        ratio, boundary_mask = torch.zeros((), device=x.device), None
        if self.hp.is_hnet:
            h = self.encoder(x)  # (B, L, D)
            router = self.routing(h)
            cap = int(router.boundary_mask.sum(1).max()) if dynamic_cap else max(1, x.size(1) // self.hp.chunk_divisor)
            chunks = self.chunk(h, router, cap)
            z = self.main(ScaleGrad.apply(chunks.hidden, 1.0 / self.hp.hnet_lr_diff))  # (B, C, D)
            up = self.dechunk(z, chunks.probs, chunks.chunk_index)  # (B, L, D)
            x = ste_one(router.selected_probs)[..., None].to(up.dtype) * up + self.residual_proj(h)
            x = self.decoder(ScaleGrad.apply(x, self.hp.hnet_lr_diff))
            ratio, boundary_mask = ratio_loss(router, self.hp.target_avg_chunk_len), router.boundary_mask
        else:
            x = self.main(x)
        return x, ratio, boundary_mask


# ----------------------------------------------------------------------------------------------
# DYNAMIC CHUNKING
# H-Net's router, chunk and dechunk layers (Hwang, Wang, Gu 2025), named as in the paper's code.
# The router marks a boundary where adjacent encoder states disagree; the chunk layer keeps those
# positions (study 02: at most C = TRAIN_SEQ_LEN // CHUNK_DIVISOR, a static shape); the dechunk
# layer smooths chunk outputs with an EMA and hands each byte its chunk's state.
# ----------------------------------------------------------------------------------------------

class RoutingModuleOutput(NamedTuple):
    boundary_prob: Tensor  # (B, L) fp32 p_t in [0, 1], p_0 = 1
    boundary_mask: Tensor  # (B, L) bool, p_t >= 0.5
    selected_probs: Tensor  # (B, L) fp32 confidence: p_t at boundaries, 1 - p_t elsewhere


class RoutingModule(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q_proj, self.k_proj = CastedLinear(dim, dim), CastedLinear(dim, dim)
        with torch.no_grad():  # identity init: at first the router compares raw encoder states
            self.q_proj.weight.copy_(torch.eye(dim))
            self.k_proj.weight.copy_(torch.eye(dim))

    def forward(self, h: Tensor) -> RoutingModuleOutput:
        q = F.normalize(self.q_proj(h[:, 1:]).float(), dim=-1)
        k = F.normalize(self.k_proj(h[:, :-1]).float(), dim=-1)
        p = ((1 - (q * k).sum(-1)) / 2).clamp(0.0, 1.0)
        p = torch.cat((torch.ones_like(p[:, :1]), p), dim=1)  # the first position always starts a chunk
        mask = p >= 0.5
        return RoutingModuleOutput(p, mask, torch.where(mask, p, 1 - p))


class ChunkOutput(NamedTuple):
    hidden: Tensor  # (B, C) x D: encoder states at the first C boundaries, zero-padded
    probs: Tensor  # (B, C) boundary_prob there (0 on padding)
    chunk_index: Tensor  # (B, L) chunk each position reads: boundaries at or before it, minus 1, < C


class ChunkLayer(nn.Module):
    def forward(self, h: Tensor, router: RoutingModuleOutput, cap: int) -> ChunkOutput:
        b, length, d = h.shape
        counts = router.boundary_mask.long().cumsum(dim=1)  # (B, L) boundaries at or before t
        wanted = torch.arange(1, cap + 1, device=h.device).expand(b, cap).contiguous()
        pos = torch.searchsorted(counts, wanted)  # (B, C) where the c-th boundary is; L if none
        valid = pos < length
        pos = pos.clamp(max=length - 1)
        hidden = torch.gather(h, 1, pos[..., None].expand(b, cap, d)) * valid[..., None].to(h.dtype)
        probs = torch.gather(router.boundary_prob, 1, pos) * valid
        # Past the cap, later boundaries are dropped and their bytes read the last kept chunk.
        return ChunkOutput(hidden, probs, (counts - 1).clamp(0, cap - 1))


def linear_scan(a: Tensor, b: Tensor) -> Tensor:
    """s_c = a_c * s_{c-1} + b_c (s_{-1} = 0) along dim 1 in log2(C) steps (Hillis-Steele scan).
    a: (B, C, 1), b: (B, C, D). Products of a only shrink, so nothing overflows."""
    offset, length = 1, a.size(1)
    while offset < length:
        a_prev = torch.cat((torch.ones_like(a[:, :offset]), a[:, :-offset]), dim=1)
        b_prev = torch.cat((torch.zeros_like(b[:, :offset]), b[:, :-offset]), dim=1)
        a, b = a * a_prev, a * b_prev + b
        offset *= 2
    return b


class DeChunkLayer(nn.Module):
    def forward(self, z: Tensor, probs: Tensor, chunk_index: Tensor) -> Tensor:
        p = probs.float().clamp(1e-4, 1 - 1e-4)[..., None]  # (B, C, 1)
        a = torch.cat((torch.zeros_like(p[:, :1]), 1 - p[:, 1:]), dim=1)  # s_0 = z_0
        zf = z.float()
        b = torch.cat((zf[:, :1], p[:, 1:] * zf[:, 1:]), dim=1)
        s = linear_scan(a, b).to(z.dtype)  # (B, C, D)
        return torch.gather(s, 1, chunk_index[..., None].expand(-1, -1, s.size(-1)))


class ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times `scale` backward (H-Net's per-stage learning-rate split)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def ste_one(c: Tensor) -> Tensor:
    """Forward value exactly 1 (c - c is exactly 0), gradient passed to c."""
    return 1.0 + (c - c.detach())


def ratio_loss(router: RoutingModuleOutput, n: float) -> Tensor:
    """H-Net's ratio loss: 1 when both the hard boundary fraction F and the mean probability G
    equal 1/N, larger otherwise; only G carries gradient."""
    f = router.boundary_mask.float().mean()
    g = router.boundary_prob.mean()
    return n / (n - 1) * ((n - 1) * f * g + (1 - f) * (1 - g))


# ----------------------------------------------------------------------------------------------
# TRAINING
# main() is a handful of steps: set up device and processes, build the model and optimisers,
# train (checkpoints, wall-clock cap, late QAT, EMA), then export, read back and evaluate.
# Everything a step needs travels in one Run context.
# ----------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    grad_accum_steps: int = 8
    compile: bool = False

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.is_cuda else contextlib.nullcontext()

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize()


def setup_device(hp: Hyperparameters) -> Runtime:
    """Decide everything device-specific once: NCCL + bf16 + compile on CUDA, gloo + fp32 on CPU."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if 8 % world_size:
        raise ConfigError(f"WORLD_SIZE={world_size}: must divide 8 (grad accumulation is 8 / WORLD_SIZE)")
    if hp.train_batch_tokens % (8 * hp.train_seq_len):
        raise ConfigError(f"TRAIN_BATCH_TOKENS={hp.train_batch_tokens} must be a multiple of "
                          f"8 * TRAIN_SEQ_LEN = {8 * hp.train_seq_len}")
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), "nccl"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_flush_denormal(True)  # denormals slowed early H-Net steps ~5x on CPU
        if world_size > 1:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)
    compile_on = hp.compile_model == 1 or (hp.compile_model == -1 and device.type == "cuda")
    return Runtime(device, rank, world_size, 8 // world_size, compile_on)


class RunLog:
    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, msg: str, console: bool = True) -> None:
        if self.path is None:
            return
        if console:
            print(msg, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(msg + "\n")


@dataclass
class Run:
    hp: Hyperparameters
    rt: Runtime
    log: RunLog
    run_dir: Path
    model: HNet
    compiled: nn.Module
    optimizers: list
    loader: DistributedTokenLoader
    val_tokens: Tensor
    luts: ByteLuts
    step: int = 0
    training_time_ms: float = 0.0
    ema: dict | None = None
    qat: bool = False
    signal_received: int = 0


def build_optimizers(model: HNet, hp: Hyperparameters, rt: Runtime) -> list:
    """Muon for every linear's matrix (stages, router, residual projection); Adam for the tied
    embedding and for vectors and control tensors."""
    matrices = [m.weight for m in model.modules() if isinstance(m, CastedLinear)]
    taken = {id(p) for p in matrices} | {id(model.tok_emb.weight)}
    scalars = [p for p in model.parameters() if id(p) not in taken]

    def adam(params, lr):
        return torch.optim.Adam([{"params": params, "lr": lr, "base_lr": lr}], betas=(hp.beta1, hp.beta2),
                                eps=hp.adam_eps, weight_decay=0.0, fused=rt.is_cuda)
    muon = Muon(matrices, hp.matrix_lr, hp.muon_momentum, hp.muon_backend_steps, rt.rank, rt.world_size,
                torch.bfloat16 if rt.is_cuda else torch.float32)
    muon.param_groups[0]["base_lr"] = hp.matrix_lr
    return [adam([model.tok_emb.weight], hp.tied_embed_lr), muon, adam(scalars, hp.scalar_lr)]


def training_cap_ms(hp: Hyperparameters) -> float:
    """Wall-clock budget for the training loop; GPTQ's calibration comes out of the same budget."""
    return 1000.0 * max(hp.max_wallclock_seconds - hp.gptq_reserve_seconds, 0.0) if hp.max_wallclock_seconds > 0 else 0.0


def lr_multiplier(hp: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """No warmup; linear warmdown to 0 over the last WARMDOWN_ITERS steps, or, under a wall-clock
    cap, over the last WARMDOWN_ITERS x (mean step time) before the cap, whichever is lower."""
    if hp.warmdown_iters <= 0:
        return 1.0
    mul = min(max((hp.iterations - step) / hp.warmdown_iters, 0.0), 1.0)
    cap_ms = training_cap_ms(hp)
    if cap_ms > 0 and step > 0:
        warmdown_ms = hp.warmdown_iters * elapsed_ms / step
        mul = min(mul, max(cap_ms - elapsed_ms, 0.0) / max(warmdown_ms, 1e-9))
    return mul


def all_reduce_grads(model: nn.Module, rt: Runtime) -> None:
    params = list(model.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if rt.world_size == 1:
        return
    flat = torch.cat([p.grad.flatten().float() for p in params])  # fp32 buffer (gloo and NCCL alike)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= rt.world_size
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


@torch.no_grad()
def refresh_qat(model: nn.Module, on: bool) -> None:
    """Point every linear's training forward at its current int6 rounding (on) or at itself (off)."""
    for m in model.modules():
        if isinstance(m, CastedLinear):
            if on:
                q, scale = quantize_int6_rows(m.weight)
                m.qat_delta.copy_(q.float() * scale.float()[:, None] - m.weight)
            else:
                m.qat_delta.zero_()


def train_step(run: Run) -> Tensor:
    """One optimizer step over TRAIN_BATCH_TOKENS. Returns global sums (ce, ratio, chunks, bytes,
    micro-steps, non-finite count) without applying the update if the loss is not finite."""
    hp, rt = run.hp, run.rt
    stats = torch.zeros(6, device=rt.device, dtype=torch.float64)
    for _ in range(rt.grad_accum_steps):
        x, y = run.loader.next_batch()
        with rt.autocast():
            out = run.compiled(x, y)
            ce = out.loss.mean()
            loss = ce + hp.ratio_loss_weight * out.ratio_loss if hp.is_hnet else ce
        (loss / rt.grad_accum_steps).backward()
        chunks = out.boundary_mask.sum() if out.boundary_mask is not None else torch.tensor(x.numel(), device=rt.device)
        in_bytes = (run.luts.base_bytes[x] + run.luts.has_leading_space[x].long()).sum()
        stats += torch.stack((ce.detach().double(), out.ratio_loss.detach().double(), chunks.double(),
                              in_bytes.double(), torch.ones((), device=rt.device, dtype=torch.float64),
                              (~torch.isfinite(loss.detach())).double()))
    all_reduce_grads(run.model, rt)
    if rt.world_size > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    if stats[5].item() > 0:
        return stats
    if hp.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), hp.grad_clip_norm)
    mul = lr_multiplier(hp, run.step, run.training_time_ms)
    frac = min(run.step / hp.muon_momentum_warmup_steps, 1.0) if hp.muon_momentum_warmup_steps > 0 else 1.0
    run.optimizers[1].param_groups[0]["momentum"] = (1 - frac) * hp.muon_momentum_warmup_start + frac * hp.muon_momentum
    for opt in run.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * mul
        opt.step()
    run.model.zero_grad(set_to_none=True)
    if run.qat:
        refresh_qat(run.model, True)
    if run.ema is not None:
        with torch.no_grad():
            for name, p in run.model.state_dict().items():
                run.ema[name].mul_(hp.ema_decay).add_(p.float(), alpha=1 - hp.ema_decay)
    return stats


def checkpoint_state(run: Run) -> dict:
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if run.rt.is_cuda:
        rng["cuda"] = torch.cuda.get_rng_state()
    return {"model": run.model.state_dict(), "optimizers": [o.state_dict() for o in run.optimizers],
            "loader": run.loader.stream.state(), "step": run.step, "training_time_ms": run.training_time_ms,
            "rng": rng, "config": asdict(run.hp), "ema": run.ema,
            "qat": run.qat}


def save_checkpoint(run: Run) -> Path:
    path = run.run_dir / "checkpoints" / f"step_{run.step:06d}.pt"
    if run.rt.master:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(checkpoint_state(run), path)
        run.log(f"checkpoint:{path}")
    if run.rt.world_size > 1:
        dist.barrier()
    return path


SHAPE_FIELDS = ("vocab_size", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "num_layers", "outer_layers",
                "train_seq_len", "train_batch_tokens", "chunk_divisor")


def restore_state(run: Run, state: dict) -> None:
    """Put a checkpoint_state() back: weights, optimisers, data position, clock, EMA, QAT, RNG."""
    run.model.load_state_dict(state["model"])
    for opt, s in zip(run.optimizers, state["optimizers"]):
        opt.load_state_dict(s)
    run.loader.stream.load_state(state["loader"])
    run.step, run.training_time_ms, run.ema = state["step"], state["training_time_ms"], state["ema"]
    run.qat = state["qat"]
    refresh_qat(run.model, run.qat)
    torch.set_rng_state(state["rng"]["torch"].cpu())
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if run.rt.is_cuda and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())


def load_checkpoint(run: Run, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"RESUME_FROM={path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=run.rt.device, weights_only=False)
    except Exception as e:
        raise ConfigError(f"RESUME_FROM={path}: unreadable checkpoint: {e}") from None
    for name in SHAPE_FIELDS:
        if state["config"][name] != getattr(run.hp, name):
            raise ConfigError(f"RESUME_FROM={path} was trained with {name.upper()}={state['config'][name]}, "
                              f"this run has {getattr(run.hp, name)}")
    restore_state(run, state)
    run.log(f"resumed_from:{path} step:{run.step} train_time:{run.training_time_ms:.0f}ms")


def prime_compile(run: Run) -> None:
    """Run WARMUP_STEPS real steps so compilation and allocator warm-up happen off the clock, then
    restore everything a checkpoint holds (weights, optimisers, data position, ...): no trace."""
    if run.hp.warmup_steps <= 0:
        return
    snapshot = copy.deepcopy(checkpoint_state(run))  # state_dict tensors alias the live weights
    for _ in range(run.hp.warmup_steps):
        train_step(run)
    restore_state(run, snapshot)
    run.model.zero_grad(set_to_none=True)
    run.log(f"warmup_steps:{run.hp.warmup_steps} done (undone: weights, optimisers, data, RNG restored)")


def train(run: Run) -> None:
    hp, rt, log = run.hp, run.rt, run.log
    cap_ms, capped = training_cap_ms(hp), False
    while True:
        last = run.step >= hp.iterations or capped
        if last or (hp.val_loss_every > 0 and run.step % hp.val_loss_every == 0):
            res = evaluate_bpb(run.compiled, rt, hp, run.val_tokens, run.luts)
            log(f"step:{run.step}/{hp.iterations} val_loss:{res.val_loss:.4f} val_bpb:{res.val_bpb:.4f} "
                f"train_time:{run.training_time_ms:.0f}ms step_avg:{run.training_time_ms / max(run.step, 1):.2f}ms")
        if last:
            break
        if not run.qat and lr_multiplier(hp, run.step, run.training_time_ms) < hp.late_qat_threshold:
            run.qat = True
            refresh_qat(run.model, True)
            log(f"late_qat: on from step {run.step + 1}")
        rt.sync()
        t0 = time.perf_counter()
        stats = train_step(run)
        rt.sync()
        elapsed = torch.tensor([run.training_time_ms + 1000 * (time.perf_counter() - t0), float(run.signal_received)],
                               device=rt.device)
        if rt.world_size > 1:  # every rank stops on the same step
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if stats[5].item() > 0:
            ckpts = sorted((run.run_dir / "checkpoints").glob("step_*.pt"))
            keep = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
            raise TrainingStopped(f"non-finite loss at step {run.step + 1}; the update was not applied; {keep}", 3)
        run.training_time_ms = float(elapsed[0])
        run.step += 1
        ce, ratio, chunks, nbytes, micro = stats[:5].tolist()
        if hp.train_log_every > 0 and (run.step % hp.train_log_every == 0 or run.step <= 10):
            log(f"step:{run.step}/{hp.iterations} train_loss:{ce / micro:.4f} ratio_loss:{ratio / micro:.4f} "
                f"bytes_per_chunk:{nbytes / max(chunks, 1):.2f} train_time:{run.training_time_ms:.0f}ms "
                f"step_avg:{run.training_time_ms / run.step:.2f}ms")
        if elapsed[1] > 0:
            path = save_checkpoint(run)
            raise TrainingStopped(f"stopped by signal {int(elapsed[1])} after step {run.step}; to continue, "
                                  f"rerun with the same environment plus RESUME_FROM={path}", 128 + int(elapsed[1]))
        if hp.checkpoint_every > 0 and run.step % hp.checkpoint_every == 0:
            save_checkpoint(run)
        if cap_ms > 0 and run.training_time_ms >= cap_ms and run.step < hp.iterations:
            log(f"stopping_early: wallclock_cap train_time:{run.training_time_ms:.0f}ms step:{run.step}/{hp.iterations}")
            capped = True
    save_checkpoint(run)


@torch.no_grad()
def collect_hessians(run: Run) -> dict[str, Tensor]:
    """H = mean X^T X of the inputs of every large linear, over GPTQ_CALIB_BATCHES train batches."""
    sums, counts, hooks = {}, {}, []
    for name, m in run.model.named_modules():
        if isinstance(m, CastedLinear) and m.weight.numel() > run.hp.keep_float_max_numel:
            def hook(mod, inputs, output, key=f"{name}.weight"):
                x = inputs[0].detach().flatten(0, -2).float()
                sums[key] = sums.get(key, 0) + x.T @ x
                counts[key] = counts.get(key, 0) + x.size(0)
            hooks.append(m.register_forward_hook(hook))
    run.model.eval()
    for _ in range(run.hp.gptq_calib_batches):
        x, y = run.loader.next_batch()
        with run.rt.autocast():
            run.model(x, y)
    for h in hooks:
        h.remove()
    run.model.train()
    out = {}
    for key, h in sums.items():
        n = torch.tensor(float(counts[key]), device=h.device)
        if run.rt.world_size > 1:
            dist.all_reduce(h, op=dist.ReduceOp.SUM)
            dist.all_reduce(n, op=dist.ReduceOp.SUM)
        out[key] = h / n
    return out


def export_artifact(run: Run, fmt: str, hessians: dict | None) -> tuple[Path, int]:
    """Quantise and compress on rank 0; every rank then loads the file back into the model."""
    path = run.run_dir / f"final_model.{fmt}.ptz"
    if run.rt.master:
        blob = compress(quantize_state_dict(run.model.state_dict(), fmt, run.hp, hessians), fmt)
        write_atomic(path, blob)
    if run.rt.world_size > 1:
        dist.barrier()
    model_bytes = path.stat().st_size
    total = code_bytes() + model_bytes
    run.log(f"serialized_{fmt}: {path} model_bytes:{model_bytes} code_bytes:{code_bytes()} total_bytes:{total} "
            f"headroom:{SIZE_CAP_BYTES - total} ({'under' if total <= SIZE_CAP_BYTES else 'OVER'} the "
            f"{SIZE_CAP_BYTES:,}-byte cap)")
    return path, total


def export_and_evaluate(run: Run) -> dict:
    hp, rt, log = run.hp, run.rt, run.log
    if run.ema is not None:
        run.model.load_state_dict({k: v.to(run.model.state_dict()[k].dtype) for k, v in run.ema.items()})
        log(f"ema: loaded EMA weights (decay {hp.ema_decay})")
    refresh_qat(run.model, False)
    if rt.master:
        save_atomic(run.model.state_dict(), run.run_dir / "final_model.pt")
    metrics = {}
    res = evaluate_bpb(run.compiled, rt, hp, run.val_tokens, run.luts)
    log(f"final_float val_loss:{res.val_loss:.8f} val_bpb:{res.val_bpb:.8f}")
    metrics["float"] = res._asdict()
    t0 = time.perf_counter()
    hessians = collect_hessians(run) if hp.gptq_calib_batches > 0 else None
    exported = {}
    for fmt, label in (("int8", "int8_zlib"), ("int6", "int6_zstd")):
        path, total = export_artifact(run, fmt, hessians if fmt == "int6" else None)
        run.model.load_state_dict(dequantize_state_dict(read_artifact(path)))
        res = evaluate_bpb(run.compiled, rt, hp, run.val_tokens, run.luts)
        log(f"final_{label}_roundtrip_exact val_loss:{res.val_loss:.8f} val_bpb:{res.val_bpb:.8f}")
        metrics[f"{fmt}_roundtrip"] = {**res._asdict(), "bytes_total": total, "artifact": str(path)}
        exported[fmt] = (path, total)
    log(f"export_and_roundtrip_time:{1000 * (time.perf_counter() - t0):.0f}ms")
    if hp.eval_sliding:
        res = evaluate_bpb(run.compiled, rt, hp, run.val_tokens, run.luts, stride=hp.eval_stride)
        log(f"final_int6_zstd_sliding_exact val_loss:{res.val_loss:.8f} val_bpb:{res.val_bpb:.8f} stride:{hp.eval_stride}")
        metrics["int6_sliding"] = res._asdict()
    if hp.dynamic_cap and hp.is_hnet:
        res = evaluate_bpb(run.model, rt, hp, run.val_tokens, run.luts, dynamic_cap=True)
        log(f"final_int6_zstd_dynamic_cap val_loss:{res.val_loss:.8f} val_bpb:{res.val_bpb:.8f}")
        metrics["int6_dynamic_cap"] = res._asdict()
    metrics["bytes_total"], metrics["bytes_code"] = exported["int6"][1], code_bytes()
    metrics["over_cap"] = metrics["bytes_total"] > SIZE_CAP_BYTES
    if metrics["over_cap"]:
        log(f"ERROR: the int6 artifact is {metrics['bytes_total']:,} bytes, over the {SIZE_CAP_BYTES:,}-byte cap")
    if rt.master:
        write_submission(run, metrics)
    return metrics


def write_submission(run: Run, metrics: dict) -> None:
    """submission.json in the challenge's record-folder format, plus what a reader needs to trust it."""
    headline = metrics.get("int6_sliding", metrics["int6_roundtrip"])
    hardware = (f"{run.rt.world_size}x{torch.cuda.get_device_name(run.rt.device)}" if run.rt.is_cuda
                else f"{run.rt.world_size}x CPU ({platform.processor() or platform.machine()})")
    sub = {"author": run.hp.submission_author, "name": run.hp.submission_name or run.hp.run_id,
           "blurb": f"H-Net ({'byte260' if not run.hp.uses_sentencepiece else 'sp' + str(run.hp.vocab_size)}), "
                    f"{run.hp.num_layers} layers, OUTER_LAYERS={run.hp.outer_layers}, GPTQ int6 + zstd-22",
           "date": time.strftime("%Y-%m-%d"), "val_loss": headline["val_loss"], "val_bpb": headline["val_bpb"],
           "bytes_total": metrics["bytes_total"], "bytes_code": metrics["bytes_code"],
           "pre_quant_val_bpb": metrics["float"]["val_bpb"], "roundtrip_val_bpb": metrics["int6_roundtrip"]["val_bpb"],
           "int8_zlib_roundtrip_val_bpb": metrics["int8_roundtrip"]["val_bpb"], "seeds": [run.hp.seed],
           "steps": run.step, "train_time_ms": round(run.training_time_ms), "hardware": hardware,
           "torch_version": torch.__version__}
    write_atomic(run.run_dir / "submission.json", (json.dumps(sub, indent=2) + "\n").encode())


def log_header(run: Run, warnings: list[str]) -> None:
    log = run.log
    log(Path(__file__).read_text(encoding="utf-8"), console=False)
    log("=" * 100, console=False)
    log(f"python:{sys.version.split()[0]} torch:{torch.__version__} numpy:{np.__version__}", console=False)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        log(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10).stdout, console=False)
    for key, value in asdict(run.hp).items():
        log(f"{key}:{value}", console=False)
    for w in warnings:
        log(f"WARNING: {w}")
    log(f"world_size:{run.rt.world_size} grad_accum_steps:{run.rt.grad_accum_steps} device:{run.rt.device} "
        f"compile:{run.rt.compile}")
    log(f"model_params:{sum(p.numel() for p in run.model.parameters())}")


def build_run(hp: Hyperparameters, rt: Runtime) -> Run:
    if not hp.run_id:
        run_id = [time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]]
        if rt.world_size > 1:
            dist.broadcast_object_list(run_id, src=0)
        hp.run_id = run_id[0]
    run_dir = Path(hp.output_dir or os.path.join("runs", hp.run_id))
    if rt.master:
        run_dir.mkdir(parents=True, exist_ok=True)
    luts = build_byte_luts(hp, rt.device)
    val_tokens = load_validation_tokens(hp)
    random.seed(hp.seed)
    np.random.seed(hp.seed)
    torch.manual_seed(hp.seed)
    model = HNet(hp).to(rt.device)
    compiled = torch.compile(model, dynamic=False) if rt.compile else model
    run = Run(hp, rt, RunLog(run_dir / "train.log" if rt.master else None), run_dir, model, compiled,
              build_optimizers(model, hp, rt), DistributedTokenLoader(hp, rt), val_tokens, luts)
    if hp.ema_decay > 0:
        run.ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    return run


def run_training(hp: Hyperparameters, warnings: list[str] = ()) -> tuple[Run, dict]:
    """The whole run in this process (one rank of it under torchrun). Raises ConfigError on bad
    input and TrainingStopped on a NaN loss or a signal (after writing a checkpoint)."""
    rt = setup_device(hp)
    run = build_run(hp, rt)
    if rt.master:
        print(f"run_dir:{run.run_dir}", flush=True)
    log_header(run, list(warnings))

    def on_signal(signum, frame):
        run.signal_received = signum
    handlers = {}
    with contextlib.suppress(ValueError):  # signals can only be caught on the main thread
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        prime_compile(run)
        if hp.resume_from:
            load_checkpoint(run, hp.resume_from)
        train(run)
        metrics = export_and_evaluate(run)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    run.log(f"run_dir:{run.run_dir}")
    return run, metrics


def main() -> int:
    try:
        hp, warnings = Hyperparameters.from_env()
        for w in warnings:
            print(f"WARNING: {w}", file=sys.stderr)
        _, metrics = run_training(hp, warnings)
        code = 4 if metrics["over_cap"] else 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        code = e.exit_code
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
