"""The studies' byte-vs-subword comparison on a laptop: four models, one CPU budget each.

    python bench/minigolf.py                       # 150 s per model on the sample, seed 1337
    python bench/minigolf.py --seconds 300 --seeds 1337,1,2
    python bench/minigolf.py --models byte260_hnet,byte260_gpt --seconds 20 MODEL_DIM=32   # quick look
    python bench/minigolf.py --docs data/sotu_full/sotu_1790_2021_shuf1.jsonl.xz   # every address
        # 1790-2021, training order shuffled (data/sample/make_sample.py --first-year 1790
        # --shuffle-train 1): 5x the training text, the same validation speeches (2015-2021)

Trains and scores, through study 02's trainer and its `cpu_demo` run in runs.json (the demo's
8 x 128 model, sequence 512, 4,096 tokens a step): the byte260 H-Net, the byte260 GPT
(OUTER_LAYERS=0), the sp1024 GPT and the sp1024 H-Net, each for the same wall-clock budget.
What keeps it fair, and what the table shows so you can judge:
- equal wall clock (MAX_WALLCLOCK_SECONDS), equal tokens a step, the same width and depth, so
  the parameter counts are within 10% (the sp1024 embedding is the difference); printed;
- context: 512 tokens for every model, which is 512 bytes for byte260 and about 1,400 for
  sp1024; printed as "context bytes";
- at most one pass over the training split: ITERATIONS is capped at one epoch, so no model wins
  by memorising a small corpus (the sample's train split is 1.9 MB); "epochs" is printed;
- no LR warmup for any model (the demo's 300 steps would be all of an sp1024 run), FAIR below;
- the sp1024 H-Net's TARGET_AVG_CHUNK_LEN is 2 tokens (about 5.4 bytes, close to byte260's 6).
Prints one table (markdown) and writes it with each run's train.log to --logs.
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

SAMPLE_SP = runs.SAMPLE_EXPORT / "datasets" / "fineweb10B_sp1024"
SP_ENV = {"DATA_PATH": str(SAMPLE_SP), "VOCAB_SIZE": "1024",
          "TOKENIZER_PATH": str(runs.SAMPLE_EXPORT / "tokenizers" / "fineweb_1024_bpe.model")}
# The demo's LR warmup is counted in steps, so under one wall clock it would take a larger share
# of the runs that take fewer steps (the sp1024 runs stop at one epoch, 160 steps, inside a
# 300-step warmup). Off for every model here; an override (LR_WARMUP_STEPS=...) still wins.
FAIR = ["LR_WARMUP_STEPS=0"]

MODELS = {
    "byte260_hnet": {},
    "byte260_gpt": {"OUTER_LAYERS": "0"},
    "sp1024_gpt": {**SP_ENV, "OUTER_LAYERS": "0"},
    "sp1024_hnet": {**SP_ENV, "TARGET_AVG_CHUNK_LEN": "2"},
}


def spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def table(results: dict) -> str:
    head = ["model", "params", "context bytes", "train bytes/s", "steps", "epochs", "float BPB", "round-trip BPB",
            "artifact bytes", "bytes/chunk", "precision", "recall", "chunk CV"]
    lines = []
    for name, rows in results.items():
        b = [r["boundaries"] for r in rows if r["boundaries"]]
        cells = [name, f"{rows[0]['params']:,}", f"{rows[0]['context_bytes']:.0f}",
                 spread([r["train_bytes_per_s"] for r in rows], "{:,.0f}"), spread([r["steps"] for r in rows], "{:.0f}"),
                 spread([r["epochs"] for r in rows], "{:.2f}"), spread([r["float"] for r in rows], "{:.4f}"),
                 spread([r["roundtrip"] for r in rows], "{:.4f}"), spread([r["bytes"] for r in rows], "{:,.0f}")]
        cells += [spread([x[k] for x in b], f) if b else "-" for k, f in
                  (("bytes_per_chunk", "{:.2f}"), ("precision", "{:.3f}"), ("recall", "{:.3f}"),
                   ("chunk_bytes_cv", "{:.2f}"))]
        lines.append(cells)
    return files.markdown_table(head, lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=150.0, help="training wall clock per model")
    p.add_argument("--seeds", default="1337", help="comma-separated seeds; each model runs once per seed")
    p.add_argument("--models", default=",".join(MODELS), help=f"a subset of {', '.join(MODELS)}")
    p.add_argument("--logs", type=Path, default=ROOT / "bench" / "logs" / "minigolf", help="where logs and the table go")
    p.add_argument("--docs", type=Path, help="a documents file to train and validate on instead of the sample "
                                             "(exported to byte260 and sp1024 on first use)")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE for every model")
    args = p.parse_intermixed_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)}; known: {', '.join(MODELS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    study = modules.study_dir("02")
    args.logs.mkdir(parents=True, exist_ok=True)
    work = ROOT / "runs" / f"minigolf_{runs.unique_stamp()}"
    results = {}
    for name in models:
        for seed in seeds:
            # the model's own keys (e.g. OUTER_LAYERS=0 for a GPT) win over overrides given for every model
            keys = dict(MODELS[name])
            if args.docs is not None:
                keys.update(runs.export_corpus(args.docs, "sp1024" if name.startswith("sp1024") else "byte260"))
            env, _ = modules.run_env(study, "cpu_demo", [f"MAX_WALLCLOCK_SECONDS={args.seconds:g}", f"SEED={seed}",
                                                         *FAIR, *args.overrides, *(f"{k}={v}" for k, v in keys.items())])
            runs.ensure_sample_export(env)
            one_epoch = runs.train_tokens(env["DATA_PATH"]) // int(env["TRAIN_BATCH_TOKENS"])
            env["ITERATIONS"] = str(min(int(env["ITERATIONS"]), one_epoch))
            out = work / f"{name}_seed{seed}"
            print(f"=== {name} seed {seed}: {args.seconds:g} s, at most {one_epoch} steps (one epoch)", flush=True)
            row = runs.measure(study, {**env, "OUTPUT_DIR": str(out), "RUN_ID": out.name})
            row["epochs"] = row["steps"] / max(one_epoch, 1)
            results.setdefault(name, []).append(row)
            files.copy_log(out, args.logs / f"{name}_seed{seed}.log")
    command = " ".join(["python bench/minigolf.py", f"--seconds {args.seconds:g}", f"--seeds {args.seeds}",
                        *([f"--models {args.models}"] if models != list(MODELS) else []),
                        *([f"--docs {args.docs}"] if args.docs else []), *args.overrides])
    text = (f"`{command}`: mean (min-max) over seeds {args.seeds}; BPB of the validation speeches (2015-2021); "
            "round trip = the int6 GPTQ + zstd artifact read back\n\n" + table(results) + "\n")
    files.write_atomic(args.logs / "table.md", text)
    files.write_atomic(args.logs / "results.json", json.dumps(results, indent=1) + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
