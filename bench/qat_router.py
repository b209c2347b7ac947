"""Is it the router's own rounding? The demo's recipe with fake int6 everywhere but the router.

    python bench/qat_router.py --seed 3 --out bench/logs/router_qat/mechanism   # three runs, then tables

Early QAT trains every linear on its int6 rounding from step 2. The router's q/k start as the
identity, and int6 rounds their small learned off-diagonal entries to 0, so the router's forward
compares raw encoder states until those entries outgrow half a quantisation step. This trains
one seed three ways, fixed steps, checkpoints every --every steps: the LR warmup alone, warmup and
early QAT (the demo), and warmup and early QAT with the router's two matrices left in float (their
QAT correction held at zero: a measurement made here by wrapping the trainer's refresh_qat, not a
trainer option). bench/router_trajectory.py then measures each checkpoint: boundaries against word
starts, and how much of the router's q/k int6 rounding zeroes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import files, modules, runs  # noqa: E402

ARMS = {"warmup": {"QAT_FROM_STEP": "0"}, "both": {"QAT_FROM_STEP": "2"}, "both_router_float": {"QAT_FROM_STEP": "2"}}


def router_left_float(real):
    """The trainer's refresh_qat, then the router's q/k QAT correction set back to zero: every other
    linear trains on its int6 rounding, the router's training forward sees its float weights."""

    def refresh(model, on, floor):
        real(model, on, floor)
        if getattr(model, "routing", None) is not None:
            for lin in (model.routing.q_proj, model.routing.k_proj):
                lin.qat_delta.zero_()

    return refresh


def train(study: Path, env: dict, router_float: bool) -> None:
    trainer = modules.trainer_of(study)
    real = trainer.refresh_qat
    if router_float:
        trainer.refresh_qat = router_left_float(real)
    try:
        hp, _ = trainer.Hyperparameters.from_env(env)
        trainer.run_training(hp)
    finally:
        trainer.refresh_qat = real


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--every", type=int, default=25, help="checkpoint every this many steps")
    p.add_argument("--arms", default=",".join(ARMS), help=f"a subset of {', '.join(ARMS)}")
    p.add_argument("--out", type=Path, required=True, help="where the logs and trajectories go")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE for every arm")
    args = p.parse_intermixed_args(argv)
    study = modules.study_dir("02")
    trajectory = modules.import_file(ROOT / "bench" / "router_trajectory.py")
    work = ROOT / "runs" / f"qat_router_{runs.unique_stamp()}"
    args.out.mkdir(parents=True, exist_ok=True)
    for arm in args.arms.split(","):
        env, _ = modules.run_env(study, "cpu_demo", [f"SEED={args.seed}", f"CHECKPOINT_EVERY={args.every}",
                                                     *(f"{k}={v}" for k, v in ARMS[arm].items()), *args.overrides])
        runs.ensure_sample_export(env)
        out = work / arm
        print(f"=== {arm}", flush=True)
        train(study, {**env, "OUTPUT_DIR": str(out), "RUN_ID": arm}, router_float=arm == "both_router_float")
        files.copy_log(out, args.out / f"{arm}_seed{args.seed}.log")
        rows = trajectory.trajectory(out, study, 100_000)
        text = f"{arm}, seed {args.seed}: the float router at each checkpoint\n\n" + trajectory.table(rows) + "\n"
        files.report(text, args.out / f"{arm}_seed{args.seed}_trajectory.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
