"""Which optimiser's first step moves the router? The boundary fraction after one step, per optimiser.

    python bench/first_step.py                      # study 02 cpu_demo, seeds 1337,1,2
    python bench/first_step.py --seeds 1 TIED_EMBED_INIT_STD=0.05 LR_WARMUP_STEPS=100

Builds the run's model (runs.json env plus KEY=VALUE overrides), accumulates the first step's
gradient over its micro-steps exactly as the trainer does, then applies the step's update from
one optimiser only (the tied embedding's Adam, Muon's matrices, the scalars' Adam), or from all
three, each time from the same initial weights (through the trainer's own train_step, the other
optimisers' steps made no-ops), and measures the fraction of positions that are chunk
boundaries on that step's own batches. At initialisation about half are (p_t near 0.5).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import modules, runs  # noqa: E402

GROUPS = ("embedding (Adam)", "matrices (Muon)", "scalars (Adam)")  # the order of build_optimizers


def boundary_fraction(model, batches) -> float:
    """The fraction of positions the model's own forward marks as chunk starts (read from its router)."""
    import torch

    masks = []
    hook = model.routing.register_forward_hook(lambda m, i, out: masks.append(out.boundary_mask.float()))
    try:
        with torch.no_grad():
            for x, y in batches:
                model(x, y)
    finally:
        hook.remove()
    return torch.cat(masks).mean().item()


class Recording:
    """The trainer's loader, keeping the batches it hands out (the step's own batches)."""

    def __init__(self, loader):
        self.loader, self.batches = loader, []

    def next_batch(self):
        self.batches.append(self.loader.next_batch())
        return self.batches[-1]


class Frozen:
    """An optimiser whose step does nothing: the others' updates are applied alone."""

    def __init__(self, opt):
        self.param_groups = opt.param_groups

    def step(self):
        pass


def first_step(trainer, env: dict) -> dict:
    """{"init": f, "all": f, <group>: f} boundary fractions after step 1 (the trainer's own
    train_step at its step-0 LR) with those optimisers' updates applied, from the same init."""
    import time

    import torch

    hp, _ = trainer.Hyperparameters.from_env(env)
    rt = trainer.Runtime(torch.device("cpu"), grad_accum_steps=getattr(hp, "grad_accum_steps", 0) or 8)
    out = {}
    for which in ("init", "all", *range(len(GROUPS))):
        torch.manual_seed(hp.seed)
        model = trainer.HNet(hp)
        optimizers = trainer.build_optimizers(model, hp, rt)
        if which not in ("init", "all"):
            optimizers = [o if i == which else Frozen(o) for i, o in enumerate(optimizers)]
        loader = Recording(trainer.DistributedTokenLoader(hp, rt))
        run = trainer.Run(hp, rt, lambda *a, **k: None, Path("."), model, model, optimizers, loader,
                          torch.zeros(0), trainer.build_byte_luts(hp, rt.device), {})
        if which == "init":
            batches = [loader.next_batch() for _ in range(rt.grad_accum_steps)]
        else:
            trainer.train_step(run, trainer.lr_schedule(hp, 0, 0.0).lr, time.perf_counter())
            batches = loader.batches
        name = which if which in ("init", "all") else GROUPS[which]
        out[name] = boundary_fraction(model, batches)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="02")
    p.add_argument("--run", default="cpu_demo")
    p.add_argument("--seeds", default="1337,1,2")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE")
    args = p.parse_intermixed_args(argv)
    study = modules.study_dir(args.study)
    env, _ = modules.run_env(study, args.run, list(args.overrides))
    runs.ensure_sample_export(env)
    trainer = modules.trainer_of(study)
    columns = ("init", "all", *GROUPS)
    print(f"boundary fraction on the first step's batches ({args.run}{' ' if args.overrides else ''}"
          f"{' '.join(args.overrides)}), after step 1 with only these updates applied\n")
    print("| seed | " + " | ".join(columns) + " |\n" + "|---" * (len(columns) + 1) + "|")
    for seed in args.seeds.split(","):
        row = first_step(trainer, {**env, "SEED": seed})
        print(f"| {seed} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
