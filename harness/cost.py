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
            key = (tuple(p.shape), fmt == "int8" or name == "tok_emb.weight")
            shapes[key] = shapes.get(key, 0) + 1
        else:
            small += p.numel() * (4 if any(k in name for k in trainer.CONTROL_NAMES) else 2)
    g = torch.Generator().manual_seed(0)
    model_bytes = small
    for (shape, as_int8), count in shapes.items():
        w = torch.randn(shape, generator=g)
        if as_int8:
            q, scale = trainer.quantize_int8_rows(w, bool(hp.quant_scale_floor))
        else:
            q, scale = trainer.quantize_int6_matrix(w, None, hp)
            trainer.prune_int6({"w": (q, scale)}, hp.prune_pct, bool(hp.prune_nonzero))
        model_bytes += count * len(trainer.compress({"q": q, "scale": scale}, fmt))
    params = sum(p.numel() for p in model.parameters())
    code = len(Path(trainer.__file__).read_bytes())
    return {"model_params": params, "float_bytes": 4 * params, "format": fmt, "code_bytes": code,
            "estimated_model_bytes": model_bytes, "estimated_total_bytes": code + model_bytes}


def print_estimate(e: dict, cap: int, published: dict | None) -> None:
    label = {"int8": "int8 + zlib-9", "int6": "int6 + zstd-22"}[e["format"]]
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
