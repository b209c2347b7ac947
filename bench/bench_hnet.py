"""Speed of the study-02 H-Net on this machine, printed as tables.

    python bench/bench_hnet.py                 # CPU-size models, a minute or two on 2 cores
    python bench/bench_hnet.py --dim 512 --layers 12 --outer 3 --seq 2048 --micro-batch 4   # on a GPU

1. Training throughput: bytes per second of full optimizer steps (forward, backward, Muon +
   Adam) for the H-Net and for the OUTER_LAYERS=0 GPT of the same width and depth, on the
   trainer's own model, optimisers and step code, with random byte260 data.
2. The dechunk EMA at L=2048, C=512: the trainer's log-depth scan against a plain loop over
   chunks, forward + backward.
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
import eval_bpb  # noqa: E402

TRAINER = ROOT / "studies" / "02_improved_hnet_byte260_and_sp1024" / "train_gpt.py"


class RandomBytes:
    """Stands in for the shard loader: one micro-batch of random byte ids per call."""

    def __init__(self, rt, micro_batch: int, seq: int):
        self.rt, self.shape = rt, (micro_batch, seq)

    def next_batch(self):
        ids = torch.randint(4, 260, (self.shape[0], self.shape[1] + 1), device=self.rt.device)
        return ids[:, :-1], ids[:, 1:]


def time_training(t, args, outer: int) -> dict:
    env = {"MODEL_DIM": str(args.dim), "NUM_LAYERS": str(args.layers), "OUTER_LAYERS": str(outer),
           "NUM_HEADS": str(args.heads), "NUM_KV_HEADS": str(args.kv_heads), "TRAIN_SEQ_LEN": str(args.seq),
           "TRAIN_BATCH_TOKENS": str(8 * args.micro_batch * args.seq), "MAX_WALLCLOCK_SECONDS": "0"}
    hp, _ = t.Hyperparameters.from_env(env)
    rt = t.setup_device(hp)
    torch.manual_seed(0)
    model = t.HNet(hp).to(rt.device)
    compiled = torch.compile(model, dynamic=False) if rt.compile else model
    luts = t.build_byte_luts(hp, rt.device)
    run = t.Run(hp, rt, t.RunLog(None), Path("."), model, compiled, t.build_optimizers(model, hp, rt),
                RandomBytes(rt, args.micro_batch, args.seq), torch.zeros(0), luts)
    times = []
    for i in range(args.warmup + args.steps):
        rt.sync()
        t0 = time.perf_counter()
        t.train_step(run)
        rt.sync()
        if i >= args.warmup:
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
            t0 = time.perf_counter()
            out = fn()
            out.square().mean().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        results[name] = 1000 * statistics.median(times[1:])
        outputs[name] = out.detach()
    diff = (outputs["log-depth scan (trainer)"] - outputs["python loop over chunks"]).abs().max().item()
    return {"ms": results, "max_abs_diff": diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--outer", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-step (8 micro-steps a step)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    t = eval_bpb.import_file(TRAINER)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"\nTraining throughput: d={args.dim}, {args.layers} layers, seq {args.seq}, "
          f"{8 * args.micro_batch * args.seq} tokens a step, median of {args.steps} steps")
    print(f"{'model':<28}{'params':>12}{'ms/step':>12}{'bytes/s':>12}")
    rows = {}
    for label, outer in ((f"H-Net (outer {args.outer})", args.outer), ("GPT (OUTER_LAYERS=0)", 0)):
        rows[label] = r = time_training(t, args, outer)
        print(f"{label:<28}{r['params']:>12,}{r['step_ms']:>12.1f}{r['bytes_per_s']:>12,.0f}")
    hnet, gpt = rows.values()
    print(f"H-Net / GPT bytes per second: {hnet['bytes_per_s'] / gpt['bytes_per_s']:.2f}x")
    d = time_dechunk(t, device)
    print("\nDechunk EMA, batch 8, L=2048, C=512, d=256, forward + backward (median of 5)")
    print(f"{'implementation':<28}{'ms':>12}")
    for name, ms in d["ms"].items():
        print(f"{name:<28}{ms:>12.1f}")
    print(f"max |scan - loop| = {d['max_abs_diff']:.1e}")


if __name__ == "__main__":
    main()
