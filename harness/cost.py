"""What a named run will cost before it runs: the artifact size (from Gaussian weights in the
run's own export format) for `train_hnet.py --dry-run`."""

from __future__ import annotations

from pathlib import Path


def estimate_size(trainer, hp) -> dict:
    """The run's parameter count, fp32 bytes and an estimate of its artifact, without training or
    data: one matrix of each shape is filled with N(0, 1) weights (so a scale floor does not bind),
    quantised and compressed in the trainer's final format (round to nearest, no Hessian), and its
    bytes per element scaled to every matrix of that shape; small tensors count at their stored
    width. Trained weights compress differently: this is an estimate, labelled as one."""
    import torch

    with torch.device("meta"):
        model = trainer.HNet(hp)
    fmt = hp.formats[-1]
    shapes, small = {}, 0
    for name, p in model.state_dict().items():
        if p.ndim == 2 and p.numel() > hp.keep_float_max_numel:
            key = (tuple(p.shape), fmt == "int8" or name in getattr(trainer, "TABLES", ("tok_emb.weight",)))
            shapes[key] = shapes.get(key, 0) + 1
        else:
            small += p.numel() * (4 if any(k in name for k in trainer.CONTROL_NAMES) else 2)
    g = torch.Generator().manual_seed(0)
    model_bytes = small
    codec = {"export_codec": hp.export_codec} if hasattr(hp, "export_codec") else {}  # study 03's grouped codec
    for (shape, as_int8), count in shapes.items():
        w = torch.randn(shape, generator=g)
        if as_int8:
            q, scale = trainer.quantize_int8_rows(w, bool(hp.quant_scale_floor))
        else:
            q, scale = trainer.quantize_int6_matrix(w, None, hp)
            trainer.prune_int6({"w": (q, scale)}, hp.prune_pct, bool(hp.prune_nonzero))
        payload = {"config": codec, "tensors": {"w": {"q": q, "scale": scale, "bits": 8 if as_int8 else 6}}}
        model_bytes += count * len(trainer.compress(payload, fmt))
    params = sum(p.numel() for p in model.parameters())
    code = len(Path(trainer.__file__).read_bytes())
    return {"model_params": params, "float_bytes": 4 * params, "format": fmt, "code_bytes": code,
            "codec": codec.get("export_codec", "torch_zstd"),
            "estimated_model_bytes": model_bytes, "estimated_total_bytes": code + model_bytes}


def print_estimate(e: dict, cap: int, published: dict | None) -> None:
    label = {"int8": "int8 + zlib-9", "int6": "int6 + zstd-22"}[e["format"]]
    if e.get("codec") == "grouped" and e["format"] == "int6":
        label = "int6, grouped streams (zstd-22 or lzma, byte-shuffled)"
    total = e["estimated_total_bytes"]
    print(f"model_params:{e['model_params']}")
    print(f"float_bytes:{e['float_bytes']} (fp32 weights)")
    print(f"estimated_artifact_bytes:{total} ({label}: model ~{e['estimated_model_bytes']:,} + code "
          f"{e['code_bytes']:,}) = {total / cap:.1%} of the {cap:,}-byte cap"
          f"{'' if total <= cap else ' (the estimate is over it)'}")
    published_size = f"; the published artifact was {published['bytes_total']:,} bytes" \
        if "bytes_total" in (published or {}) else ""
    print("  an ESTIMATE from Gaussian weights, not a trained model: trained weights are heavier-tailed and "
          "usually compress a few percent better; the real size is printed after training" + published_size)


