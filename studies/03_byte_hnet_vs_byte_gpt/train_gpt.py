"""Study 03: a byte-level H-Net built for the golf budget, against a plain byte GPT of its size and time.

Study 02's trainer (`diff` the two files) plus what the H-Net paper's recipe and the challenge's
byte-transformer stack bring, each behind a variable whose off value is study 02's computation:
widths per stage, outer blocks without an MLP, main-stage recurrence, per-stage learning rates,
the official init, hashed byte bigrams, SmearGate, LeakyReLU(0.5)^2, a rule-based router, grouped
compression. OUTER_LAYERS=0 is the byte GPT with the same stack.

    torchrun --standalone --nproc_per_node=8 studies/03_byte_hnet_vs_byte_gpt/train_gpt.py

All configuration comes from environment variables (see Hyperparameters); runs.json beside this
file names the runs. A bare run is study 02's headline H-Net: every addition off. The same code
runs on CPU (gloo, fp32, no compile) and on CUDA (NCCL, bf16 autocast, torch.compile).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import glob
import hashlib
import io
import json
import lzma
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
from typing import Callable, NamedTuple

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

# An unknown variable is an error when it looks meant for this file: close to a known name, the
# tail of one (SEQ_LEN for TRAIN_SEQ_LEN), or with a prefix no other program uses. Anything else
# (a cluster's, torchrun's, NCCL's variables) is none of our business.
OWN_PREFIXES = ("HNET_", "GPTQ_", "LATE_QAT_", "QAT_", "EMA_", "RATIO_", "OUTER_", "TARGET_AVG_",
                "TIED_EMBED_", "MUON_", "CHUNK_", "PRUNE_", "QUANT_")
CHOICES = {"autocast": ("auto", "bf16", "off"), "gptq_clip_search": ("matrix", "row"),
           "activation": ("relu2", "leaky_relu2"), "router": ("learned", "space"),
           "export_codec": ("torch_zstd", "grouped")}
SWITCHES = ("ratio_loss_per_seq", "eval_sliding", "dynamic_cap", "quant_scale_floor", "gptq_calib_all_ranks",
            "prune_nonzero", "smear_gate", "official_init")  # 0 or 1

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
    warmup_steps: int = 20  # compile priming: real steps whose effect is undone (not an LR warmup)
    lr_warmup_steps: int = 0  # LR warmup: every LR rises linearly over these first steps (ours; 0 published)
    max_wallclock_seconds: float = 600.0  # 0: no cap
    val_loss_every: int = 1000
    train_log_every: int = 200
    train_batch_tokens: int = 524288
    train_seq_len: int = 2048
    grad_accum_steps: int = 0  # micro-steps a step on each rank (0, published: 8 // WORLD_SIZE)
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
    ratio_loss_per_seq: int = 1  # 1 (published): F and G per sequence, then averaged; 0: over the batch
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
    late_qat_threshold: float = 0.15  # QAT switches on after the step whose warmdown factor fell below this
    late_qat_min_steps: int = 200  # under a wall-clock cap, not before this step (the warmdown is estimated)
    qat_from_step: int = 0  # ours, 0 (off): late QAT as above; K: fake int6 from step K whatever the LR
    ema_decay: float = 0.0  # 0: off
    compile_model: int = -1  # -1: on for CUDA, off for CPU
    compile_backend: str = "inductor"  # tests use aot_eager: the same graphs, compiled quickly
    autocast: str = "auto"  # auto: bf16 on CUDA, off on CPU; bf16 on CPU runs the GPU's precision path
    checkpoint_every: int = 0  # 0: only at the end
    resume_from: str = ""
    # evaluation and export
    eval_stride: int = 64
    eval_batch_seqs: int = 32
    eval_sliding: int = 1
    dynamic_cap: int = 0
    export_formats: str = "int8,int6"  # int8: per-row int8 + zlib-9; int6: GPTQ int6 + prune + zstd-22
    quant_scale_floor: int = 1  # 1 (published): per-row scales at least 1/127 (int8), 1/31 (int6)
    gptq_calib_batches: int = 256  # 0: no Hessians, round-to-nearest int6 (and no time reserve)
    gptq_calib_all_ranks: int = 0  # 0 (published): rank 0, a fresh loader at the start of the train stream
    gptq_clip_search: str = "matrix"  # matrix (published): one clip per matrix by weight MSE; row: per row by H
    gptq_reserve_seconds: float = 45.0
    gptq_block_size: int = 128
    gptq_damp: float = 0.01
    prune_pct: float = 0.03
    prune_nonzero: int = 0  # 0 (published): zero |q| <= the PRUNE_PCT quantile, zeros counted; 1: of nonzeros
    keep_float_max_numel: int = 65536  # float tensors this small skip quantisation (CPU-size runs lower it)
    submission_author: str = ""
    submission_name: str = ""
    # study 03 (ours): each default is study 02's computation
    outer_dim: int = 0  # width of the embedding, encoder, router and decoder (0: MODEL_DIM, the main width)
    outer_mlp_mult: int = -1  # MLP of the encoder and decoder blocks (-1: MLP_MULT; 0: none, as the paper)
    main_loops: int = 1  # the main stage's blocks applied this many times (shared weights, a vector a loop)
    outer_lr_mult: float = 1.0  # every LR of the embedding, encoder, router and decoder x this
    official_init: int = 0  # 1: the H-Net code's init (untied head N(0, .02), embedding N(0, 1), projections .02)
    bigram_hash: int = 0  # buckets of a hashed (previous byte, byte) embedding added to the input (0: off)
    bigram_dim: int = 32
    smear_gate: int = 0  # 1: a zero-init per-channel gate mixes the previous input vector in (not across BOS)
    activation: str = "relu2"  # leaky_relu2: LeakyReLU(0.5)^2
    router: str = "learned"  # space: a boundary at every byte after whitespace (the rule-based control)
    export_codec: str = "torch_zstd"  # grouped: each kind of tensor its own stream, the smaller of zstd-22 / lzma

    @classmethod
    def from_env(cls, env: dict | None = None) -> tuple["Hyperparameters", list[str]]:
        """Parse env into a checked config; returns it and a list of warnings (none today)."""
        env = os.environ if env is None else env
        known = {f.name.upper(): f for f in fields(cls)}
        values = {}
        for name, f in known.items():
            if name not in env:
                continue
            raw = env[name].strip()
            try:
                values[f.name] = raw if f.type == "str" else int(raw) if f.type == "int" else float(raw)
            except ValueError:
                raise ConfigError(f"{name}={env[name]!r} is not a valid {f.type}") from None
        for name in env:
            if name not in known:
                meant = meant_for_us(name, list(known))
                if meant:
                    raise ConfigError(f"unknown variable {name}{meant}")
        hp = cls(**values)
        hp.check()
        return hp, []

    def check(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("vocab_size", "iterations", "train_seq_len", "train_batch_tokens", "model_dim", "num_heads",
                     "num_kv_heads", "mlp_mult", "num_layers", "chunk_divisor", "eval_stride", "eval_batch_seqs",
                     "gptq_block_size", "muon_backend_steps", "main_loops", "bigram_dim"):
            value = getattr(self, name)
            need(value > 0, f"{name.upper()} must be a positive integer, got {value}")
        for name in ("warmdown_iters", "warmup_steps", "lr_warmup_steps", "val_loss_every", "train_log_every",
                     "grad_accum_steps", "val_max_tokens", "muon_momentum_warmup_steps", "late_qat_min_steps",
                     "qat_from_step", "checkpoint_every", "gptq_calib_batches", "keep_float_max_numel",
                     "ratio_loss_weight", "grad_clip_norm", "gptq_reserve_seconds", "max_wallclock_seconds",
                     "outer_dim", "bigram_hash"):
            value = getattr(self, name)
            need(value >= 0, f"{name.upper()} must be >= 0, got {value}")
        for name in SWITCHES:
            need(getattr(self, name) in (0, 1), f"{name.upper()} must be 0 or 1, got {getattr(self, name)}")
        for name, allowed in CHOICES.items():
            need(getattr(self, name) in allowed,
                 f"{name.upper()}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        need(self.compile_model in (-1, 0, 1), f"COMPILE_MODEL must be -1 (auto), 0 or 1, got {self.compile_model}")
        need(self.vocab_size <= 65536, f"VOCAB_SIZE={self.vocab_size} does not fit the uint16 shards")
        need(self.model_dim % self.num_heads == 0,
             f"MODEL_DIM={self.model_dim} must divide by NUM_HEADS={self.num_heads}")
        need((self.model_dim // self.num_heads) % 2 == 0, "MODEL_DIM // NUM_HEADS must be even (RoPE)")
        need(self.num_heads % self.num_kv_heads == 0,
             f"NUM_HEADS={self.num_heads} must divide by NUM_KV_HEADS={self.num_kv_heads}")
        need(0 <= 2 * self.outer_layers < self.num_layers,
             f"OUTER_LAYERS={self.outer_layers} leaves no main stage in NUM_LAYERS={self.num_layers}")
        need(self.target_avg_chunk_len > 1, f"TARGET_AVG_CHUNK_LEN must exceed 1, got {self.target_avg_chunk_len}")
        need(self.hnet_lr_diff > 0, f"HNET_LR_DIFF must be positive, got {self.hnet_lr_diff}")
        need(0 <= self.late_qat_threshold <= 1,
             f"LATE_QAT_THRESHOLD must be in [0, 1] (a fraction of the LR), got {self.late_qat_threshold}")
        need(self.eval_stride <= self.train_seq_len, f"EVAL_STRIDE={self.eval_stride} exceeds TRAIN_SEQ_LEN")
        need(0 <= self.prune_pct < 1, f"PRUNE_PCT must be in [0, 1), got {self.prune_pct}")
        need(0 <= self.ema_decay < 1, f"EMA_DECAY must be in [0, 1), got {self.ema_decay}")
        outer = self.outer_dim or self.model_dim
        need(outer <= self.model_dim, f"OUTER_DIM={outer} exceeds MODEL_DIM={self.model_dim} (the main stage's width)")
        need(outer % self.num_heads == 0 and (outer // self.num_heads) % 2 == 0,
             f"OUTER_DIM={outer} must split into NUM_HEADS={self.num_heads} heads of an even width")
        need(self.outer_mlp_mult >= -1, f"OUTER_MLP_MULT must be -1 (MLP_MULT) or >= 0, got {self.outer_mlp_mult}")
        need(self.outer_lr_mult > 0, f"OUTER_LR_MULT must be positive, got {self.outer_lr_mult}")
        need(self.router == "learned" or not self.uses_sentencepiece,
             "ROUTER=space cuts at byte260 whitespace: it needs byte260 data")
        need(self.gptq_damp > 0, f"GPTQ_DAMP must be positive, got {self.gptq_damp}")
        formats = self.export_formats.split(",")
        need(len(formats) == len(set(formats)) and set(formats) <= {"int8", "int6"},
             f"EXPORT_FORMATS={self.export_formats!r}: expected int8, int6 or int8,int6")
        if self.max_wallclock_seconds > 0 and self.reserve_seconds > 0:
            need(self.max_wallclock_seconds > self.reserve_seconds,
                 f"MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds:g} leaves no training time after "
                 f"GPTQ_RESERVE_SECONDS={self.reserve_seconds:g}; raise the cap or lower the reserve")

    @property
    def is_hnet(self) -> bool:
        return self.outer_layers > 0

    @property
    def uses_sentencepiece(self) -> bool:
        return self.tokenizer_path.endswith(".model")

    @property
    def formats(self) -> list[str]:
        return self.export_formats.split(",")

    @property
    def uses_gptq(self) -> bool:
        return "int6" in self.formats and self.gptq_calib_batches > 0

    @property
    def reserve_seconds(self) -> float:  # training time kept back for GPTQ calibration, when it runs
        return self.gptq_reserve_seconds if self.uses_gptq else 0.0

    @property
    def embed_dim(self) -> int:  # the byte-level width: the embedding, outer stages and head
        return (self.outer_dim or self.model_dim) if self.is_hnet else self.model_dim

    @property
    def outer_mlp(self) -> int:
        return self.mlp_mult if self.outer_mlp_mult < 0 else self.outer_mlp_mult

# Switches screened at 1 M parameters that measured no gain (README, "Retired switches"), taken out
# so the trainer keeps what pays; setting one is an error rather than a silent no-op.
RETIRED = ("XSA_LAYERS", "ROPE_DIMS", "LN_SCALE", "MUON_WEIGHT_DECAY")
RETIRED_AT = "25926f2"  # the last commit whose study-03 trainer has them (and writes HNG1 artifacts)

def meant_for_us(name: str, known: list[str]) -> str:
    """Why an unknown variable must be a mistake ("" if it need not be ours): the hint to print."""
    if name in RETIRED:
        return f": retired from study 03 (no measured gain, see its README); commit {RETIRED_AT} has it"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
    close = close or [k for k in known if "_" in name and k.endswith("_" + name)]
    if close:
        return f": did you mean {close[0]}?"
    return " (see the fields of Hyperparameters)" if name.startswith(OWN_PREFIXES) else ""

class ConfigError(ValueError):
    """A configuration or input problem; the message names the variable or file."""

class NonFiniteScore(ValueError):
    """A loss or score that is NaN or infinite: never printed as a score."""

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
            updates = flat.split([p.numel() for p in params])  # views into flat
            for i, p in enumerate(params):
                # Momentum is kept on every rank (cheap) so that rank 0's state is the whole state.
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                if i % self.world_size == self.rank:
                    g = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                    g = zeropower_via_newtonschulz5(g, group["backend_steps"], self.ns_dtype)
                    updates[i].copy_(g.flatten() * max(1.0, g.size(0) / g.size(1)) ** 0.5)
            if self.world_size > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for p, u in zip(params, updates):
                p.add_(u.view_as(p).to(p.dtype), alpha=-group["lr"])


# ----------------------------------------------------------------------------------------------
# BPB EVALUATION
# Tokenizer-agnostic bits per byte: CE nats of every scored target over the UTF-8 bytes those
# targets stand for. Byte counts come from per-token lookup tables; the sum over the val split
# equals the raw byte count of the val documents (tests/test_bpb.py checks it).
# ----------------------------------------------------------------------------------------------

class ByteLuts(NamedTuple):
    base_bytes: Tensor  # (V,) int64 UTF-8 bytes the piece decodes to, without its leading "▁"
    has_leading_space: Tensor  # (V,) bool, starts with "▁" (one more byte unless after a control token)
    is_control: Tensor  # (V,) bool, control/unknown/unused ids (count 0, and no space after them)

def build_byte_luts(hp: Hyperparameters, device: torch.device) -> ByteLuts:
    v = hp.vocab_size
    base, lead, control = np.zeros(v, dtype=np.int64), np.zeros(v, dtype=bool), np.zeros(v, dtype=bool)
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
                lead[i], base[i] = piece_bytes(sp.id_to_piece(i))
    else:
        if v != 260:
            raise ConfigError(f"VOCAB_SIZE={v} but TOKENIZER_PATH={hp.tokenizer_path!r} means byte260 (vocab 260)")
        base[4:] = 1  # ids 0-3 are pad/bos/eos/unk; id b+4 is byte b
        control[:4] = True
    return ByteLuts(*(torch.from_numpy(a).to(device) for a in (base, lead, control)))

def piece_bytes(piece: str) -> tuple[bool, int]:
    """(has a leading "▁", UTF-8 bytes of the rest). SentencePiece decodes every "▁" to a space:
    the leading one may vanish (after BOS, see target_bytes), each later one is one byte."""
    lead = piece.startswith("\u2581")
    rest = piece[1:] if lead else piece
    return lead, len(rest.replace("\u2581", " ").encode("utf-8"))

def target_bytes(luts: ByteLuts, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
    """UTF-8 bytes each target stands for, given the token before it. Shapes (B, L)."""
    space = luts.has_leading_space[target_ids] & ~luts.is_control[prev_ids]
    return luts.base_bytes[target_ids] + space.long()

class EvalResult(NamedTuple):
    val_loss: float  # mean nats per scored token
    val_bpb: float
    tokens: int  # scored targets
    bytes: int

def eval_windows(total_targets: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored offset) per window: windows of seq_len every `stride` tokens, each scoring
    what no earlier one scored, plus a final window for the tail. stride == seq_len: non-overlapping."""
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
        # the last batch is padded with unscored windows: one shape, no recompile for the tail
        pad = max(0, i + hp.eval_batch_seqs - len(mine))
        batch = mine[i:i + hp.eval_batch_seqs] + [(0, seq_len)] * pad
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
    if not math.isfinite(nats):
        raise NonFiniteScore(f"the evaluation loss is not finite ({nats}): the weights are corrupt or diverged")
    return EvalResult(nats / tokens, nats / math.log(2) / nbytes, int(tokens), int(nbytes))


