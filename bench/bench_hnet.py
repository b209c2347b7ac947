"""Speed of a study's H-Net on this machine, printed as markdown tables.

    python bench/bench_hnet.py                 # study 02 at the CPU demo's size, a minute or two on 2 cores
    python bench/bench_hnet.py --out bench/logs/bench_hnet/cpu.md      # the table the README quotes
    python bench/bench_hnet.py --dim 512 --layers 12 --outer 3 --seq 2048 --micro-batch 4   # on a GPU
    python bench/bench_hnet.py --study 03 --run cpu --gpt-run cpu_gpt   # study 03's mini-golf pair

1. Training throughput: bytes per second of full optimizer steps (forward, backward, Muon + Adam,
   the trainer's own train_step) for the H-Net and for the OUTER_LAYERS=0 GPT of the same width
   and depth, on random byte260 data. Timed after --warmup untimed steps; the median of --steps.
   With --run, the H-Net is that named run of the study's runs.json and the GPT is --gpt-run (or the
   same run with OUTER_LAYERS=0), every key of theirs included, reading the run's own training shards
   through the trainer's loader. Each row also gives the bytes per chunk of its timed steps (the main
   stage's share of the work) and the FLOPs per byte the cost model counts from the built modules
   (harness/cost.py). A learned router at its initialisation chunks far more coarsely than a trained
   one (tens of bytes a chunk against about 6), which flatters the H-Net; so for a trainer with
   ROUTER (study 03) a third row times the same H-Net with ROUTER=space, whose about 5.8 bytes a
   chunk is a trained run's rate, and the ratio is given for both.
2. The dechunk EMA at L=2048, C=512, d=256, batch 8: the trainer's log-depth scan against a plain
   loop over chunks, forward + backward, and the largest difference between the two.
Absolute times are a fact about one machine; compare the ratios, measured side by side here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import cost, files, modules, runs  # noqa: E402


class RandomBytes:
    """Stands in for the shard loader: one micro-batch of random byte ids per call."""

    def __init__(self, rt, micro_batch: int, seq: int):
        self.rt, self.shape = rt, (micro_batch, seq)

    def next_batch(self):
        ids = torch.randint(4, 260, (self.shape[0], self.shape[1] + 1), device=self.rt.device)
        return ids[:, :-1], ids[:, 1:]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(t, env: dict, steps: int, warmup: int, real_data: bool = False) -> dict:
    """Median ms of one optimizer step through the trainer's own model, optimisers and train_step."""
    hp, _ = t.Hyperparameters.from_env(env)
    rt = t.setup_device(hp)
    torch.manual_seed(0)
    model = t.HNet(hp).to(rt.device)
    compiled = model
    if getattr(rt, "compile", False):
        compiled = torch.compile(model, dynamic=False, fullgraph=True, backend=hp.compile_backend)
    micro_batch = hp.train_batch_tokens // (rt.world_size * rt.grad_accum_steps * hp.train_seq_len)
    loader = t.DistributedTokenLoader(hp, rt) if real_data else RandomBytes(rt, micro_batch, hp.train_seq_len)
    fields = dict(hp=hp, rt=rt, log=lambda *a, **k: None, run_dir=Path("."), model=model,
                  optimizers=t.build_optimizers(model, hp, rt), loader=loader,
                  val_tokens=torch.zeros(0), luts=t.build_byte_luts(hp, rt.device), data={})
    if "compiled" in t.Run.__dataclass_fields__:
        fields["compiled"] = compiled
    run = t.Run(**fields)
    times, chunks, in_bytes = [], 0.0, 0.0
    for i in range(warmup + steps):
        synchronize(rt.device)
        t0 = time.perf_counter()
        stats, _ = t.train_step(run, 1.0, t0)
        synchronize(rt.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            chunks, in_bytes = chunks + stats.chunks, in_bytes + stats.bytes
    step = statistics.median(times)
    return {"params": sum(p.numel() for p in model.parameters()), "step_ms": 1000 * step,
            "bytes_per_s": hp.train_batch_tokens / step,
            "bytes_per_chunk": in_bytes / chunks if hp.is_hnet else None,
            "flops_per_byte": cost.cost_model(t, hp)["flops_per_byte"]}


def reference_loop(z, p):
    out = [z[:, 0]]
    for c in range(1, z.size(1)):
        out.append(p[:, c, None] * z[:, c] + (1 - p[:, c, None]) * out[-1])
    return torch.stack(out, dim=1)


def time_dechunk(t, device, batch=8, length=2048, chunks=512, dim=256, repeats=5) -> dict:
    torch.manual_seed(0)
    z = torch.randn(batch, chunks, dim, device=device, requires_grad=True)
    p = (torch.rand(batch, chunks, device=device) * 0.5 + 0.5).requires_grad_()
    idx = torch.sort(torch.randint(0, chunks, (batch, length), device=device), dim=1).values
    layer = t.DeChunkLayer()

    def scan():
        return layer(z, p, idx)

    def loop():
        return torch.gather(reference_loop(z, p.clamp(1e-4, 1 - 1e-4)), 1, idx[..., None].expand(-1, -1, dim))

    results, outputs = {}, {}
    for name, fn in (("log-depth scan (trainer)", scan), ("python loop over chunks", loop)):
        times = []
        for _ in range(repeats + 1):
            synchronize(device)
            t0 = time.perf_counter()
            out = fn()
            out.square().mean().backward()
            synchronize(device)
            times.append(time.perf_counter() - t0)
        results[name] = 1000 * statistics.median(times[1:])  # the first call warms up
        outputs[name] = out.detach()
    diff = (outputs["log-depth scan (trainer)"] - outputs["python loop over chunks"]).abs().max().item()
    return {"ms": results, "max_abs_diff": diff}


def model_env(args, outer: int) -> dict:
    return {"MODEL_DIM": str(args.dim), "NUM_LAYERS": str(args.layers), "OUTER_LAYERS": str(outer),
            "NUM_HEADS": str(args.heads), "NUM_KV_HEADS": str(args.kv_heads), "TRAIN_SEQ_LEN": str(args.seq),
            "TRAIN_BATCH_TOKENS": str(8 * args.micro_batch * args.seq), "MAX_WALLCLOCK_SECONDS": "0",
            "WARMUP_STEPS": "0"}


def models(args, study: Path) -> dict:
    """Label: env of the two models timed (the H-Net first)."""
    if args.run is None:
        return {f"H-Net (outer {args.outer})": model_env(args, args.outer), "GPT (OUTER_LAYERS=0)": model_env(args, 0)}
    timing = [*args.overrides, "MAX_WALLCLOCK_SECONDS=0", "WARMUP_STEPS=0"]
    hnet, _ = modules.run_env(study, args.run, timing)
    runs.ensure_sample_export(hnet)  # a fresh clone exports the sample's shards on first use
    out = {f"H-Net ({args.run})": hnet}
    if "router" in modules.trainer_of(study).Hyperparameters.__dataclass_fields__ and hnet.get("ROUTER", "learned") == "learned":
        out[f"H-Net ({args.run}, ROUTER=space)"] = {**hnet, "ROUTER": "space"}
    if args.gpt_run:
        gpt, _ = modules.run_env(study, args.gpt_run, timing)
        out[f"GPT ({args.gpt_run})"] = gpt
    else:
        out[f"GPT ({args.run}, OUTER_LAYERS=0)"] = {**hnet, "OUTER_LAYERS": "0"}
    return out


def report(args) -> str:
    study = modules.study_dir(args.study)
    t = modules.trainer_of(study)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    envs = models(args, study)
    rows = {label: time_training(t, env, args.steps, args.warmup, real_data=args.run is not None)
            for label, env in envs.items()}
    gpt = list(rows.values())[-1]
    env = next(iter(envs.values()))
    seq, batch = int(env.get("TRAIN_SEQ_LEN", args.seq)), int(env.get("TRAIN_BATCH_TOKENS", 0))
    data = f"the run's training shards ({env['DATA_PATH']})" if args.run else "random byte260 data"
    d = time_dechunk(t, device, length=args.scan_length, chunks=args.scan_length // 4)
    lines = [f"`python bench/bench_hnet.py {' '.join(sys.argv[1:]) if args.argv is None else ' '.join(args.argv)}`"
             f": study {args.study}, torch {torch.__version__}, {device}, {torch.get_num_threads()} threads",
             "", f"Training throughput on {data}: seq {seq}, {batch} tokens a step (8 micro-steps), "
             f"median of {args.steps} steps after {args.warmup}", "",
             files.markdown_table(["model", "params", "ms/step", "bytes/s", "bytes/chunk", "FLOPs/byte (fwd+bwd)"],
                                  [[k, f"{r['params']:,}", f"{r['step_ms']:.1f}", f"{r['bytes_per_s']:,.0f}",
                                    "-" if r["bytes_per_chunk"] is None else f"{r['bytes_per_chunk']:.2f}",
                                    f"{r['flops_per_byte'] / 1e6:.2f} M"] for k, r in rows.items()]),
             "", *(f"{k} / GPT bytes per second: {r['bytes_per_s'] / gpt['bytes_per_s']:.2f}x "
                   f"(at {r['bytes_per_chunk']:.2f} bytes a chunk); FLOPs per byte: "
                   f"{r['flops_per_byte'] / gpt['flops_per_byte']:.2f}x" for k, r in list(rows.items())[:-1]), "",
             f"Dechunk EMA, batch 8, L={args.scan_length}, C={args.scan_length // 4}, d=256, forward + backward "
             "(median of 5)", "",
             files.markdown_table(["implementation", "ms"], [[k, f"{v:.1f}"] for k, v in d["ms"].items()]),
             "", f"max |scan - loop| = {d['max_abs_diff']:.1e}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="02")
    p.add_argument("--run", help="time this named run of the study's runs.json (its keys, its data) "
                                 "instead of --dim/--layers/...")
    p.add_argument("--gpt-run", help="with --run: the named run to time as the GPT (default: --run, OUTER_LAYERS=0)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--outer", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-step (8 micro-steps a step)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--scan-length", type=int, default=2048, help="bytes of the dechunk comparison (chunks: 1/4)")
    p.add_argument("--out", type=Path, help="also write the tables here")
    p.add_argument("overrides", nargs="*", help="with --run: KEY=VALUE for both models (change one thing)")
    args = p.parse_intermixed_args(argv)
    if (args.gpt_run or args.overrides) and not args.run:
        p.error("--gpt-run and KEY=VALUE overrides need --run")
    args.argv = argv
    text = report(args)
    files.report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