# ------------------------------------------------------------------------------------------------
# FLOPs, step time and memory: what a run will cost on 8xH100 before renting them.
# ------------------------------------------------------------------------------------------------

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H100 SXM (NVIDIA's datasheet, no sparsity)
GPUS = 8
# Measured on 8xH100 by the published runs: (label, ms a step, the runs.json entry it is fitted on).
# The efficiency (achieved / peak) of a compiled GPT comes from the challenge baseline, that of a
# compiled H-Net from study 02; study 01 (eager, dynamic shapes) is predicted, not fitted.
CALIBRATION = {"gpt": ("the baseline GPT", 43.5, ("02", "baseline_gpt_sp1024_10min")),
               "hnet": ("study 02's byte260 H-Net", 93.0, ("02", "byte260_4h"))}
BYTES_PER_SP1024_TOKEN = 2.44  # FineWeb validation: 151.08 M bytes / 62.02 M tokens (SPEC 3.4)


def stage_positions(hp) -> dict[str, float]:
    """Positions each stage runs over, per sequence: the bytes (tokens) for the outer stages, router
    and head; for the main stage the chunk cap C (study 02: static, padded) or, for study 01's
    dynamic count, L / TARGET_AVG_CHUNK_LEN (the ratio loss's target: an estimate)."""
    length = hp.train_seq_len
    if not hp.is_hnet:
        return {"main": length, "outer": length}
    main = length // hp.chunk_divisor if hasattr(hp, "chunk_divisor") else length / hp.target_avg_chunk_len
    return {"main": main * getattr(hp, "main_loops", 1), "outer": length}


def flops_per_sequence(trainer, hp) -> dict[str, float]:
    """Forward FLOPs of one training sequence, by part: every linear at 2 x in x out per position of
    its stage, causal attention at 2 x L x d_q per position (QK^T and AV, half of them masked), the
    tied head at 2 x d x V per token. Read from the model the trainer builds (on the meta device), so
    a change of widths, depths or stages is counted as built."""
    import torch

    with torch.device("meta"):
        model = trainer.HNet(hp)
    positions = stage_positions(hp)
    parts = {"main": 0.0, "outer": 0.0, "attention": 0.0, "head": 0.0}
    for name, m in model.named_modules():
        stage = "main" if name.startswith("main.") or not hp.is_hnet else "outer"
        if isinstance(m, torch.nn.Linear):
            parts[stage] += 2 * m.in_features * m.out_features * positions[stage]
        if hasattr(m, "c_q") and hasattr(m, "num_heads"):  # an attention module: its scores and weighted sum
            n = positions[stage]
            parts["attention"] += 2 * m.c_q.out_features * n * n
    vocab, dim = model.tok_emb.weight.shape
    parts["head"] = 2 * vocab * dim * hp.train_seq_len
    return parts


def calibrated_efficiency(kind: str) -> float:
    """Achieved / peak FLOP/s of the published run CALIBRATION names, from its runs.json env."""
    from harness import modules

    _, ms, (study_name, run) = CALIBRATION[kind]
    study = modules.study_dir(study_name)
    trainer = modules.trainer_of(study)
    env = {k: v for k, v in modules.load_runs(study)[run]["env"].items() if k not in ("DATA_PATH",)}
    hp, _ = trainer.Hyperparameters.from_env(env)
    flops = 3 * sum(flops_per_sequence(trainer, hp).values()) * hp.train_batch_tokens / hp.train_seq_len
    return flops / GPUS / (ms / 1000) / H100_BF16_PEAK


def memory_per_gpu(trainer, hp, params: int) -> dict[str, float]:
    """A per-GPU estimate, in bytes, of one rank's share of a step on 8 GPUs (no activation
    recomputation): fp32 weights and gradients and the optimiser state (Adam's two moments,
    Muon's one, so at most 16 bytes a parameter); bf16 activations saved for the backward pass,
    about 24 x d bytes a position a block (attention 11, the 2x relu^2 MLP 10, norms 3, after
    Korthikanti et al. 2022, with flash attention keeping no L x L scores); the fp32 logits, their
    soft cap and gradient (12 bytes a vocabulary entry a token); for an H-Net, the dechunk scan's
    fp32 levels (log2 C of them, 3 tensors of C x d each)."""
    import math

    rank_sequences = hp.train_batch_tokens / GPUS / hp.train_seq_len  # grad accumulation 1 on 8 ranks
    positions = stage_positions(hp)
    blocks = {"outer": 2 * hp.outer_layers if hp.is_hnet else 0,
              "main": hp.num_layers - 2 * hp.outer_layers if hp.is_hnet else hp.num_layers}
    acts = sum(24 * hp.model_dim * positions[s] * blocks[s] for s in blocks) * rank_sequences
    logits = 12 * hp.vocab_size * hp.train_seq_len * rank_sequences
    scan = 0.0
    if hp.is_hnet:
        chunks = positions["main"]
        scan = math.ceil(math.log2(max(chunks, 2))) * 3 * chunks * hp.model_dim * 4 * rank_sequences
    return {"weights_grads_optimiser": 16.0 * params, "activations": acts, "logits": logits, "dechunk_scan": scan}


def cost_model(trainer, hp) -> dict:
    """FLOPs per byte (forward and backward), bytes a step, the predicted ms a step on 8xH100 at the
    calibrated efficiency of its kind, the steps that fit the wall-clock budget, memory per GPU."""
    parts = flops_per_sequence(trainer, hp)
    bytes_per_token = BYTES_PER_SP1024_TOKEN if hp.uses_sentencepiece else 1.0
    sequence_bytes = hp.train_seq_len * bytes_per_token
    flops_per_byte = 3 * sum(parts.values()) / sequence_bytes
    step_flops = flops_per_byte * hp.train_batch_tokens * bytes_per_token
    kind = "hnet" if hp.is_hnet else "gpt"
    efficiency = calibrated_efficiency(kind)
    ms = step_flops / GPUS / (efficiency * H100_BF16_PEAK) * 1000
    budget_s = hp.max_wallclock_seconds - getattr(hp, "reserve_seconds", 0.0)
    steps = min(hp.iterations, int(budget_s * 1000 / ms)) if hp.max_wallclock_seconds > 0 else hp.iterations
    with __import__("torch").device("meta"):
        params = sum(p.numel() for p in trainer.HNet(hp).parameters())
    return {"flops_per_byte": flops_per_byte, "flops_by_part": {k: 3 * v / sequence_bytes for k, v in parts.items()},
            "bytes_per_step": hp.train_batch_tokens * bytes_per_token, "calibrated_on": CALIBRATION[kind][0],
            "efficiency": efficiency, "predicted_ms_per_step": ms, "predicted_steps": steps,
            "memory_per_gpu": memory_per_gpu(trainer, hp, params)}


def print_cost(c: dict) -> None:
    parts = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in c["flops_by_part"].items() if v)
    mem = c["memory_per_gpu"]
    print(f"flops_per_byte:{c['flops_per_byte'] / 1e6:.1f} M forward + backward ({parts})")
    print(f"bytes_per_step:{c['bytes_per_step']:,.0f}")
    print(f"predicted_ms_per_step:{c['predicted_ms_per_step']:.1f} on {GPUS}xH100, at the {c['efficiency']:.1%} of "
          f"bf16 peak that {c['calibrated_on']} reached (a PREDICTION; see the README for how far it holds)")
    print(f"predicted_steps:{c['predicted_steps']:,} in the wall-clock budget")
    print(f"memory_per_gpu:{sum(mem.values()) / 2**30:.1f} GiB estimated ("
          + ", ".join(f"{k.replace('_', ' ')} {v / 2**30:.2f}" for k, v in mem.items() if v) + ")")
