"""Train runs in this process (or in a child process, for sweeps run side by side) and summarise
them for the bench/ tables; export the corpora they train on.

    python -m harness.runs STUDY ENV.json ROW.json     # one measure() in a fresh process (bench --jobs)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import files, modules

ROOT = modules.ROOT
SAMPLE_DOCS = ROOT / "data" / "sample" / "sotu_1961_2021.jsonl.xz"
SAMPLE_EXPORT = ROOT / "data" / "sample_export"
EXPORTER = ROOT / "data" / "download_hf_docs_and_tokenize.py"  # the shard writer and checker


def export_corpus(docs: Path, spec: str = "byte260", root: Path | None = None) -> dict:
    """DATA_PATH, TOKENIZER_PATH and VOCAB_SIZE of a documents file exported with a tokenizer spec
    (byte260 or sp1024) into root (default data/<name>_export/), exported only the first time: the
    manifest is written last, so a dataset it lists is complete."""
    root = root or ROOT / "data" / f"{docs.name.split('.')[0]}_export"
    dataset = root / "datasets" / f"fineweb10B_{spec}"
    tokenizer = root / "tokenizers" / ("fineweb_pure_byte_260.json" if spec == "byte260" else "fineweb_1024_bpe.model")
    manifest = root / "manifest.json"
    listed = manifest.is_file() and any(d["name"] == dataset.name for d in json.loads(manifest.read_text())["datasets"])
    if not listed:
        exporter = modules.import_file(EXPORTER)
        t0 = time.time()
        code = exporter.main(["--docs", str(docs), "--output-root", str(root),
                              "--tokenizer-config", str(ROOT / "data" / f"tokenizer_specs_{spec}.json")])
        if code:
            raise SystemExit(f"error: exporting {docs} with {spec} failed (exit {code})")
        print(f"exported {docs.name} ({spec}) to {root} in {time.time() - t0:.1f}s")
    return {"DATA_PATH": str(dataset), "TOKENIZER_PATH": str(tokenizer),
            "VOCAB_SIZE": "260" if spec == "byte260" else "1024"}


def ensure_sample_export(env: dict) -> None:
    """The embedded corpus exported the first time a run reads it (byte260 or sp1024, by DATA_PATH)."""
    if str(SAMPLE_EXPORT) in env.get("DATA_PATH", ""):
        export_corpus(SAMPLE_DOCS, "sp1024" if "sp1024" in env["DATA_PATH"] else "byte260", SAMPLE_EXPORT)


def train_tokens(data_path: str | Path) -> int:
    """Tokens in a dataset's training split (the bench/ tables' epochs), counted by the exporter's
    shard_token_count, which checks each header and file size without reading the tokens."""
    count = modules.import_file(EXPORTER).shard_token_count
    return sum(count(f) for f in sorted(Path(data_path).glob("fineweb_train_*.bin")))


def stream_tokens_per_step(env: dict, world_size: int = 1) -> int:
    """Tokens one step takes from the training stream: each micro-batch on each rank takes its share
    of TRAIN_BATCH_TOKENS and one more (its last target, never an input), so a pass over the split
    is train_tokens // this steps, not train_tokens // TRAIN_BATCH_TOKENS."""
    accum = int(env.get("GRAD_ACCUM_STEPS") or 0) or max(1, 8 // world_size)  # the trainers' default
    return world_size * accum * (int(env["TRAIN_BATCH_TOKENS"]) // (world_size * accum) + 1)


def unique_stamp() -> str:
    """A time stamp for a folder of runs, with a random suffix: two sweeps started in the same
    second (two harnesses side by side) must never share run folders and overwrite each other."""
    return time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]


def measure(study: Path, env: dict) -> dict:
    """Train one run in this process and summarise it for the bench/ tables: the trainer's metrics,
    the round-tripped model's boundary statistics (H-Nets), steps, time and train bytes per second."""
    import torch

    import boundaries

    trainer = modules.trainer_of(study)
    hp, _ = trainer.Hyperparameters.from_env(env)
    t0 = time.time()
    run, metrics = trainer.run_training(hp)
    final = metrics["headline_format"]
    # bytes a token stands for, measured on the validation text (a vocabulary mean would count
    # byte260's four specials as bytes and put its rate ~1.5% low)
    bytes_per_token = metrics["float"]["bytes"] / metrics["float"]["tokens"]
    train_s = max(run.training_time_ms / 1000, 1e-9)
    row = {"run_dir": str(run.run_dir), "params": sum(p.numel() for p in run.model.parameters()),
           "steps": run.step, "seconds": time.time() - t0, "train_ms": run.training_time_ms,
           "train_tokens_seen": run.step * hp.train_batch_tokens,
           "train_bytes_per_s": run.step * hp.train_batch_tokens * bytes_per_token / train_s,
           "context_bytes": hp.train_seq_len * bytes_per_token,
           "float": metrics["float"]["val_bpb"], "roundtrip": metrics[f"{final}_roundtrip"]["val_bpb"],
           "roundtrips": {fmt: metrics[f"{fmt}_roundtrip"]["val_bpb"] for fmt in hp.formats},
           "format": final, "sliding": metrics.get(f"{final}_sliding", {}).get("val_bpb"),
           "bytes": metrics["bytes_total"], "threads": torch.get_num_threads(), "boundaries": None}
    if hp.is_hnet:
        row["boundaries"] = boundaries.analyse(trainer, run.model, hp, run.val_tokens, run.rt.device, shifts=0)
    return row


def measure_in_child(study: Path, env: dict, threads: int) -> dict:
    """measure() in a fresh Python process with `threads` torch threads (runs side by side must not
    share a process: each owns its RNG, its signal handlers and its run folder)."""
    out = Path(env["OUTPUT_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    env_file, row_file = out / "measure_env.json", out / "measure_row.json"
    files.write_atomic(env_file, json.dumps(env))
    child_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    with open(out / "measure_console.txt", "w") as console:
        code = subprocess.run([sys.executable, "-m", "harness.runs", str(study), str(env_file), str(row_file)],
                              cwd=ROOT, env=child_env, stdout=console, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"error: the run in {out} exited with {code}; see {out / 'measure_console.txt'}")
    return json.loads(row_file.read_text())


def measure_all(study: Path, envs: list[dict], jobs: int, on_row=None) -> list[dict]:
    """measure() every env: in this process when jobs is 1, else `jobs` child processes at a time,
    each with an equal share of the cores. Fine for fixed-step runs; runs scheduled by wall clock
    would slow each other down and must run one at a time. Rows come back in the order of envs."""
    if jobs <= 1:
        rows = []
        for env in envs:
            rows.append(measure(study, env))
            if on_row:
                on_row(len(rows) - 1, rows[-1])
        return rows
    threads = max(1, (os.cpu_count() or 1) // jobs)

    def one(i_env):
        i, env = i_env
        row = measure_in_child(study, env, threads)
        if on_row:
            on_row(i, row)
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, enumerate(envs)))


def main(argv: list[str]) -> int:
    study, env_file, row_file = (Path(a) for a in argv)
    row = measure(study, json.loads(env_file.read_text()))
    files.write_atomic(row_file, json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
