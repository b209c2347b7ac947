"""What each published-vs-ours switch does at CPU scale: the same CPU run with one variable flipped.

    python bench/fidelity.py 02            # study 02's cpu_demo (ours) and each switch set to published
    python bench/fidelity.py 01            # study 01's cpu_byte260 (published) and each switch set to ours
    python bench/fidelity.py 02 --steps 200 --logs /tmp/f   # quicker, logs elsewhere
    python bench/fidelity.py 02 --switches RATIO_LOSS_PER_SEQ TRAIN_SEQ_LEN=256   # one switch, 2 rows a micro-step

Every run trains a fixed number of steps (no wall-clock cap), so two runs differ only by the
switch: the same seed, data and step count. A switch that only changes the export (GPTQ clip,
calibration, pruning; study 01's scale floor) re-exports the base run's final checkpoint instead
of training again. Prints one table (markdown) and writes it, with every run's train.log, to
--logs (default studies/<study>/logs/fidelity/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import files, modules, runs  # noqa: E402

# Per study: its CPU run, the switches that need training and those that only change the export,
# each as (variable, value to compare with the base run's).
SWITCHES = {
    "02": {"run": "cpu_demo",
           "train": [("RATIO_LOSS_PER_SEQ", "1"), ("QUANT_SCALE_FLOOR", "1")],
           "export": [("GPTQ_CLIP_SEARCH", "matrix"), ("GPTQ_CALIB_ALL_RANKS", "0"), ("PRUNE_NONZERO", "0")],
           "all": {"RATIO_LOSS_PER_SEQ": "1", "QUANT_SCALE_FLOOR": "1", "GPTQ_CLIP_SEARCH": "matrix",
                   "GPTQ_CALIB_ALL_RANKS": "0", "PRUNE_NONZERO": "0"}},
    "01": {"run": "cpu_byte260",
           "train": [("RATIO_LOSS_PER_SEQ", "0")],
           "export": [("QUANT_SCALE_FLOOR", "0")],
           "all": {"RATIO_LOSS_PER_SEQ": "0", "QUANT_SCALE_FLOOR": "0"}},
}


def run_once(study: Path, env: dict, out: Path, label: str) -> dict:
    """Train (or re-export) in this process; the row of the table."""
    r = runs.measure(study, {**env, "OUTPUT_DIR": str(out), "RUN_ID": out.name})
    b = r["boundaries"]
    return {"label": label, "steps": r["steps"], "float": r["float"], **{f"{k}_rt": v for k, v in r["roundtrips"].items()},
            "sliding": r["sliding"], "bytes": r["bytes"], "bytes_per_chunk": b["bytes_per_chunk"],
            "precision": b["precision"], "recall": b["recall"]}


def table(rows: list[dict]) -> str:
    formats = [k for k in ("int8_rt", "int6_rt") if any(k in r for r in rows)]
    head = ["run", "steps", "float BPB", *(f"{k[:4]} round trip" for k in formats), "sliding", "artifact bytes",
            "bytes/chunk", "precision", "recall"]
    cells = [[r["label"], str(r["steps"]), f"{r['float']:.4f}", *(f"{r[k]:.4f}" for k in formats),
              "" if r["sliding"] is None else f"{r['sliding']:.4f}", f"{r['bytes']:,}",
              f"{r['bytes_per_chunk']:.2f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}"] for r in rows]
    return files.markdown_table(head, cells)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", choices=sorted(SWITCHES))
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run (fixed, no wall clock)")
    p.add_argument("--logs", type=Path, help="where logs and the table go (default studies/<study>/logs/fidelity)")
    p.add_argument("--switches", help="only these variables (comma-separated), and no all-switched run")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE for every run (e.g. a smaller model for a quick check)")
    args = p.parse_intermixed_args(argv)
    spec = SWITCHES[args.study]
    study = modules.study_dir(args.study)
    fixed = ["MAX_WALLCLOCK_SECONDS=0", f"ITERATIONS={args.steps}", *args.overrides]
    env, _ = modules.run_env(study, spec["run"], fixed)
    runs.ensure_sample_export(env)
    logs = args.logs or study / "logs" / "fidelity"
    logs.mkdir(parents=True, exist_ok=True)
    work = ROOT / "runs" / f"fidelity_{args.study}_{runs.unique_stamp()}"
    rows = []

    def record(name: str, label: str, extra: dict) -> Path:
        out = work / name
        print(f"=== {label}", flush=True)
        rows.append(run_once(study, {**env, **extra}, out, label))
        files.copy_log(out, logs / f"{name}.log")
        return out
    only = set(args.switches.split(",")) if args.switches else None
    unknown = (only or set()) - {k for k, _ in spec["train"] + spec["export"]}
    if unknown:
        p.error(f"--switches: {', '.join(sorted(unknown))} is not a switch of study {args.study}")
    base = record("base", f"`{spec['run']}` as in runs.json" + (" + " + " ".join(args.overrides) if args.overrides else ""), {})
    checkpoint = base / "checkpoints" / f"step_{args.steps:06d}.pt"
    for key, value in spec["train"]:
        if only is None or key in only:
            record(f"{key.lower()}_{value}", f"`{key}={value}` (trained)", {key: value})
    for key, value in spec["export"]:
        if only is None or key in only:
            record(f"{key.lower()}_{value}", f"`{key}={value}` (re-export)", {key: value, "RESUME_FROM": str(checkpoint)})
    if only is None:
        record("all_switched", "all of them: " + " ".join(f"`{k}={v}`" for k, v in spec["all"].items()), spec["all"])
    command = " ".join(["python bench/fidelity.py", args.study, *(["--steps", str(args.steps)] if args.steps != 1000 else []),
                        *(["--switches", args.switches] if args.switches else []), *args.overrides])
    text = (f"{spec['run']} for {args.steps} steps, seed {env.get('SEED', '1337')}, each row one switch flipped; "
            f"BPB and boundaries of the round-tripped model (`{command}`)\n\n" + table(rows) + "\n")
    files.write_atomic(logs / "table.md", text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