# ----------------------------------------------------------------------------------------------
# EXPORT (quantisation and compression)
# Two formats, both a torch.save'd dict that also records the trainer (path, sha256) and the
# config, so eval_bpb.py can rebuild the model: int8 per-row + zlib-9 (the baseline's export),
# and GPTQ int6 + pruning + zstd-22 (this study's). The score is always the round trip.
# ----------------------------------------------------------------------------------------------

SIZE_CAP_BYTES = 16_000_000
CONTROL_NAMES = ("resid_mix", "skip_weights", "q_gain", "attn_scale", "mlp_scale", "smear", "bigram.scale",
                 "loop_embed", "main_pad")  # kept in fp32
TABLES = ("tok_emb.weight", "bigram.table.weight")  # embedding-like: per-row int8, as the baseline's embedding
INT8_CLIP_QUANTILE = 0.9999984
INT6_MAX = 31
PUBLISHED_CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)  # GPTQ_CLIP_SEARCH=matrix
ROW_CLIP_QUANTILES = (1.0, 0.9999, 0.999, 0.995)  # GPTQ_CLIP_SEARCH=row

def code_bytes() -> int:
    return len(Path(__file__).read_bytes())

def trainer_record() -> dict:
    here = Path(__file__).resolve()
    return {"path": os.path.relpath(here, Path.cwd()), "study_file": f"{here.parent.name}/{here.name}",
            "sha256": hashlib.sha256(here.read_bytes()).hexdigest()}

def keep_small(name: str, t: Tensor) -> Tensor:
    return t.float() if any(k in name for k in CONTROL_NAMES) else t.half()

def row_scale(clip: Tensor, qmax: int, floor: bool) -> Tensor:
    """Per-row fp16 clip / qmax; QUANT_SCALE_FLOOR=1 (published) floors it at 1/qmax, coarse for |w| < 1."""
    scale = clip / qmax
    return (scale.clamp_min(1.0 / qmax) if floor else scale.clamp_min(1e-12 / qmax)).half()

def quantize_int8_rows(w: Tensor, floor: bool) -> tuple[Tensor, Tensor]:
    w = w.float()
    clip = torch.quantile(w.abs(), INT8_CLIP_QUANTILE, dim=1)
    scale = row_scale(clip, 127, floor)
    q = torch.clamp(torch.round(w.clamp(-clip[:, None], clip[:, None]) / scale.float()[:, None]), -127, 127)
    return q.to(torch.int8), scale

def quantize_int6_rows(w: Tensor, floor: bool, clip_quantile: float = 1.0) -> tuple[Tensor, Tensor]:
    """Round-to-nearest per-row int6: the export without a Hessian, and late QAT's forward."""
    w = w.float()
    clip = w.abs().amax(dim=1) if clip_quantile >= 1.0 else torch.quantile(w.abs(), clip_quantile, dim=1)
    scale = row_scale(clip, INT6_MAX, floor)
    q = torch.clamp(torch.round(w / scale.float()[:, None]), -INT6_MAX, INT6_MAX)
    return q.to(torch.int8), scale

