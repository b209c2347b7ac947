"""Speed of a study's H-Net on this machine, printed as markdown tables.

    python bench/bench_hnet.py                 # study 02 at the CPU demo's size, a minute or two on 2 cores
    python bench/bench_hnet.py --out bench/logs/bench_hnet/cpu.md      # the table the README quotes
    python bench/bench_hnet.py --dim 512 --layers 12 --outer 3 --seq 2048 --micro-batch 4   # on a GPU

1. Training throughput: bytes per second of full optimizer steps (forward, backward, Muon + Adam,
   the trainer's own train_step) for the H-Net and for the OUTER_LAYERS=0 GPT of the same width
   and depth, on random byte260 data. Timed after --warmup untimed steps; the median of --steps.
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
from harness import files, modules  # noqa: E402


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


def time_training(t, env: dict, micro_batch: int, steps: int, warmup: int) -> dict:
    """Median ms of one optimizer step through the trainer's own model, optimisers and train_step."""
    hp, _ = t.Hyperparameters.from_env(env)
    rt = t.setup_device(hp)
    torch.manual_seed(0)
    model = t.HNet(hp).to(rt.device)
    compiled = model
    if getattr(rt, "compile", False):
        compiled = torch.compile(model, dynamic=False, fullgraph=True, backend=hp.compile_backend)
    fields = dict(hp=hp, rt=rt, log=lambda *a, **k: None, run_dir=Path("."), model=model,
                  optimizers=t.build_optimizers(model, hp, rt), loader=RandomBytes(rt, micro_batch, hp.train_seq_len),
                  val_tokens=torch.zeros(0), luts=t.build_byte_luts(hp, rt.device), data={})
    if "compiled" in t.Run.__dataclass_fields__:
        fields["compiled"] = compiled
    run = t.Run(**fields)
    times = []
    for i in range(warmup + steps):
        synchronize(rt.device)
        t0 = time.perf_counter()
        t.train_step(run, 1.0, t0)
        synchronize(rt.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"params": sum(p.numel() for p in model.parameters()), "step_ms": 1000 * step,
            "bytes_per_s": hp.train_batch_tokens / step}


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


def report(args) -> str:
    t = modules.trainer_of(modules.study_dir(args.study))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = {}
    for label, outer in ((f"H-Net (outer {args.outer})", args.outer), ("GPT (OUTER_LAYERS=0)", 0)):
        rows[label] = time_training(t, model_env(args, outer), args.micro_batch, args.steps, args.warmup)
    hnet, gpt = rows.values()
    d = time_dechunk(t, device, length=args.scan_length, chunks=args.scan_length // 4)
    lines = [f"`python bench/bench_hnet.py {' '.join(sys.argv[1:]) if args.argv is None else ' '.join(args.argv)}`"
             f": study {args.study}, torch {torch.__version__}, {device}, {torch.get_num_threads()} threads",
             "", f"Training throughput: d={args.dim}, {args.layers} layers, seq {args.seq}, "
             f"{8 * args.micro_batch * args.seq} tokens a step (8 micro-steps), median of {args.steps} steps "
             f"after {args.warmup}", "",
             files.markdown_table(["model", "params", "ms/step", "bytes/s"],
                                  [[k, f"{r['params']:,}", f"{r['step_ms']:.1f}", f"{r['bytes_per_s']:,.0f}"]
                                   for k, r in rows.items()]),
             "", f"H-Net / GPT bytes per second: {hnet['bytes_per_s'] / gpt['bytes_per_s']:.2f}x", "",
             f"Dechunk EMA, batch 8, L={args.scan_length}, C={args.scan_length // 4}, d=256, forward + backward "
             "(median of 5)", "",
             files.markdown_table(["implementation", "ms"], [[k, f"{v:.1f}"] for k, v in d["ms"].items()]),
             "", f"max |scan - loop| = {d['max_abs_diff']:.1e}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="02")
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
    args = p.parse_args(argv)
    args.argv = argv
    text = report(args)
    files.report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
