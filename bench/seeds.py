"""Does a CPU recipe align its chunks with words on every seed? One named run, K seeds, one table.

    python bench/seeds.py                                   # study 02 cpu_demo, seeds 1337,1,2,3,4
    python bench/seeds.py --docs data/wiki_sample/wiki_sample.jsonl.xz --seeds 1337,1,2   # another corpus
    python bench/seeds.py --seconds 120 RATIO_LOSS_WEIGHT=0.3          # a lever, at a shorter budget

Each seed trains the run (its runs.json env plus KEY=VALUE overrides) in this process for the
given wall clock, then the round-tripped model's boundaries are measured with boundaries.py on
the validation split. --docs exports a documents file (jsonl with "text", or text; its
`.meta.json` sidecar sets the validation split) to byte260 shards on first use, under
data/<name>_export/. Prints the table (markdown) with a min / median / max line and writes it,
with each run's train.log, to --logs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_hnet  # noqa: E402

COLUMNS = (("steps", "{:.0f}"), ("roundtrip", "{:.4f}"), ("bytes_per_chunk", "{:.2f}"), ("precision", "{:.3f}"),
           ("recall", "{:.3f}"), ("precision_shift_minus1", "{:.3f}"), ("precision_shift_plus1", "{:.3f}"))
HEADERS = ("steps", "round-trip BPB", "bytes/chunk", "precision", "recall", "precision -1", "precision +1")


def row_of(seed: int, r: dict) -> dict:
    b = r["boundaries"]
    return {"seed": seed, "steps": r["steps"], "roundtrip": r["roundtrip"], "run_dir": r["run_dir"],
            **{k: b[k] for k, _ in COLUMNS[2:]}}


def table(rows: list[dict]) -> str:
    lines = ["| seed | " + " | ".join(HEADERS) + " |", "|" + "---|" * (len(HEADERS) + 1)]
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join(f.format(r[k]) for k, f in COLUMNS) + " |")
    summary = []
    for k, f in COLUMNS:
        values = [r[k] for r in rows]
        summary.append(f"{f.format(min(values))} / {f.format(statistics.median(values))} / {f.format(max(values))}")
    lines.append("| min / median / max | " + " | ".join(summary) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="02")
    p.add_argument("--run", default="cpu_demo", help="a run of the study's runs.json (an H-Net)")
    p.add_argument("--seeds", default="1337,1,2,3,4")
    p.add_argument("--seconds", type=float, help="training wall clock per seed (default: the run's)")
    p.add_argument("--docs", type=Path, help="train and validate on this documents file instead of the run's data")
    p.add_argument("--logs", type=Path, help="where logs and the table go (default bench/logs/seeds_<time>)")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE for every seed")
    args = p.parse_intermixed_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected integers separated by commas")
    study = train_hnet.study_dir(args.study)
    overrides = list(args.overrides)
    if args.seconds is not None:
        overrides.append(f"MAX_WALLCLOCK_SECONDS={args.seconds:g}")
    if args.docs is not None:
        if not args.docs.is_file():
            p.error(f"--docs {args.docs}: no such file")
        overrides += [f"{k}={v}" for k, v in train_hnet.export_corpus(args.docs, "byte260").items()]
    env, _ = train_hnet.run_env(study, args.run, overrides)
    if "sample_export" in env["DATA_PATH"]:
        train_hnet.ensure_sample_export()
    stamp = train_hnet.unique_stamp()  # one per sweep: its run folders and default logs share it
    logs = args.logs or ROOT / "bench" / "logs" / f"seeds_{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    work = ROOT / "runs" / f"seeds_{stamp}"
    rows = []
    for seed in seeds:
        out = work / f"seed{seed}"
        print(f"=== seed {seed}", flush=True)
        r = train_hnet.measure(study, {**env, "SEED": str(seed), "OUTPUT_DIR": str(out), "RUN_ID": out.name})
        if r["boundaries"] is None:
            p.error(f"run {args.run} is not an H-Net: it has no boundaries to measure")
        rows.append(row_of(seed, r))
        print(f"=== seed {seed}: " + ", ".join(f"{h} {f.format(rows[-1][k])}" for h, (k, f) in zip(HEADERS, COLUMNS)),
              flush=True)  # a long sweep shows each seed as it ends
        shutil.copyfile(out / "train.log", logs / f"seed{seed}.log")
    corpus = args.docs.name if args.docs else Path(env["DATA_PATH"]).name
    command = " ".join(["python bench/seeds.py", *(a for a in (argv if argv is not None else sys.argv[1:]))])
    text = (f"`{command}`: study {study.name[:2]} run {args.run} on {corpus}; the round-tripped model's "
            f"boundaries against word starts\n\n" + table(rows) + "\n")
    (logs / "table.md").write_text(text)
    (logs / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