def inverse_hessian_factor(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, retried at 10x and 100x damping;
    then LinAlgError, and the caller rounds that matrix to nearest."""
    eye = torch.eye(h.size(0), device=h.device)
    for factor in (1.0, 10.0, 100.0):
        chol, info = torch.linalg.cholesky_ex(h + factor * damp * torch.diag(h).mean() * eye)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    raise torch.linalg.LinAlgError("Hessian not positive definite even with 100x damping")

def gptq_quantize_int6(w: Tensor, hessian: Tensor, scale: Tensor, block_size: int, damp: float) -> Tensor:
    """GPTQ (Frantar et al. 2022) on a given per-row scale: quantise columns in act-order (largest
    Hessian diagonal first), spreading each column's error onto the columns not yet quantised
    through the inverse Hessian's Cholesky factor. Returns int8 values in [-31, 31]."""
    w = w.float().clone()
    h = hessian.float().clone()
    cols = w.size(1)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    s = scale.float()[:, None]
    perm = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = inverse_hessian_factor(h, damp)
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
    return q[:, torch.argsort(perm)].to(torch.int8)

def quantize_int6_matrix(w: Tensor, hessian: Tensor | None, hp: Hyperparameters) -> tuple[Tensor, Tensor]:
    """int6 codes and scales of one matrix (GPTQ with a Hessian, else round-to-nearest). The clip:
    GPTQ_CLIP_SEARCH=matrix (published) one per matrix, least weight MSE; row: per row, least d H d^T."""
    w = w.float()
    floor = bool(hp.quant_scale_floor)
    per_row = hp.gptq_clip_search == "row"
    best_q = best_s = best_err = None
    for cq in ROW_CLIP_QUANTILES if per_row else PUBLISHED_CLIP_QUANTILES:
        q, s = quantize_int6_rows(w, floor, cq)
        if hessian is not None:
            q = gptq_quantize_int6(w, hessian, s, hp.gptq_block_size, hp.gptq_damp)
        d = w - q.float() * s.float()[:, None]
        if per_row and hessian is not None:
            err = ((d @ hessian.float()) * d).sum(dim=1)
        else:
            err = d.square().sum(dim=1)
        if not per_row:
            err = err.sum().expand(w.size(0))  # one choice for the whole matrix
        if best_err is None:
            best_q, best_s, best_err = q, s, err
        else:
            better = err < best_err
            best_q = torch.where(better[:, None], q, best_q)
            best_s = torch.where(better, s, best_s)
            best_err = torch.minimum(err, best_err)
    return best_q, best_s

def prune_int6(codes: dict[str, tuple[Tensor, Tensor]], pct: float, nonzero: bool) -> int:
    """Zero small int6 values in place (zeros compress well); returns how many changed. Published
    (PRUNE_NONZERO=0): every |q| <= the PRUNE_PCT quantile of all |q|, zeros counted, so a grid
    already PRUNE_PCT zeros (the scale floor) changes nothing; 1: PRUNE_PCT of the nonzeros, smallest
    |q| * scale first."""
    if pct <= 0 or not codes:
        return 0
    changed = 0
    if not nonzero:
        magnitudes = torch.cat([q.flatten().abs().float() for q, _ in codes.values()])
        threshold = magnitudes.kthvalue(max(1, int(pct * magnitudes.numel()))).values
    for q, scale in codes.values():
        if not nonzero:
            mask = (q.abs() <= threshold) & (q != 0)
        else:
            live = (q != 0).flatten().nonzero().flatten()
            magnitude = (q.float().abs() * scale.float()[:, None]).flatten()[live]
            mask = torch.zeros(q.numel(), dtype=torch.bool)
            mask[live[torch.argsort(magnitude, stable=True)[:int(round(pct * live.numel()))]]] = True
            mask = mask.view_as(q)
        changed += int(mask.sum())
        q[mask] = 0
    return changed

def quantize_state_dict(state: dict[str, Tensor], fmt: str, hp: Hyperparameters,
                        hessians: dict[str, Tensor] | None = None, data: dict | None = None) -> dict:
    """The artifact payload: quantised tensors plus what a reader needs to rebuild and trust the
    model (trainer, config, tokenizer and validation fingerprints, a digest of the tensors)."""
    tensors, int6_codes, fallbacks = {}, {}, []
    floor = bool(hp.quant_scale_floor)
    for name, t in state.items():
        t = t.detach().cpu()
        if not t.is_floating_point() or t.numel() <= hp.keep_float_max_numel or t.ndim != 2:
            tensors[name] = {"w": keep_small(name, t) if t.is_floating_point() else t}
        elif fmt == "int8" or name in TABLES:
            q, s = quantize_int8_rows(t, floor)
            tensors[name] = {"q": q, "scale": s, "bits": 8}
        else:
            h = (hessians or {}).get(name)
            try:
                q, s = quantize_int6_matrix(t, None if h is None else h.cpu(), hp)
            except torch.linalg.LinAlgError:
                fallbacks.append(name)
                q, s = quantize_int6_matrix(t, None, hp)
            tensors[name] = {"q": q, "scale": s, "bits": 6}
            int6_codes[name] = (q, s)
    pruned = prune_int6(int6_codes, hp.prune_pct, bool(hp.prune_nonzero)) if fmt == "int6" else 0
    payload = {"format": fmt, "trainer": trainer_record(), "config": asdict(hp), "data": data or {},
               "tensors": tensors, "stats": {"gptq_fallbacks": fallbacks, "pruned": pruned}}
    payload["digest"] = tensors_digest(tensors)
    return payload

def tensors_digest(tensors: dict) -> str:
    """sha256 of every stored value (name, dtype, shape, bytes): no flipped bit survives a read."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        for key, v in sorted(tensors[name].items()):
            t = v if isinstance(v, Tensor) else torch.tensor(v)
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

def dequantize_state_dict(payload: dict) -> dict[str, Tensor]:
    out = {}
    for name, e in payload["tensors"].items():
        if "q" in e:
            out[name] = e["q"].float() * e["scale"].float()[:, None]
        else:
            out[name] = e["w"].float() if e["w"].is_floating_point() else e["w"]
    return out

# EXPORT_CODEC=grouped: magic, header length, the zstd-compressed JSON header, its sha256, the streams.
# HNG1 (the trainer up to commit RETIRED_AT) stored the header as plain JSON, ~33 KB at any model size.
GROUPED_MAGIC = b"HNG2"


def compress(payload: dict, fmt: str) -> bytes:
    """A plain zlib or zstd stream, each checksummed (zlib's adler32; zstd's content checksum, on);
    or, EXPORT_CODEC=grouped (int6 only), compress_grouped."""
    if fmt == "int6" and payload.get("config", {}).get("export_codec") == "grouped":
        return compress_grouped(payload)
    buf = io.BytesIO()
    torch.save(payload, buf)
    raw = buf.getvalue()
    if fmt == "int8":
        return zlib.compress(raw, 9)
    return zstandard.ZstdCompressor(level=22, write_checksum=True).compress(raw)


def byte_shuffle(data: bytes, width: int) -> bytes:
    """Byte b of every width-byte value together: fp16 high bytes repeat, and compress better apart."""
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, width).T.tobytes() if width > 1 else data


def byte_unshuffle(data: bytes, width: int) -> bytes:
    return np.frombuffer(data, dtype=np.uint8).reshape(width, -1).T.tobytes() if width > 1 else data


def compress_grouped(payload: dict) -> bytes:
    """Tensors of one kind (int6 codes, int8 tables, fp16 scales, small fp16 and fp32 tensors) as one
    raw stream each, byte-shuffled by element width, each compressed by the smaller of zstd-22
    (checksummed) and lzma (its CRC-64); a zstd-compressed JSON header (its own sha256 after it)
    names every tensor's place. The study-03 README's compression table measures it."""
    streams, entries = {}, []
    for name in sorted(payload["tensors"]):
        for key, v in sorted(payload["tensors"][name].items()):
            t = v if isinstance(v, Tensor) else torch.tensor(v)
            kind = f"{key}:{t.dtype}" if key != "q" else f"q{payload['tensors'][name].get('bits')}:{t.dtype}"
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            entries.append({"name": name, "key": key, "kind": kind, "dtype": str(t.dtype).removeprefix("torch."),
                            "shape": list(t.shape), "tensor": isinstance(v, Tensor), "bytes": len(data)})
            streams.setdefault(kind, []).append(data)
    header = {k: v for k, v in payload.items() if k != "tensors"}
    header["entries"], header["streams"], body = entries, [], []
    for kind, parts in streams.items():
        width = torch.empty(0, dtype=getattr(torch, kind.split(":")[1].removeprefix("torch."))).element_size()
        raw = byte_shuffle(b"".join(parts), width)
        options = {"zstd": zstandard.ZstdCompressor(level=22, write_checksum=True).compress(raw),
                   "lzma": lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)}
        codec = min(options, key=lambda c: len(options[c]))
        header["streams"].append({"kind": kind, "codec": codec, "width": width, "bytes": len(options[codec])})
        body.append(options[codec])
    head = zstandard.ZstdCompressor(level=22, write_checksum=True).compress(json.dumps(header).encode())
    return GROUPED_MAGIC + len(head).to_bytes(4, "little") + head + hashlib.sha256(head).digest() + b"".join(body)


def decompress_grouped(blob: bytes) -> dict:
    size = int.from_bytes(blob[4:8], "little")
    head = blob[8:8 + size]
    if hashlib.sha256(head).digest() != blob[8 + size:40 + size]:
        raise ValueError("the header does not match the sha256 stored after it")
    header = json.loads(zstandard.ZstdDecompressor().decompress(head))
    at, raw = 40 + size, {}
    for s in header.pop("streams"):
        data = blob[at:at + s["bytes"]]
        at += s["bytes"]
        plain = zstandard.ZstdDecompressor().decompress(data) if s["codec"] == "zstd" else lzma.decompress(data)
        raw[s["kind"]] = io.BytesIO(byte_unshuffle(plain, s["width"]))
    if at != len(blob):
        raise ValueError(f"{len(blob) - at} bytes after the last stream")
    tensors = {}
    for e in header.pop("entries"):
        data = bytearray(raw[e["kind"]].read(e["bytes"]))
        dtype = getattr(torch, e["dtype"])
        t = torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(e["shape"]).clone() if data else \
            torch.empty(e["shape"], dtype=dtype)
        tensors.setdefault(e["name"], {})[e["key"]] = t if e["tensor"] else t.item()
    return {**header, "tensors": tensors}

def read_artifact(path: str | Path) -> dict:
    """Decompress (zstd or zlib by magic bytes), unpickle tensors only, check them against the digest."""
    blob = Path(path).read_bytes()
    try:
        if blob[:4] == b"HNG1":
            raise ValueError(f"a grouped artifact of an older trainer (uncompressed header); commit {RETIRED_AT} "
                             "reads it")
        if blob[:4] == GROUPED_MAGIC:
            payload = decompress_grouped(blob)
        else:
            if blob[:4] == b"\x28\xb5\x2f\xfd":
                raw = zstandard.ZstdDecompressor().decompress(blob)
            else:
                raw = zlib.decompress(blob)
            payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # zlib, zstd, lzma (bad data or checksum), JSON and unpickling errors
        raise ConfigError(f"{path}: not a readable artifact (corrupt or truncated?): {e}") from None
    return verify_payload(payload, path)

def verify_payload(payload, path) -> dict:
    if not isinstance(payload, dict) or not {"tensors", "config", "digest"} <= payload.keys():
        raise ConfigError(f"{path}: decompressed, but it is not an artifact of this trainer")
    try:
        digest = tensors_digest(payload["tensors"])
    except (AttributeError, TypeError, RuntimeError) as e:
        raise ConfigError(f"{path}: the stored tensors are malformed (corrupt file): {e}") from None
    if digest != payload["digest"]:
        raise ConfigError(f"{path}: the weights do not match the digest stored with them (corrupt file)")
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
    names = {f.name for f in fields(Hyperparameters)}
    hp = Hyperparameters(**{k: v for k, v in payload["config"].items() if k in names})
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
    expected = [os.path.join(hp.data_path, f"fineweb_{split}_{i:06d}.bin") for i in range(len(files))]
    if files != expected:
        missing = sorted(set(expected) - set(files))
        gap = f" (missing {os.path.basename(missing[0])})" if missing else ""
        raise ConfigError(f"DATA_PATH={hp.data_path}: the {split} shards are not numbered "
                          f"0..{len(files) - 1}{gap}: an incomplete copy?")
    return files

def check_manifest(hp: Hyperparameters, val_counts: list[int], tokenizer: dict) -> list[str]:
    """Compare the shards and TOKENIZER_PATH with the exporter's or downloader's manifest.json
    (DATA_PATH/../../): no entry (an interrupted export), another val split or another tokenizer
    than the one the shards were made with is an error; no manifest is a warning."""
    path, name = Path(hp.data_path).resolve().parent.parent / "manifest.json", Path(hp.data_path).resolve().name
    if not path.is_file():
        return [f"no manifest.json at {path}: cannot check that {name} is a complete export of this tokenizer"]
    try:
        manifest = json.loads(path.read_text())
        datasets = {d.get("name"): d for d in manifest.get("datasets", [])}
        tokenizers = {t.get("name"): t for t in manifest.get("tokenizers", [])}
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"{path}: not a readable manifest ({e})") from None
    if name not in datasets:
        raise ConfigError(f"{path} lists no dataset {name}: its export did not finish (or was interrupted); "
                          "run the exporter again")
    stats = datasets[name].get("stats", {})
    have = {"files_val": len(val_counts), "tokens_val": sum(val_counts), "files_train": len(shard_files(hp, "train"))}
    for key, n in have.items():  # fewer train shards is fine: the downloader's --train-shards
        want = stats.get(key)
        if want is not None and (n > want if key == "files_train" else n != want):
            raise ConfigError(f"DATA_PATH={hp.data_path}: {key} is {n:,}, {path} says {want:,}")
    entry = tokenizers.get(datasets[name].get("tokenizer_name"), {})
    kind = "sentencepiece" if "model_path" in entry or entry.get("kind", "").startswith("sentencepiece") else "byte"
    if entry and kind != tokenizer["kind"].replace("byte260", "byte"):
        raise ConfigError(f"{name} was made with a {kind} tokenizer ({path}), but TOKENIZER_PATH="
                          f"{hp.tokenizer_path!r} is a {tokenizer['kind']} one")
    if tokenizer["kind"] != "sentencepiece":
        return []
    if "sha256" not in entry:
        return [f"{path} records no sha256 for {name}'s tokenizer: cannot check that TOKENIZER_PATH is the one "
                "its shards were made with (export again to record it)"]
    if entry["sha256"] != tokenizer["sha256"]:
        raise ConfigError(f"TOKENIZER_PATH={hp.tokenizer_path} (sha256 {tokenizer['sha256'][:12]}) is not the "
                          f"tokenizer {name} was made with ({path}: {entry['sha256'][:12]}); the BPB would be wrong")
    return []

def tokenizer_fingerprint(hp: Hyperparameters) -> dict:
    if not hp.uses_sentencepiece:
        return {"kind": "byte260", "vocab_size": hp.vocab_size}
    return {"kind": "sentencepiece", "vocab_size": hp.vocab_size,
            "sha256": hashlib.sha256(Path(hp.tokenizer_path).read_bytes()).hexdigest()}

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
        local = chunk[self.rt.rank * span:(self.rt.rank + 1) * span]
        if self.rt.is_cuda:  # from pinned memory, so the copy does not block the host
            local = local.pin_memory().to(self.rt.device, non_blocking=True)
        local = local.to(torch.int64)
        return local[:-1].view(-1, self.seq_len), local[1:].view(-1, self.seq_len)

class Validation(NamedTuple):
    tokens: Tensor  # the split, cut to VAL_MAX_TOKENS + 1 if set
    fingerprint: dict  # tokenizer, shard names and counts, sha256 of the whole split
    warnings: list

def load_validation(hp: Hyperparameters) -> Validation:
    """The val split, checked against the manifest and the tokenizer before any cut."""
    files = shard_files(hp, "val")
    parts = [load_data_shard(f, hp.vocab_size) for f in files]
    tokenizer = tokenizer_fingerprint(hp)
    warnings = check_manifest(hp, [t.numel() for t in parts], tokenizer)
    tokens = torch.cat(parts)
    if hp.uses_sentencepiece and tokens.numel() > 100_000 and int(tokens.max()) < 260:
        raise ConfigError(f"DATA_PATH={hp.data_path} holds only ids < 260 (byte260 data?) "
                          f"but TOKENIZER_PATH={hp.tokenizer_path} is a SentencePiece model")
    sha = hashlib.sha256(tokens.numpy().astype("<u2").tobytes()).hexdigest()
    fingerprint = {"tokenizer": tokenizer,
                   "val": {"shards": [os.path.basename(f) for f in files], "tokens": [t.numel() for t in parts],
                           "sha256": sha}}
    if hp.val_max_tokens > 0 and hp.val_max_tokens + 1 < tokens.numel():
        warnings.append(f"VAL_MAX_TOKENS={hp.val_max_tokens}: every score covers the first {hp.val_max_tokens:,} "
                        f"of {tokens.numel() - 1:,} validation targets, not the whole split")
        tokens = tokens[:hp.val_max_tokens + 1]
    return Validation(tokens, fingerprint, warnings)


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
        positions = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq)
        return angles.cos().to(dtype)[None, None], angles.sin().to(dtype)[None, None]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, hp: Hyperparameters, dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = hp.num_heads, hp.num_kv_heads
        self.head_dim = dim // hp.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
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
        gqa = self.num_kv_heads != self.num_heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.proj(y.transpose(1, 2).reshape(b, length, d))


class MLP(nn.Module):
    def __init__(self, dim: int, mult: int, activation: str):
        super().__init__()
        self.fc = CastedLinear(dim, mult * dim)
        self.proj = CastedLinear(mult * dim, dim, zero_init=True)
        self.leaky = activation == "leaky_relu2"  # LeakyReLU(0.5)^2 (challenge PR #434): no dead units

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, 0.5) if self.leaky else torch.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, hp: Hyperparameters, dim: int, mlp_mult: int):
        super().__init__()
        self.attn = CausalSelfAttention(hp, dim)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp = MLP(dim, mlp_mult, hp.activation) if mlp_mult > 0 else None  # OUTER_MLP_MULT=0: none
        if self.mlp is not None:
            self.mlp_scale = nn.Parameter(torch.ones(dim))
        # Per-channel mix of the running stream with the stage input x0 (starts as "stream only").
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(F.rms_norm(x, (x.size(-1),)))
        if self.mlp is None:
            return x
        return x + self.mlp_scale.to(x.dtype) * self.mlp(F.rms_norm(x, (x.size(-1),)))


class Stage(nn.Module):
    """Blocks with U-Net skips: the first half push their outputs, the second half add them back
    (popped, weighted per channel). Input and output are RMS-normalised. MAIN_LOOPS=K (ours): the
    blocks run K times, each pass from the last one's output plus a learned vector (zero at first)."""

    def __init__(self, hp: Hyperparameters, num_blocks: int, dim: int, mlp_mult: int, loops: int = 1):
        super().__init__()
        self.num_push = num_blocks // 2
        self.blocks = nn.ModuleList(Block(hp, dim, mlp_mult) for _ in range(num_blocks))
        num_skips = min(self.num_push, num_blocks - self.num_push)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, dim))
        self.loops = loops
        if loops > 1:
            self.loop_embed = nn.Parameter(torch.zeros(loops - 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        for loop in range(self.loops):
            if loop:
                x = x + self.loop_embed[loop - 1].to(x.dtype)
            x = self.one_pass(x)
        return x

    def one_pass(self, x: Tensor) -> Tensor:
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


BOS_ID = 1


class BigramHash(nn.Module):
    """BIGRAM_HASH=N (challenge PR #705, #832): an embedding of the (previous byte, byte) pair, hashed
    into N buckets, projected (zero-init) and scaled (learned, 0.05 at first) onto the input. Only
    the byte and the one before it: causal. A pair does not reach across BOS (a document start)."""

    def __init__(self, buckets: int, dim: int, out_dim: int):
        super().__init__()
        self.buckets = buckets
        self.table = nn.Embedding(buckets, dim)
        nn.init.normal_(self.table.weight, std=1.0)
        self.proj = CastedLinear(dim, out_dim, zero_init=True)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids: Tensor) -> Tensor:
        prev = torch.cat((torch.zeros_like(ids[:, :1]), ids[:, :-1]), dim=1)
        prev = torch.where(ids == BOS_ID, 0, prev)
        index = torch.bitwise_xor(prev * 1000003, ids * 2999) % self.buckets
        return self.scale.to(self.proj.weight.dtype) * self.proj(self.table(index))


def smear(x: Tensor, ids: Tensor, gate: Tensor) -> Tensor:
    """SMEAR_GATE=1 (challenge PR #162 as fixed in #1851): x_t + g * (x_{t-1} - x_t), a per-channel
    gate g (zero-init); never at a window's first position or at BOS, so nothing crosses documents."""
    prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)
    keep = (ids != BOS_ID)[..., None].to(x.dtype)
    keep[:, :1] = 0
    return x + gate.to(x.dtype) * keep * (prev - x)


