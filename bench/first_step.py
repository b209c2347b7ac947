"""Which optimiser's first step moves the router? The boundary fraction after one step, per optimiser.

    python bench/first_step.py                      # study 02 cpu_demo, seeds 1337,1,2
    python bench/first_step.py --seeds 1 TIED_EMBED_INIT_STD=0.05 LR_WARMUP_STEPS=100

Builds the run's model (runs.json env plus KEY=VALUE overrides), accumulates the first step's
gradient over its micro-steps exactly as the trainer does, then applies the step's update from
one optimiser only (the tied embedding's Adam, Muon's matrices, the scalars' Adam), or from all
three, each time from the same initial weights, and measures the fraction of positions that are
chunk boundaries on that step's own batches. At initialisation about half are (p_t near 0.5).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval_bpb  # noqa: E402
import train_hnet  # noqa: E402

GROUPS = ("embedding (Adam)", "matrices (Muon)", "scalars (Adam)")


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


def first_step(trainer, env: dict) -> dict:
    """{"init": f, "all": f, <group>: f} boundary fractions after step 1 with those updates applied."""
    import torch

    hp, _ = trainer.Hyperparameters.from_env(env)
    rt = trainer.Runtime(torch.device("cpu"), grad_accum_steps=hp.grad_accum_steps or 8)
    out = {}
    for which in ("init", "all", *range(len(GROUPS))):
        torch.manual_seed(hp.seed)
        model = trainer.HNet(hp)
        optimizers = trainer.build_optimizers(model, hp, rt)
        loader = trainer.DistributedTokenLoader(hp, rt)
        batches = [loader.next_batch() for _ in range(rt.grad_accum_steps)]
        model.ratio_target.fill_(trainer.ratio_target(hp, 0))
        if which != "init":
            for x, y in batches:  # the trainer's micro-step loss
                o = model(x, y)
                ((o.loss.mean() + hp.ratio_loss_weight * o.ratio_loss) / rt.grad_accum_steps).backward()
            mul = trainer.lr_multiplier(hp, 0, 0.0)  # the trainer's step-0 LR and Muon momentum
            for group in optimizers[1].param_groups:
                group["momentum"] = hp.muon_momentum_warmup_start if hp.muon_momentum_warmup_steps > 0 else hp.muon_momentum
            for i, opt in enumerate(optimizers):
                if which == "all" or which == i:
                    for group in opt.param_groups:
                        group["lr"] = group["base_lr"] * mul
                    opt.step()
        out["init" if which == "init" else "all" if which == "all" else GROUPS[which]] = boundary_fraction(model, batches)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="02")
    p.add_argument("--run", default="cpu_demo")
    p.add_argument("--seeds", default="1337,1,2")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE")
    args = p.parse_intermixed_args(argv)
    study = train_hnet.study_dir(args.study)
    env, _ = train_hnet.run_env(study, args.run, list(args.overrides))
    if "sample_export" in env["DATA_PATH"]:
        train_hnet.ensure_sample_export()
    trainer = eval_bpb.import_file(study / "train_gpt.py")
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
