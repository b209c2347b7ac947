"""Does a CPU recipe align its chunks with words on every seed? One named run, K seeds, one table.

    python bench/seeds.py                                   # study 02 cpu_demo, seeds 1337,1,2,3,4
    python bench/seeds.py --jobs 2                          # two seeds at a time, one core each
    python bench/seeds.py --docs data/wiki_sample/wiki_sample.jsonl.xz --seeds 1337,1,2   # another corpus
    python bench/seeds.py --logs bench/logs/seeds/x LR_WARMUP_STEPS=0       # a lever, its own folder

Each seed trains the run (its runs.json env plus KEY=VALUE overrides), then the round-tripped
model's boundaries are measured with boundaries.py on the validation split. --docs exports a
documents file (jsonl with "text", or text; its `.meta.json` sidecar sets the validation split)
to byte260 shards on first use, under data/<name>_export/. --jobs N trains N seeds side by side,
each in its own process with its share of the cores: right for runs of a fixed step count (the
demo), wrong for runs scheduled by wall clock, which would slow each other down (a run that the
wall-clock cap stops before its ITERATIONS is an error under --jobs). Prints the table (markdown) with a min / median / max line and writes it, with
each run's train.log (its embedded source left out), to --logs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import files, modules, runs  # noqa: E402

COLUMNS = (("steps", "{:.0f}"), ("roundtrip", "{:.4f}"), ("bytes_per_chunk", "{:.2f}"), ("precision", "{:.3f}"),
           ("recall", "{:.3f}"), ("precision_shift_minus1", "{:.3f}"), ("precision_shift_plus1", "{:.3f}"))
HEADERS = ("steps", "round-trip BPB", "bytes/chunk", "precision", "recall", "precision -1", "precision +1")
ALIGNED = 0.90  # precision and recall both at least this: "aligned" in the study READMEs


def row_of(seed: int, r: dict) -> dict:
    b = r["boundaries"]
    return {"seed": seed, "steps": r["steps"], "roundtrip": r["roundtrip"], "run_dir": r["run_dir"],
            "threads": r.get("threads"), **{k: b[k] for k, _ in COLUMNS[2:]}}


def aligned(row: dict) -> bool:
    return row["precision"] >= ALIGNED and row["recall"] >= ALIGNED


def table(rows: list[dict]) -> str:
    cells = [[r["seed"], *(f.format(r[k]) for k, f in COLUMNS)] for r in rows]
    summary = []
    for k, f in COLUMNS:
        values = [r[k] for r in rows]
        summary.append(f"{f.format(min(values))} / {f.format(statistics.median(values))} / {f.format(max(values))}")
    cells.append(["min / median / max", *summary])
    return (files.markdown_table(["seed", *HEADERS], cells)
            + f"\n\naligned (precision and recall >= {ALIGNED}): {sum(map(aligned, rows))} of {len(rows)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="02")
    p.add_argument("--run", default="cpu_demo", help="a run of the study's runs.json (an H-Net)")
    p.add_argument("--seeds", default="1337,1,2,3,4")
    p.add_argument("--steps", type=int, help="optimizer steps per seed (default: the run's ITERATIONS)")
    p.add_argument("--jobs", type=int, default=1, help="seeds trained side by side (fixed-step runs only)")
    p.add_argument("--docs", type=Path, help="train and validate on this documents file instead of the run's data")
    p.add_argument("--logs", type=Path, help="where logs and the table go (default bench/logs/seeds_<time>)")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE for every seed")
    args = p.parse_intermixed_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected integers separated by commas")
    study = modules.study_dir(args.study)
    overrides = list(args.overrides) + ([f"ITERATIONS={args.steps}"] if args.steps else [])
    if args.docs is not None:
        if not args.docs.is_file():
            p.error(f"--docs {args.docs}: no such file")
        overrides += [f"{k}={v}" for k, v in runs.export_corpus(args.docs, "byte260").items()]
    env, _ = modules.run_env(study, args.run, overrides)
    runs.ensure_sample_export(env)
    stamp = runs.unique_stamp()  # one per sweep: its run folders and default logs share it
    logs = args.logs or ROOT / "bench" / "logs" / f"seeds_{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    work = ROOT / "runs" / f"seeds_{stamp}"
    envs = [{**env, "SEED": str(seed), "OUTPUT_DIR": str(work / f"seed{seed}"), "RUN_ID": f"seed{seed}"}
            for seed in seeds]

    def done(i: int, r: dict) -> None:  # a long sweep shows each seed as it ends
        if r["boundaries"] is None:
            raise SystemExit(f"error: run {args.run} is not an H-Net: it has no boundaries to measure")
        row = row_of(seeds[i], r)
        if args.jobs > 1 and r["steps"] < int(env["ITERATIONS"]):
            raise SystemExit(f"error: seed {seeds[i]} stopped at step {r['steps']} of {env['ITERATIONS']}: the "
                             "wall-clock cap cut it short, so runs side by side were not the same runs; use "
                             "--jobs 1 or a larger MAX_WALLCLOCK_SECONDS")
        files.copy_log(Path(r["run_dir"]), logs / f"seed{seeds[i]}.log")
        print(f"=== seed {seeds[i]}: " + ", ".join(f"{h} {f.format(row[k])}" for h, (k, f) in zip(HEADERS, COLUMNS)),
              flush=True)

    print(f"=== seeds {args.seeds}, {args.jobs} at a time", flush=True)
    rows = [row_of(seed, r) for seed, r in zip(seeds, runs.measure_all(study, envs, args.jobs, done))]
    corpus = args.docs.name if args.docs else Path(env["DATA_PATH"]).name
    command = " ".join(["python bench/seeds.py", *(argv if argv is not None else sys.argv[1:])])
    threads = sorted({r["threads"] for r in rows})
    text = (f"`{command}`: study {study.name[:2]} run {args.run} on {corpus}, torch threads per run "
            f"{'/'.join(map(str, threads))}; the round-tripped model's boundaries against word starts\n\n"
            + table(rows) + "\n")
    files.write_atomic(logs / "table.md", text)
    files.write_atomic(logs / "rows.json", json.dumps(rows, indent=1) + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