class ModelOutput(NamedTuple):
    loss: Tensor  # (B, L) next-token CE in nats, fp32
    ratio_loss: Tensor  # () the H-Net ratio loss; 0 for the plain GPT (never added in eval)
    boundary_mask: Tensor | None  # (B, L) bool, chunk starts; None for the plain GPT

class HNet(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.hp = hp
        d, dm = hp.embed_dim, hp.model_dim  # the byte-level width and the main stage's
        self.tok_emb = nn.Embedding(hp.vocab_size, d)
        nn.init.normal_(self.tok_emb.weight, std=1.0 if hp.official_init else hp.tied_embed_init_std)
        if hp.bigram_hash:
            self.bigram = BigramHash(hp.bigram_hash, hp.bigram_dim, d)
        if hp.smear_gate:
            self.smear = nn.Parameter(torch.zeros(d))
        if hp.is_hnet:
            main_blocks = hp.num_layers - 2 * hp.outer_layers
            self.encoder = Stage(hp, hp.outer_layers, d, hp.outer_mlp)
            self.routing = RoutingModule(d) if hp.router == "learned" else SpaceRouter(hp.vocab_size)
            self.chunk = ChunkLayer()
            self.main = Stage(hp, main_blocks, dm, hp.mlp_mult, hp.main_loops)
            if dm > d:  # the paper's widening: a learned (zero-init) vector appended to every chunk
                self.main_pad = nn.Parameter(torch.zeros(dm - d))
            self.dechunk = DeChunkLayer()
            self.residual_proj = CastedLinear(d, d, zero_init=True)
            self.decoder = Stage(hp, hp.outer_layers, d, hp.outer_mlp)
        else:
            self.main = Stage(hp, hp.num_layers, dm, hp.mlp_mult, hp.main_loops)
        if hp.official_init:  # OFFICIAL_INIT=1: an untied head and the H-Net code's projections
            self.lm_head = CastedLinear(d, hp.vocab_size)
            nn.init.normal_(self.lm_head.weight, std=0.02)
            adds = 2 * hp.num_layers  # residual adds: attention and MLP of every block
            for m in self.modules():
                if isinstance(m, (CausalSelfAttention, MLP)):
                    nn.init.normal_(m.proj.weight, std=0.02 / math.sqrt(adds))

    def forward(self, input_ids: Tensor, target_ids: Tensor, dynamic_cap: bool = False) -> ModelOutput:
        x, ratio, boundary_mask = self.hidden_states(input_ids, dynamic_cap)
        loss = F.cross_entropy(self.logits(x).flatten(0, 1), target_ids.flatten(), reduction="none")
        return ModelOutput(loss.view_as(target_ids), ratio, boundary_mask)

    def logits(self, x: Tensor) -> Tensor:
        """The head (tied unless OFFICIAL_INIT) with the baseline's soft cap 30 * tanh(x / 30), in fp32."""
        # the untied head is called as a module, so GPTQ's input hook and late QAT reach it
        logits = (self.lm_head(x) if self.hp.official_init else F.linear(x, self.tok_emb.weight.to(x.dtype))).float()
        return self.hp.logit_softcap * torch.tanh(logits / self.hp.logit_softcap)

    def embed(self, input_ids: Tensor) -> Tensor:
        """The input vectors (B, L, D): the byte's embedding, with its hashed bigram and the smear gate."""
        x = self.tok_emb(input_ids)
        if self.hp.bigram_hash:
            x = x + self.bigram(input_ids).to(x.dtype)
        if self.hp.smear_gate:
            x = smear(x, input_ids, self.smear)
        return x

    def run_main(self, chunks: Tensor) -> Tensor:
        """The main stage over chunk vectors (B, C, D_outer): widened to MODEL_DIM, narrowed back."""
        if self.hp.model_dim > self.hp.embed_dim:
            pad = self.main_pad.to(chunks.dtype).expand(*chunks.shape[:-1], -1)
            return self.main(torch.cat((chunks, pad), dim=-1))[..., :self.hp.embed_dim]
        return self.main(chunks)

    def hidden_states(self, input_ids: Tensor, dynamic_cap: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """Final hidden states (B, L, D), the ratio loss and the boundary mask (None for a GPT)."""
        x = self.embed(input_ids)
        if not self.hp.is_hnet:
            return self.main(x), torch.zeros((), device=x.device), None
        h = self.encoder(x)  # (B, L, D)
        router = self.routing(h) if self.hp.router == "learned" else self.routing(input_ids)
        if dynamic_cap:
            cap = int(router.boundary_mask.sum(1).max())
        else:
            cap = max(1, x.size(1) // self.hp.chunk_divisor)
        chunks = self.chunk(h, router, cap)
        z = self.run_main(ScaleGrad.apply(chunks.hidden, 1.0 / self.hp.hnet_lr_diff))  # (B, C, D)
        up = self.dechunk(z, chunks.probs, chunks.chunk_index)  # (B, L, D)
        x = ste_one(router.selected_probs)[..., None].to(up.dtype) * up + self.residual_proj(h)
        x = self.decoder(ScaleGrad.apply(x, self.hp.hnet_lr_diff))
        if self.hp.router == "learned":
            ratio = ratio_loss(router, self.hp.target_avg_chunk_len, bool(self.hp.ratio_loss_per_seq))
        else:  # a fixed rule has nothing to learn
            ratio = torch.zeros((), device=x.device)
        return x, ratio, router.boundary_mask


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

WHITESPACE = b" \t\n\r\f\v"


class SpaceRouter(nn.Module):
    """ROUTER=space (ours): the rule-based control. A chunk starts at every byte after whitespace (and
    after a control id such as BOS, and at a window's start), p = 1 there and 0 elsewhere, so the
    dechunk EMA passes each chunk through. What learning the boundaries buys is measured against it."""

    def __init__(self, vocab_size: int):
        super().__init__()
        after = torch.zeros(vocab_size, dtype=torch.bool)
        after[:4] = True  # pad, BOS, EOS, UNK
        after[[b + 4 for b in WHITESPACE]] = True
        self.register_buffer("after", after, persistent=False)

    def forward(self, ids: Tensor) -> RoutingModuleOutput:
        mask = torch.cat((torch.ones_like(ids[:, :1], dtype=torch.bool), self.after[ids[:, :-1]]), dim=1)
        p = mask.float()
        return RoutingModuleOutput(p, mask, torch.ones_like(p))


class ChunkOutput(NamedTuple):
    hidden: Tensor  # (B, C, D) encoder states at the first C boundaries, zero-padded
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

def ratio_loss(router: RoutingModuleOutput, n: float, per_seq: bool) -> Tensor:
    """H-Net's ratio loss: 1 when both the hard boundary fraction F and the mean probability G
    equal 1/N, larger otherwise; only G carries gradient. per_seq (the published studies): F and
    G of each sequence, losses averaged; otherwise F and G over the whole batch (the paper)."""
    dims = -1 if per_seq else None
    f = router.boundary_mask.float().mean(dim=dims)
    g = router.boundary_prob.mean(dim=dims)
    return (n / (n - 1) * ((n - 1) * f * g + (1 - f) * (1 - g))).mean()


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
    autocast_dtype: torch.dtype | None = None  # bf16 on CUDA; None (fp32) on CPU unless AUTOCAST=bf16

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

def setup_device(hp: Hyperparameters, train: bool = True) -> Runtime:
    """Decide everything device-specific once: NCCL + bf16 + compile on CUDA, gloo + fp32 on CPU.
    AUTOCAST=bf16 on CPU runs the CUDA precision path (bf16 autocast, bf16 Newton-Schulz).
    train=False (evaluation only): any world size, no batch split to check."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    accum = hp.grad_accum_steps or max(1, 8 // world_size)
    if train and 8 % world_size and not hp.grad_accum_steps:
        raise ConfigError(f"WORLD_SIZE={world_size}: must divide 8 (grad accumulation is 8 / WORLD_SIZE), "
                          "or set GRAD_ACCUM_STEPS")
    if train and hp.train_batch_tokens % (world_size * accum * hp.train_seq_len):
        raise ConfigError(f"TRAIN_BATCH_TOKENS={hp.train_batch_tokens} must be a multiple of WORLD_SIZE * "
                          f"grad accumulation * TRAIN_SEQ_LEN = {world_size * accum * hp.train_seq_len}")
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
    bf16 = hp.autocast == "bf16" or (hp.autocast == "auto" and device.type == "cuda")
    return Runtime(device, rank, world_size, accum, compile_on, torch.bfloat16 if bf16 else None)

def run_log(path: Path | None):
    """log(msg, console=True): rank 0 appends to train.log (and prints); other ranks do nothing."""
    def log(msg: str, console: bool = True) -> None:
        if path is None:
            return
        if console:
            print(msg, flush=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(msg + "\n")
    return log

@dataclass
class Run:
    hp: Hyperparameters
    rt: Runtime
    log: Callable
    run_dir: Path
    model: HNet
    compiled: nn.Module
    optimizers: list
    loader: DistributedTokenLoader
    val_tokens: Tensor
    luts: ByteLuts
    data: dict  # tokenizer and validation fingerprints, recorded in every artifact
    step: int = 0
    training_time_ms: float = 0.0  # agreed across ranks, validation and checkpoints excluded
    calibration_ms: float = 0.0  # GPTQ's reading of training data after the loop (inside the budget)
    ema: dict | None = None
    qat: bool = False
    signal_received: int = 0
    last_eval: tuple | None = None  # (step, EvalResult) of the latest float evaluation

def build_optimizers(model: HNet, hp: Hyperparameters, rt: Runtime) -> list:
    """Muon for every linear's matrix (stages, router, residual projection); fused Adam (no host
    sync) for the tied embedding and for vectors and control tensors. Study 03 (ours, off as study
    02): OUTER_LR_MULT multiplies every LR of the byte-level parts (embedding, bigram table, encoder,
    router, decoder; the embedding takes the outer value, as in the H-Net paper), a second group of
    each optimiser; an untied head is trained as the embedding."""
    def byte_level(name: str) -> bool:
        return hp.is_hnet and not (name.startswith("main.") or name == "main_pad")

    names = {id(p): n for n, p in model.named_parameters()}
    tables = [model.tok_emb.weight] + [m.weight for n, m in model.named_modules()
                                      if n in ("bigram.table", "lm_head")]
    table_ids = {id(p) for p in tables}
    matrices = [m.weight for m in model.modules() if isinstance(m, CastedLinear) and id(m.weight) not in table_ids]
    taken = {id(p) for p in matrices} | table_ids
    scalars = [p for p in model.parameters() if id(p) not in taken]

    def split(params, lr) -> list[dict]:  # one group, or the main stage's and the byte-level parts'
        if hp.outer_lr_mult == 1:
            return [{"params": params, "lr": lr, "base_lr": lr}]
        groups = [{"params": [p for p in params if not byte_level(names[id(p)])], "base_lr": lr},
                  {"params": [p for p in params if byte_level(names[id(p)])], "base_lr": lr * hp.outer_lr_mult}]
        return [{**g, "lr": g["base_lr"]} for g in groups if g["params"]]

    def adam(groups):
        return torch.optim.Adam(groups, betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, weight_decay=0.0, fused=True)

    mult = hp.outer_lr_mult if hp.is_hnet else 1.0
    embedding = [{"params": tables, "lr": hp.tied_embed_lr * mult, "base_lr": hp.tied_embed_lr * mult}]
    muon = Muon(split(matrices, hp.matrix_lr), hp.matrix_lr, hp.muon_momentum, hp.muon_backend_steps, rt.rank,
                rt.world_size, rt.autocast_dtype or torch.float32)
    return [adam(embedding), muon, adam(split(scalars, hp.scalar_lr))]


def training_cap_ms(hp: Hyperparameters) -> float:
    """Wall-clock budget for the training loop (0: none); GPTQ's calibration comes out of the same
    budget when it runs, so the reserve is only taken then."""
    if hp.max_wallclock_seconds <= 0:
        return 0.0
    return 1000.0 * (hp.max_wallclock_seconds - hp.reserve_seconds)

class LrSchedule(NamedTuple):
    lr: float  # what every base LR is multiplied by at this step
    warmdown: float  # the warmdown factor alone: 1 until the warmdown starts, never the LR warmup
    warmdown_by_steps: float  # the part of it counted in steps (exact; the rest is a clock estimate)

def lr_schedule(hp: Hyperparameters, step: int, elapsed_ms: float) -> LrSchedule:
    """Linear warmup over LR_WARMUP_STEPS (ours; published: none); linear warmdown to 0 over the last
    WARMDOWN_ITERS steps, or, under a wall-clock cap, the last WARMDOWN_ITERS x (mean step time)."""
    warm = min((step + 1) / hp.lr_warmup_steps, 1.0) if hp.lr_warmup_steps > 0 else 1.0
    by_steps = down = 1.0
    if hp.warmdown_iters > 0:
        by_steps = down = min(max((hp.iterations - step) / hp.warmdown_iters, 0.0), 1.0)
        cap_ms = training_cap_ms(hp)
        if cap_ms > 0 and step > 0:
            warmdown_ms = hp.warmdown_iters * elapsed_ms / step
            down = min(down, max(cap_ms - elapsed_ms, 0.0) / max(warmdown_ms, 1e-9))
    return LrSchedule(min(warm, down), down, by_steps)

def qat_due(hp: Hyperparameters, next_step: int, sched: LrSchedule | None) -> bool:
    """Whether step `next_step` (from 0) and every later one train on fake int6 weights. Late QAT
    (published): after the step whose warmdown factor fell below LATE_QAT_THRESHOLD; the LR warmup
    never counts, and a wall-clock estimate counts only from LATE_QAT_MIN_STEPS, since it is made
    from the mean step time and one slow early step can put it below any threshold, which would
    latch QAT for a whole 4-hour run. QAT_FROM_STEP=K (ours): from step K (from 1) on."""
    if hp.qat_from_step > 0:
        return next_step + 1 >= hp.qat_from_step
    if sched is None or hp.late_qat_threshold <= 0:
        return False
    if sched.warmdown_by_steps < hp.late_qat_threshold:
        return True
    return sched.warmdown < hp.late_qat_threshold and next_step >= hp.late_qat_min_steps

def all_reduce_grads(model: nn.Module, rt: Runtime) -> None:
    params = list(model.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if rt.world_size == 1:
        return
    flat = torch.cat([p.grad.flatten().float() for p in params])  # fp32 buffer (gloo and NCCL alike)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for p, g in zip(params, (flat / rt.world_size).split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))

@torch.no_grad()
def refresh_qat(model: nn.Module, on: bool, floor: bool) -> None:
    """Point every linear's training forward at its current int6 rounding (on) or at itself (off)."""
    for m in model.modules():
        if isinstance(m, CastedLinear):
            if on:
                q, scale = quantize_int6_rows(m.weight, floor)
                m.qat_delta.copy_(q.float() * scale.float()[:, None] - m.weight)
            else:
                m.qat_delta.zero_()

class StepStats(NamedTuple):
    """One step's global sums, the slowest rank's clock at the step's gate (ms) and any rank's signal."""
    ce: float
    ratio: float
    chunks: float
    bytes: float
    micro_steps: float
    nonfinite: float
    clock_ms: float
    signal: float

def train_step(run: Run, mul: float, gate: float) -> tuple[StepStats, float]:
    """One optimizer step at LR multiplier `mul`. Stats, the ranks' clocks (time since the previous
    gate) and signals cross to the host in one copy, the gate, before the update; not finite: no update."""
    hp, rt = run.hp, run.rt
    stats = torch.zeros(6, device=rt.device, dtype=torch.float64)
    for _ in range(rt.grad_accum_steps):
        x, y = run.loader.next_batch()
        with rt.autocast():
            out = run.compiled(x, y)
            ce = out.loss.mean()
            loss = ce + hp.ratio_loss_weight * out.ratio_loss if hp.is_hnet else ce
        (loss / rt.grad_accum_steps).backward()
        chunks = out.boundary_mask.sum() if out.boundary_mask is not None else (x >= 0).sum()
        in_bytes = (run.luts.base_bytes[x] + run.luts.has_leading_space[x].long()).sum()
        one = torch.ones((), device=rt.device, dtype=torch.float64)
        stats += torch.stack((ce.detach().double(), out.ratio_loss.detach().double(), chunks.double(),
                              in_bytes.double(), one, (~torch.isfinite(loss.detach())).double()))
    all_reduce_grads(run.model, rt)
    now = time.perf_counter()
    clock = torch.tensor([run.training_time_ms + 1000 * (now - gate), float(run.signal_received)],
                         device=rt.device, dtype=torch.float64)
    if rt.world_size > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        dist.all_reduce(clock, op=dist.ReduceOp.MAX)  # every rank stops on the same step
    host = StepStats(*torch.cat((stats, clock)).tolist())  # the step's one device-to-host transfer
    if host.nonfinite > 0:
        run.model.zero_grad(set_to_none=True)
        return host, now
    if hp.grad_clip_norm > 0:  # off in every published run
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), hp.grad_clip_norm)
    frac = min(run.step / hp.muon_momentum_warmup_steps, 1.0) if hp.muon_momentum_warmup_steps > 0 else 1.0
    for group in run.optimizers[1].param_groups:
        group["momentum"] = (1 - frac) * hp.muon_momentum_warmup_start + frac * hp.muon_momentum
    for opt in run.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * mul
        opt.step()
    run.model.zero_grad(set_to_none=True)
    if run.qat:
        refresh_qat(run.model, True, bool(hp.quant_scale_floor))
    if run.ema is not None:
        with torch.no_grad():
            for name, p in run.model.state_dict().items():
                run.ema[name].mul_(hp.ema_decay).add_(p.float(), alpha=1 - hp.ema_decay)
    return host, now

