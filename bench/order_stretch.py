"""What a run reads in each stretch of steps: the years of the speeches behind its training bytes.

    python bench/order_stretch.py data/sotu_full/sotu_1790_2021_shuf1_pieces2048.jsonl.xz \\
        data/sotu_full/sotu_1790_2021_shuf2_pieces2048.jsonl.xz --steps 0,500,1000,1500,1900

A study-03 CPU run on one process reads the training stream in order: each step takes
MICRO_STEPS micro-batches of TRAIN_BATCH_TOKENS / MICRO_STEPS + 1 tokens (the extra one is the last
target; harness.runs.stream_tokens_per_step), so step k reads tokens [k * T, (k + 1) * T) with
T = 8 * 513 = 4,104 for the CPU preset.
The script exports each documents file as the runs do (once, byte260), reads its training shards,
gives each token the year of the document it falls in (each document starts with a BOS token,
and the n-th BOS is the n-th training document of the file), and prints one markdown table per
file: for each stretch of steps its bytes, byte-weighted mean year, the share of its bytes from
each era, and from the speeches of the last training president (the same speaker as the first
validation speeches). The last row is the whole training split, the reference for every stretch.

With --logs FOLDER... after a documents file's runs (once per file, in the same order), each table
also gets, per model in those folders (files <model>_seed<N>.log), the mean fall of validation BPB
over each stretch, from runs that reach its end before their warmdown (the last WARMDOWN_ITERS
steps), and the script prints how those falls correlate: between the models, and with the years.
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import files, modules, runs  # noqa: E402

figure = modules.import_file(ROOT / "bench" / "minigolf_figure.py")  # its log readers
exporter = modules.import_file(runs.EXPORTER)  # the shard reader, BOS id and byte260 encoding the runs used

ERAS = [(1790, 1899), (1900, 1959), (1960, 1999), (2000, 2014)]  # the training years, 1790-2014


def read_docs(path: Path) -> tuple[int, list[dict]]:
    """The number of validation documents, by the exporter's own rule (its sidecar's docs_val), and
    every document."""
    _, sidecar = exporter.DocumentFile(path).sidecar()
    if not sidecar or "docs_val" not in sidecar:
        raise SystemExit(f"error: no .meta.json with docs_val beside {path} (make_sample.py writes it)")
    docs = [json.loads(line) for line in lzma.decompress(path.read_bytes()).decode("utf-8").splitlines()]
    return sidecar["docs_val"], docs


def token_docs(stream: np.ndarray, train: list[dict]) -> np.ndarray:
    """For each token of the training stream, the index of the training document it belongs to."""
    is_bos = stream == exporter.BOS_ID
    starts = np.flatnonzero(is_bos)
    if len(starts) != len(train) or (len(starts) and starts[0] != 0):
        raise SystemExit(f"error: the training shards hold {len(starts)} documents (first BOS at "
                         f"{starts[0] if len(starts) else None}), the documents file {len(train)}")
    first = stream[1:starts[1] if len(starts) > 1 else len(stream)]
    if not np.array_equal(first, exporter.encode_byte260(train[0]["text"])):
        raise SystemExit("error: the first training document in the shards is not the file's first one")
    return np.cumsum(is_bos) - 1


def stretch_rows(stream: np.ndarray, train: list[dict], tokens_per_step: int, steps: list[int]) -> list[dict]:
    """One row per stretch [steps[i], steps[i + 1]) and one for the whole split."""
    doc = token_docs(stream, train)
    years = np.array([d["year"] for d in train])[doc]
    last = max(train, key=lambda d: d["year"])["president"]
    same_speaker = np.array([d["president"] == last for d in train])[doc]
    is_byte = stream != exporter.BOS_ID
    total_steps = len(stream) // tokens_per_step
    spans = [(f"{a:,}-{min(b, total_steps):,}", a, min(b, total_steps))
             for a, b in zip(steps, steps[1:]) if a < total_steps]
    rows = []
    for label, a, b in spans + [("whole split", 0, total_steps)]:
        sel = slice(a * tokens_per_step, b * tokens_per_step)
        y, mask, same = years[sel], is_byte[sel], same_speaker[sel]
        n = int(mask.sum())
        rows.append({"steps": label, "bytes": n, "mean_year": float(y[mask].mean()),
                     **{f"{lo}-{hi}": float(((y >= lo) & (y <= hi) & mask).sum() / n) for lo, hi in ERAS},
                     "last_president": last, "same_speaker": float((same & mask).sum() / n)})
    return rows


def read_falls(folders: list[Path], steps: list[int]) -> dict[str, list[float | None]]:
    """Per model, the mean fall of validation BPB over each stretch [steps[i], steps[i + 1]) across
    its runs whose logs hold both ends before the warmdown; None where no run does."""
    per_model: dict[str, list[list[float]]] = {}
    for folder in folders:
        texts = figure.logs(folder)
        for model, seeds in figure.validations(folder, texts).items():
            per = per_model.setdefault(model, [[] for _ in steps[1:]])
            for seed, points in seeds.items():
                flat_until = figure.warmdown_start(texts[model][seed])
                if flat_until is None:
                    raise SystemExit(f"error: {folder}/{model}_seed{seed}.log does not print warmdown_iters")
                val = {step: bpb for step, _, bpb in points}
                for i, (a, b) in enumerate(zip(steps, steps[1:])):
                    if a in val and b in val and b <= flat_until:
                        per[i].append(val[a] - val[b])
    return {m: [sum(x) / len(x) if x else None for x in per] for m, per in per_model.items()}


def table(name: str, rows: list[dict], falls: dict[str, list[float | None]]) -> str:
    eras = [f"{lo}-{hi}" for lo, hi in ERAS]
    head = ["steps", "bytes", "mean year", *eras, rows[0]["last_president"], *(f"{m} fall" for m in falls)]
    lines = [f"{name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        fall = [falls[m][i] if i < len(rows) - 1 else None for m in falls]
        lines.append(f"| {r['steps']} | {r['bytes']:,} | {r['mean_year']:.0f} | "
                     + " | ".join(f"{100 * r[e]:.1f}%" for e in eras) + f" | {100 * r['same_speaker']:.1f}% |"
                     + "".join(" |" if f is None else f" {f:+.3f} |" for f in fall))
    return "\n".join(lines)


def correlations(points: list[tuple[dict, dict]]) -> str:
    """How the stretches' falls go together: each model's with the others' and with the years.
    points: (stretch row, {model: fall}) over every table's stretches."""
    models = sorted({m for _, f in points for m in f})
    measures = {"mean year": "mean_year", "2000-2014 share": "2000-2014", "1960-1999 share": "1960-1999",
                "last president's share": "same_speaker"}
    lines = ["Correlation (Pearson r) of the stretches' validation falls, over the stretches both sides have:", ""]
    for i, m in enumerate(models):
        for other in models[i + 1:]:
            pairs = [(f[m], f[other]) for _, f in points if f.get(m) is not None and f.get(other) is not None]
            lines.append(f"- {m} with {other}: {pearson(pairs)} ({len(pairs)} stretches)")
        for label, key in measures.items():
            pairs = [(f[m], row[key]) for row, f in points if f.get(m) is not None]
            lines.append(f"- {m} with the {label}: {pearson(pairs)} ({len(pairs)} stretches)")
    return "\n".join(lines)