def checkpoint_state(run: Run) -> dict:
    """Everything a resume needs, in types that torch.load(weights_only=True) reads back."""
    np_state = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                     "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if run.rt.is_cuda:
        rng["cuda"] = torch.cuda.get_rng_state()
    return {"model": run.model.state_dict(), "optimizers": [o.state_dict() for o in run.optimizers],
            "loader": run.loader.stream.state(), "step": run.step, "training_time_ms": run.training_time_ms,
            "rng": rng, "config": asdict(run.hp), "ema": run.ema, "qat": run.qat, "data": run.data}

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

def restore_state(run: Run, state: dict) -> str:
    """Put a checkpoint_state() back: weights, optimisers, data position, clock, EMA, QAT, RNG.
    EMA follows this run's EMA_DECAY; returns what that changed ("" if nothing)."""
    run.model.load_state_dict(state["model"])
    for opt, s in zip(run.optimizers, state["optimizers"]):
        opt.load_state_dict(s)
    run.loader.stream.load_state(state["loader"])
    run.step, run.training_time_ms, run.qat = state["step"], state["training_time_ms"], state["qat"]
    run.ema, note = state["ema"], ""
    if run.hp.ema_decay > 0 and run.ema is None:
        run.ema = {k: v.detach().float().clone() for k, v in run.model.state_dict().items()}
        note = f"ema: the checkpoint has no EMA; EMA_DECAY={run.hp.ema_decay:g} starts it from the resumed weights"
    elif run.hp.ema_decay <= 0 and run.ema is not None:
        run.ema, note = None, "ema: EMA_DECAY=0, so the checkpoint's EMA weights are dropped"
    refresh_qat(run.model, run.qat, bool(run.hp.quant_scale_floor))
    rng = state["rng"]
    torch.set_rng_state(rng["torch"].cpu())
    np_state = rng["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    random.setstate(rng["python"])
    if run.rt.is_cuda and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"].cpu())
    return note

def load_checkpoint(run: Run, path: str) -> None:
    try:
        state = torch.load(path, map_location=run.rt.device, weights_only=True)
    except Exception as e:
        raise ConfigError(f"RESUME_FROM={path}: unreadable checkpoint: {e}") from None
    for name in SHAPE_FIELDS:
        if state["config"][name] != getattr(run.hp, name):
            raise ConfigError(f"RESUME_FROM={path} was trained with {name.upper()}={state['config'][name]}, "
                              f"this run has {getattr(run.hp, name)}")
    if state.get("data", {}).get("tokenizer", run.data["tokenizer"]) != run.data["tokenizer"]:
        raise ConfigError(f"RESUME_FROM={path} was trained with another tokenizer ({state['data']['tokenizer']})")
    note = restore_state(run, state)
    run.log(f"resumed_from:{path} step:{run.step} train_time:{run.training_time_ms:.0f}ms")
    if note:
        run.log(note)

def prime_compile(run: Run) -> None:
    """Run WARMUP_STEPS real steps so compilation and allocator warm-up happen off the clock, then
    restore everything a checkpoint holds (weights, optimisers, data position, ...): no trace."""
    if run.hp.warmup_steps <= 0:
        return
    snapshot = copy.deepcopy(checkpoint_state(run))  # state_dict tensors alias the live weights
    for _ in range(run.hp.warmup_steps):
        train_step(run, 1.0, time.perf_counter())
        if run.signal_received:
            raise TrainingStopped(f"stopped by signal {run.signal_received} during compile priming; nothing was "
                                  "trained", 128 + run.signal_received)
    restore_state(run, snapshot)
    run.model.zero_grad(set_to_none=True)
    run.log(f"warmup_steps:{run.hp.warmup_steps} done (compile priming, undone: weights, optimisers, data, "
            "RNG restored)")

def start_qat_if_due(run: Run, sched: LrSchedule | None) -> None:
    if run.qat or not qat_due(run.hp, run.step, sched):
        return
    run.qat = True
    refresh_qat(run.model, True, bool(run.hp.quant_scale_floor))
    if run.hp.qat_from_step > 0:
        run.log(f"qat: on from step {run.step + 1} (QAT_FROM_STEP={run.hp.qat_from_step}, whatever the LR)")
    else:
        run.log(f"late_qat: on from step {run.step + 1} (warmdown factor {sched.warmdown:.4f}, "
                f"lr multiplier {sched.lr:.4f})")

def log_eta(run: Run) -> None:
    """After the first steps: how long the run will train on this machine at their pace."""
    hp, ms = run.hp, run.training_time_ms / run.step
    total_s = hp.iterations * ms / 1000
    line = f"eta: {hp.iterations} steps at {ms:.0f} ms/step is about {total_s / 60:.1f} min of training here"
    cap_ms = training_cap_ms(hp)
    if 0 < cap_ms < hp.iterations * ms:
        line += f"; the wall-clock cap ({cap_ms / 1000:g}s of training) stops it first, near step {cap_ms / ms:.0f}"
    run.log(line)

def train(run: Run) -> None:
    hp, log = run.hp, run.log
    cap_ms = training_cap_ms(hp)
    capped = cap_ms > 0 and run.training_time_ms >= cap_ms  # a resumed finished run goes straight to export
    eta_step = min(10, hp.iterations)
    gate = time.perf_counter()  # host time of the last step's gate; pauses are added to it
    start_qat_if_due(run, None)
    while True:
        last = run.step >= hp.iterations or capped
        if last or (hp.val_loss_every > 0 and run.step % hp.val_loss_every == 0):
            t0 = time.perf_counter()
            res = evaluate_bpb(run.compiled, run.rt, hp, run.val_tokens, run.luts)
            run.last_eval = (run.step, res)
            log(f"step:{run.step}/{hp.iterations} val_loss:{res.val_loss:.4f} val_bpb:{res.val_bpb:.4f} "
                f"train_time:{run.training_time_ms:.0f}ms "
                f"step_avg:{run.training_time_ms / max(run.step, 1):.2f}ms")
            gate += time.perf_counter() - t0  # validation is off the clock
        if last:
            break
        sched = lr_schedule(hp, run.step, run.training_time_ms)
        stats, gate = train_step(run, sched.lr, gate)
        if stats.nonfinite > 0:
            ckpts = sorted((run.run_dir / "checkpoints").glob("step_*.pt"))
            keep = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
            raise TrainingStopped(f"non-finite loss at step {run.step + 1}; the update was not applied; {keep}", 3)
        run.training_time_ms = stats.clock_ms
        run.step += 1
        start_qat_if_due(run, sched)
        if hp.train_log_every > 0 and (run.step % hp.train_log_every == 0 or run.step <= 10):
            n = stats.micro_steps
            log(f"step:{run.step}/{hp.iterations} train_loss:{stats.ce / n:.4f} ratio_loss:{stats.ratio / n:.4f} "
                f"bytes_per_chunk:{stats.bytes / max(stats.chunks, 1):.2f} "
                f"train_time:{run.training_time_ms:.0f}ms step_avg:{run.training_time_ms / run.step:.2f}ms")
        if run.step == eta_step:
            log_eta(run)
        if stats.signal > 0:
            path = save_checkpoint(run)
            raise TrainingStopped(f"stopped by signal {int(stats.signal)} after step {run.step}; to continue, "
                                  f"rerun with the same environment plus RESUME_FROM={path}",
                                  128 + int(stats.signal))
        if hp.checkpoint_every > 0 and run.step % hp.checkpoint_every == 0:
            t0 = time.perf_counter()
            save_checkpoint(run)
            gate += time.perf_counter() - t0
        if cap_ms > 0 and run.training_time_ms >= cap_ms and run.step < hp.iterations:
            reserve = f" (reserving {hp.reserve_seconds:g}s for GPTQ)" if hp.reserve_seconds else ""
            log(f"stopping_early: wallclock_cap train_time:{run.training_time_ms:.0f}ms "
                f"step:{run.step}/{hp.iterations}{reserve}")
            capped = True
    save_checkpoint(run)

def hessian_hook(sums: dict, counts: dict, key: str, device_type: str):
    """Forward hook: sums[key] += X^T X in fp32 outside autocast (a bf16 product loses definiteness)."""
    def hook(module, inputs, output):
        with torch.autocast(device_type, enabled=False):
            x = inputs[0].detach().flatten(0, -2).float()
            xtx = x.T @ x
        sums[key] = sums[key].add_(xtx) if key in sums else xtx
        counts[key] = counts.get(key, 0) + x.size(0)
    return hook

@torch.no_grad()
def collect_hessians(run: Run) -> dict[str, Tensor]:
    """H = mean X^T X of every large linear's inputs over GPTQ_CALIB_BATCHES micro-batches, eval mode.
    Published (GPTQ_CALIB_ALL_RANKS=0): rank 0 alone, a fresh loader at the start of the train stream,
    reading rank 0's slice of each batch (so the Hessians depend on the world size). 1: the micro-
    batches one process would read next from the continuing stream, shared out over the ranks and
    summed in fp32: the same Hessians on 1, 2 or 8 processes."""
    hp, rt = run.hp, run.rt
    all_ranks = bool(hp.gptq_calib_all_ranks)
    if not all_ranks and not rt.master:
        return {}
    loader = run.loader if all_ranks else DistributedTokenLoader(hp, rt)
    linears = {f"{name}.weight": m for name, m in run.model.named_modules()
               if isinstance(m, CastedLinear) and m.weight.numel() > hp.keep_float_max_numel}
    # every rank holds every key, so the all-reduces below line up even where a rank reads nothing
    sums = {k: torch.zeros(m.in_features, m.in_features, device=rt.device) for k, m in linears.items()}
    counts = {k: 0 for k in linears}
    hooks = [m.register_forward_hook(hessian_hook(sums, counts, k, rt.device.type)) for k, m in linears.items()]
    shares = rt.world_size if all_ranks else 1
    run.model.eval()
    try:
        for call in range(math.ceil(hp.gptq_calib_batches / shares)):
            x, y = loader.next_batch()  # all ranks: each its own slice of `shares` micro-batches
            if call * shares + (rt.rank if all_ranks else 0) >= hp.gptq_calib_batches:
                continue  # past the micro-batches one process would have read
            with rt.autocast():
                run.model(x, y)
    finally:
        for h in hooks:
            h.remove()
        run.model.train()
    out = {}
    for key in sorted(sums):
        h, n = sums[key], torch.tensor(float(counts[key]), device=rt.device)
        if all_ranks and rt.world_size > 1:
            dist.all_reduce(h, op=dist.ReduceOp.SUM)
            dist.all_reduce(n, op=dist.ReduceOp.SUM)
        out[key] = h / n
    return out

FORMAT_LABELS = {"int8": "int8_zlib", "int6": "int6_zstd"}

def export_artifact(run: Run, fmt: str, state: dict, hessians: dict | None) -> tuple[Path, int]:
    """Quantise the float state and compress it on rank 0; print the size verdict at once."""
    path = run.run_dir / f"final_model.{fmt}.ptz"
    if run.rt.master:
        payload = quantize_state_dict(state, fmt, run.hp, hessians, run.data)
        for name in payload["stats"]["gptq_fallbacks"]:
            run.log(f"WARNING: gptq: {name}: Hessian not positive definite even with 100x damping; "
                    "rounded to nearest")
        if fmt == "int6":
            run.log(f"prune: {payload['stats']['pruned']} int6 values set to 0 (PRUNE_PCT={run.hp.prune_pct:g}, "
                    f"PRUNE_NONZERO={run.hp.prune_nonzero})")
        write_atomic(path, compress(payload, fmt))
    if run.rt.world_size > 1:
        dist.barrier()
    model_bytes = path.stat().st_size
    total = code_bytes() + model_bytes
    verdict = "under" if total <= SIZE_CAP_BYTES else "OVER"
    run.log(f"serialized_{fmt}: {path} model_bytes:{model_bytes} code_bytes:{code_bytes()} total_bytes:{total} "
            f"headroom:{SIZE_CAP_BYTES - total} ({verdict} the {SIZE_CAP_BYTES:,}-byte cap)")
    return path, total

def calibrate(run: Run) -> dict | None:
    """GPTQ's Hessians, timed: reading training data counts against the wall-clock budget, so a
    calibration longer than its reserve is said loudly (and recorded in submission.json)."""
    if not run.hp.uses_gptq:
        return None
    t0 = time.perf_counter()
    hessians = collect_hessians(run)
    elapsed = torch.tensor([1000 * (time.perf_counter() - t0)], device=run.rt.device, dtype=torch.float64)
    if run.rt.world_size > 1:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the ranks that waited waited this long too
    run.calibration_ms = elapsed.item()
    hp = run.hp
    run.log(f"gptq: hessians for {len(hessians) if run.rt.master else 0} matrices from {hp.gptq_calib_batches} "
            f"batches in {run.calibration_ms:.0f}ms (reserve {hp.gptq_reserve_seconds:g}s)")
    budget_ms = 1000 * hp.max_wallclock_seconds
    if budget_ms > 0 and run.training_time_ms + run.calibration_ms > budget_ms:
        run.log(f"WARNING: training ({run.training_time_ms / 1000:.1f}s) plus GPTQ calibration "
                f"({run.calibration_ms / 1000:.1f}s) read training data for "
                f"{(run.training_time_ms + run.calibration_ms) / 1000:.1f}s, over MAX_WALLCLOCK_SECONDS="
                f"{hp.max_wallclock_seconds:g}: raise GPTQ_RESERVE_SECONDS above {run.calibration_ms / 1000:.0f} "
                "or lower GPTQ_CALIB_BATCHES; this run breaks the time rule")
    return hessians

def export_and_evaluate(run: Run) -> dict:
    """Quantise every format from the same trained float weights, read each file back and score it
    (the round trip is the score); the last of EXPORT_FORMATS is the headline."""
    hp, rt, log = run.hp, run.rt, run.log
    if run.ema is not None:
        run.model.load_state_dict({k: v.to(run.model.state_dict()[k].dtype) for k, v in run.ema.items()})
        log(f"ema: loaded EMA weights (decay {hp.ema_decay})")
        run.last_eval = None
    refresh_qat(run.model, False, bool(hp.quant_scale_floor))
    float_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    if rt.master:
        save_atomic(float_state, run.run_dir / "final_model.pt")

    def score(label: str, model: nn.Module = run.compiled, res: EvalResult | None = None, **kw) -> dict:
        res = res or evaluate_bpb(model, rt, hp, run.val_tokens, run.luts, **kw)
        log(f"final_{label} val_loss:{res.val_loss:.8f} val_bpb:{res.val_bpb:.8f}")
        return res._asdict()

    done = run.last_eval[1] if run.last_eval and run.last_eval[0] == run.step else None  # scored at the last step
    metrics = {"float": score("float", res=done)}
    t0 = time.perf_counter()
    hessians = calibrate(run)
    exported = {fmt: export_artifact(run, fmt, float_state, hessians if fmt == "int6" else None)
                for fmt in hp.formats}
    for fmt, (path, total) in exported.items():
        run.model.load_state_dict(dequantize_state_dict(read_artifact(path)))
        metrics[f"{fmt}_roundtrip"] = {**score(f"{FORMAT_LABELS[fmt]}_roundtrip_exact"), "bytes_total": total}
    log(f"export_and_roundtrip_time:{1000 * (time.perf_counter() - t0):.0f}ms")
    final = hp.formats[-1]  # the model now holds this format's round trip
    if hp.eval_sliding:
        metrics[f"{final}_sliding"] = score(f"{FORMAT_LABELS[final]}_sliding_exact", stride=hp.eval_stride)
    if hp.dynamic_cap and hp.is_hnet:
        metrics[f"{final}_dynamic_cap"] = score(f"{FORMAT_LABELS[final]}_dynamic_cap", run.model, dynamic_cap=True)
    metrics["headline_format"] = final
    metrics["bytes_total"], metrics["bytes_code"] = exported[final][1], code_bytes()
    metrics["over_cap"] = metrics["bytes_total"] > SIZE_CAP_BYTES
    if metrics["over_cap"]:
        log(f"ERROR: the {final} artifact is {metrics['bytes_total']:,} bytes, over the {SIZE_CAP_BYTES:,}-byte cap")
    if rt.master:
        write_submission(run, metrics)
    return metrics

def write_submission(run: Run, metrics: dict) -> None:
    """submission.json in the challenge's record-folder format, plus what a reader needs to trust it."""
    hp, final = run.hp, metrics["headline_format"]
    headline = metrics.get(f"{final}_sliding", metrics[f"{final}_roundtrip"])
    if run.rt.is_cuda:
        hardware = f"{run.rt.world_size}x{torch.cuda.get_device_name(run.rt.device)}"
    else:
        hardware = f"{run.rt.world_size}x CPU ({platform.processor() or platform.machine()})"
    tokenizer = "byte260" if not hp.uses_sentencepiece else f"sp{hp.vocab_size}"
    export = "GPTQ int6 + zstd-22" if final == "int6" else "int8 + zlib-9"
    val_total = sum(run.data["val"]["tokens"]) - 1
    budget_ms = 1000 * hp.max_wallclock_seconds
    sub = {"author": hp.submission_author, "name": hp.submission_name or hp.run_id,
           "blurb": f"{'H-Net' if hp.is_hnet else 'GPT'} ({tokenizer}), {hp.num_layers} layers, "
                    f"OUTER_LAYERS={hp.outer_layers}, {export}",
           "date": time.strftime("%Y-%m-%d"), "val_loss": headline["val_loss"], "val_bpb": headline["val_bpb"],
           "bytes_total": metrics["bytes_total"], "bytes_code": metrics["bytes_code"],
           "pre_quant_val_bpb": metrics["float"]["val_bpb"],
           "roundtrip_val_bpb": metrics[f"{final}_roundtrip"]["val_bpb"],
           **{f"{fmt}_roundtrip_val_bpb": metrics[f"{fmt}_roundtrip"]["val_bpb"] for fmt in hp.formats},
           "val_targets_scored": metrics["float"]["tokens"], "val_targets_total": val_total,
           "whole_val_split": metrics["float"]["tokens"] == val_total,
           "seeds": [hp.seed], "steps": run.step,
           "train_time_ms": round(run.training_time_ms + run.calibration_ms),  # GPTQ reads training data too
           "gptq_calibration_ms": round(run.calibration_ms),
           "within_time_budget": budget_ms <= 0 or run.training_time_ms + run.calibration_ms <= budget_ms,
           "hardware": hardware, "torch_version": torch.__version__, "data": run.data}
    write_atomic(run.run_dir / "submission.json", (json.dumps(sub, indent=2) + "\n").encode())

def log_header(run: Run, warnings: list[str]) -> None:
    log = run.log
    log(Path(__file__).read_text(encoding="utf-8"), console=False)
    log("=" * 100, console=False)
    log(f"python:{sys.version.split()[0]} torch:{torch.__version__} numpy:{np.__version__}", console=False)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        log(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10).stdout, console=False)
    log("\n".join(f"{key}:{value}" for key, value in asdict(run.hp).items()), console=False)
    log(f"data:{json.dumps(run.data)}", console=False)
    for w in warnings:
        log(f"WARNING: {w}")
    log(f"world_size:{run.rt.world_size} grad_accum_steps:{run.rt.grad_accum_steps} device:{run.rt.device} "
        f"compile:{run.rt.compile} autocast:{run.rt.autocast_dtype or 'off'}")
    log(f"model_params:{sum(p.numel() for p in run.model.parameters())}")

def build_run(hp: Hyperparameters, rt: Runtime) -> tuple[Run, list[str]]:
    """Check every input before the run folder exists (a failed start leaves nothing behind)."""
    luts = build_byte_luts(hp, rt.device)
    val = load_validation(hp)
    loader = DistributedTokenLoader(hp, rt)
    if hp.resume_from and not os.path.isfile(hp.resume_from):
        raise ConfigError(f"RESUME_FROM={hp.resume_from}: no such checkpoint")
    random.seed(hp.seed)
    np.random.seed(hp.seed)
    torch.manual_seed(hp.seed)
    model = HNet(hp).to(rt.device)
    # fullgraph: a graph break is an error, not a silent slowdown; static shapes (fixed chunk cap).
    compiled = model
    if rt.compile:
        compiled = torch.compile(model, dynamic=False, fullgraph=True, backend=hp.compile_backend)
    if not hp.run_id:
        run_id = [time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]]
        if rt.world_size > 1:
            dist.broadcast_object_list(run_id, src=0)
        hp.run_id = run_id[0]
    run_dir = Path(hp.output_dir or os.path.join("runs", hp.run_id))
    if rt.master:
        run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(hp, rt, run_log(run_dir / "train.log" if rt.master else None), run_dir, model, compiled,
              build_optimizers(model, hp, rt), loader, val.tokens, luts, val.fingerprint)
    if hp.ema_decay > 0:
        run.ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    return run, val.warnings