def pearson(pairs: list[tuple[float, float]]) -> str:
    if len(pairs) < 3:
        return "too few stretches"
    x, y = np.array(pairs).T
    if x.std() == 0 or y.std() == 0:
        return "undefined (one side constant)"
    return f"{np.corrcoef(x, y)[0, 1]:+.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("docs", type=Path, nargs="+", help="documents files (make_sample.py), one table each")
    p.add_argument("--steps", default="0,500,1000,1500,1900",
                   help="stretch boundaries in steps, comma-separated and increasing (default %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="TRAIN_BATCH_TOKENS (default %(default)s)")
    p.add_argument("--micro-steps", type=int, default=8,
                   help="micro-batches a step on the one process (default %(default)s: 8 // WORLD_SIZE)")
    p.add_argument("--logs", type=Path, nargs="+", action="append", metavar="FOLDER",
                   help="run folders (bench/minigolf.py --logs) trained on a documents file; give it once per "
                        "file, in the order of the files")
    p.add_argument("--out", type=Path, help="also write the tables here (markdown)")
    args = p.parse_args(argv)
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        p.error(f"--steps {args.steps!r}: expected whole numbers separated by commas")
    if len(steps) < 2 or steps != sorted(set(steps)) or steps[0] < 0:
        p.error(f"--steps {args.steps!r}: expected two or more increasing step numbers from 0 up")
    if args.micro_steps < 1 or args.batch_tokens % args.micro_steps:
        p.error(f"--batch-tokens {args.batch_tokens} must split into --micro-steps {args.micro_steps} equal parts")
    if args.logs and len(args.logs) != len(args.docs):
        p.error(f"--logs given {len(args.logs)} times for {len(args.docs)} documents files: expected once per file")
    tokens_per_step = runs.stream_tokens_per_step({"TRAIN_BATCH_TOKENS": args.batch_tokens,
                                                   "GRAD_ACCUM_STEPS": args.micro_steps})
    tables, points = [], []
    for k, path in enumerate(args.docs):
        num_val, docs = read_docs(path)
        shards = sorted(Path(runs.export_corpus(path)["DATA_PATH"]).glob("fineweb_train_*.bin"))
        stream = np.concatenate([exporter.read_shard(f) for f in shards])
        rows = stretch_rows(stream, docs[num_val:], tokens_per_step, steps)
        falls = read_falls(args.logs[k], steps) if args.logs else {}
        points += [(row, {m: f[i] for m, f in falls.items()}) for i, row in enumerate(rows[:-1])]
        tables.append(table(f"{path.name}: {tokens_per_step:,} tokens a step, {len(stream) // tokens_per_step:,} "
                            f"steps in one pass", rows, falls))
    if args.logs:
        tables.append(correlations(points))
    command = " ".join(["python bench/order_stretch.py", *(sys.argv[1:] if argv is None else argv)])
    files.report("\n\n".join([f"`{command}`", *tables]), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