def run_training(hp: Hyperparameters, warnings: list[str] = ()) -> tuple[Run, dict]:
    """The whole run in this process (one rank under torchrun). Raises ConfigError, TrainingStopped
    (NaN loss; a signal: the first stops after the step with a checkpoint, a second at once) or
    NonFiniteScore. Export and final evaluation run with the default signal handlers."""
    rt = setup_device(hp)
    run, data_warnings = build_run(hp, rt)
    if rt.master:
        print(f"run_dir:{run.run_dir}", flush=True)
    log_header(run, list(warnings) + data_warnings)

    def on_signal(signum, frame):
        if run.signal_received:
            raise TrainingStopped(f"aborted by a second signal {signum}", 128 + signum)
        run.signal_received = signum

    handlers = {}
    with contextlib.suppress(ValueError):  # signals can only be caught on the main thread
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        prime_compile(run)
        if hp.resume_from:
            load_checkpoint(run, hp.resume_from)
        train(run)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    metrics = export_and_evaluate(run)
    run.log(f"run_dir:{run.run_dir}")
    return run, metrics

def main() -> int:
    try:
        hp, warnings = Hyperparameters.from_env()
        _, metrics = run_training(hp, warnings)
        code = 4 if metrics["over_cap"] else 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except NonFiniteScore as e:
        print(f"error: {e}", file=sys.stderr)
        code = 3
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("stopped: interrupted after training (during export or evaluation); the final checkpoint is in "
              "the run folder's checkpoints/, and RESUME_FROM=<it> redoes the export", file=sys.stderr)
        code = 130
    if dist.is_initialized():
        if code in (0, 4):  # ranks leave together: one leaving mid-talk can abort in gloo teardown
            dist.barrier()
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
