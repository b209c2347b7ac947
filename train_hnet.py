"""Launch a study's named run, or, with no arguments, the CPU demo.

    python train_hnet.py                          # CPU demo: study 02 on the embedded corpus
    python train_hnet.py --list                   # every named run of every study
    python train_hnet.py 02 byte260_10min         # a published run (torchrun on its nproc)
    python train_hnet.py --study 01 byte260_10min --seeds 1337,1234,2026   # one after another
    python train_hnet.py 02 byte260_10min --seed 7 --nproc 1 --dry-run

A run's environment comes from the study's runs.json; KEY=VALUE arguments override it (change
one thing, run again). Runs on one process execute in this process, so the demo can show the
learned chunks afterwards; runs on several processes are handed to torchrun.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boundaries
import eval_bpb

ROOT = Path(__file__).resolve().parent
STUDIES = ROOT / "studies"
SAMPLE_DOCS = ROOT / "data" / "sample" / "sotu_1961_2021.jsonl.xz"
SAMPLE_EXPORT = ROOT / "data" / "sample_export"
EXPORTER = ROOT / "data" / "download_hf_docs_and_tokenize.py"  # the shard writer and checker
# Overrides with these prefixes are for torch, NCCL or the OpenMP runtime, not the trainer: they
# pass through unchecked. Every other KEY must be a field of the trainer's Hyperparameters.
PASSTHROUGH_PREFIXES = ("TORCH_", "TORCHINDUCTOR_", "TORCHDYNAMO_", "PYTORCH_", "NCCL_", "GLOO_", "CUDA_",
                        "NVIDIA_", "OMP_", "MKL_", "KMP_", "TRITON_", "HF_")


def study_dir(name: str) -> Path:
    matches = [d for d in sorted(STUDIES.iterdir()) if d.is_dir() and (d.name == name or d.name.startswith(name + "_"))]
    if len(matches) != 1:
        names = ", ".join(d.name for d in sorted(STUDIES.iterdir()) if d.is_dir())
        raise SystemExit(f"error: study {name!r} matches {len(matches)} of: {names}")
    return matches[0]


def load_runs(study: Path) -> dict:
    return json.loads((study / "runs.json").read_text())["runs"]


def check_keys(trainer, keys, where: str) -> None:
    """Every KEY must name a trainer variable (or pass through to torch/NCCL/OpenMP)."""
    known = [f.name.upper() for f in dataclasses.fields(trainer.Hyperparameters)]
    for key in keys:
        if key in known or key.startswith(PASSTHROUGH_PREFIXES):
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        close = close or [k for k in known if key in k][:1]  # SEQ_LEN -> TRAIN_SEQ_LEN
        hint = f"; did you mean {close[0]}?" if close else ""
        raise SystemExit(f"error: {where}: {key} is not a variable of {trainer.__file__}{hint}")


def run_env(study: Path, run: str, overrides: list[str]) -> tuple[dict, int]:
    runs = load_runs(study)
    if run not in runs:
        raise SystemExit(f"error: {study.name}/runs.json has no run {run!r}; runs: {', '.join(runs)}")
    env = dict(runs[run]["env"])
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.isupper():
            raise SystemExit(f"error: override {item!r} is not KEY=VALUE")
        env[key] = value
    trainer = eval_bpb.import_file(study / "train_gpt.py")
    check_keys(trainer, runs[run]["env"], f"{study.name}/runs.json run {run}")
    check_keys(trainer, [o.partition("=")[0] for o in overrides], "override")
    for key, value in env.items():  # paths in runs.json are relative to the repository root
        if key in ("DATA_PATH", "TOKENIZER_PATH") and value.startswith("./"):
            env[key] = str(ROOT / value)
    return env, int(runs[run].get("nproc", 1))


def export_corpus(docs: Path, spec: str = "byte260", root: Path | None = None) -> dict:
    """DATA_PATH, TOKENIZER_PATH and VOCAB_SIZE of a documents file exported with a tokenizer spec
    (byte260 or sp1024) into root (default data/<name>_export/), exported only the first time: the
    manifest is written last, so a dataset it lists is complete."""
    root = root or ROOT / "data" / f"{docs.name.split('.')[0]}_export"
    dataset = root / "datasets" / f"fineweb10B_{spec}"
    tokenizer = root / "tokenizers" / ("fineweb_pure_byte_260.json" if spec == "byte260" else "fineweb_1024_bpe.model")
    manifest = root / "manifest.json"
    if not (manifest.is_file() and any(d["name"] == dataset.name for d in json.loads(manifest.read_text())["datasets"])):
        exporter = eval_bpb.import_file(EXPORTER)
        t0 = time.time()
        code = exporter.main(["--docs", str(docs), "--output-root", str(root),
                              "--tokenizer-config", str(ROOT / "data" / f"tokenizer_specs_{spec}.json")])
        if code:
            raise SystemExit(f"error: exporting {docs} with {spec} failed (exit {code})")
        print(f"exported {docs.name} ({spec}) to {root} in {time.time() - t0:.1f}s")
    return {"DATA_PATH": str(dataset), "TOKENIZER_PATH": str(tokenizer), "VOCAB_SIZE": "260" if spec == "byte260" else "1024"}


def train_tokens(data_path: str | Path) -> int:
    """Tokens in a dataset's training split (the bench/ tables' epochs), counted by the exporter's
    shard_token_count, which checks each header and file size without reading the tokens."""
    count = eval_bpb.import_file(EXPORTER).shard_token_count
    return sum(count(f) for f in sorted(Path(data_path).glob("fineweb_train_*.bin")))


def ensure_sample_export() -> None:
    """The embedded corpus as byte260 shards, exported the first time the demo runs."""
    export_corpus(SAMPLE_DOCS, "byte260", SAMPLE_EXPORT)


def run_in_process(study: Path, env: dict, demo: bool) -> int:
    trainer = eval_bpb.import_file(study / "train_gpt.py")
    try:
        hp, warnings = trainer.Hyperparameters.from_env({**os.environ, **env})
        for w in warnings:
            print(f"WARNING: {w}", file=sys.stderr)
        t0 = time.time()
        run, metrics = trainer.run_training(hp, warnings)
    except trainer.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except trainer.TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except trainer.NonFiniteScore as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if demo:
        print_demo_summary(trainer, run, metrics, time.time() - t0)
    return 4 if metrics["over_cap"] else 0


def unique_stamp() -> str:
    """A time stamp for a folder of runs, with a random suffix: two sweeps started in the same
    second (two harnesses side by side) must never share run folders and overwrite each other."""
    return time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]


def measure(study: Path, env: dict) -> dict:
    """Train one run in this process and summarise it for the bench/ tables: the trainer's metrics,
    the round-tripped model's boundary statistics (H-Nets), steps, time and train bytes per second."""
    trainer = eval_bpb.import_file(study / "train_gpt.py")
    hp, _ = trainer.Hyperparameters.from_env(env)
    t0 = time.time()
    run, metrics = trainer.run_training(hp)
    final = metrics["headline_format"]
    # bytes a token stands for, measured on the validation text (a vocabulary mean would count
    # byte260's four specials as bytes and put its rate ~1.5% low)
    bytes_per_token = metrics["float"]["bytes"] / metrics["float"]["tokens"]
    row = {"run_dir": str(run.run_dir), "params": sum(p.numel() for p in run.model.parameters()),
           "steps": run.step, "seconds": time.time() - t0, "train_ms": run.training_time_ms,
           "train_tokens_seen": run.step * hp.train_batch_tokens,
           "train_bytes_per_s": run.step * hp.train_batch_tokens * bytes_per_token / max(run.training_time_ms / 1000, 1e-9),
           "context_bytes": hp.train_seq_len * metrics["float"]["bytes"] / metrics["float"]["tokens"],
           "float": metrics["float"]["val_bpb"], "roundtrip": metrics[f"{final}_roundtrip"]["val_bpb"],
           "roundtrips": {fmt: metrics[f"{fmt}_roundtrip"]["val_bpb"] for fmt in hp.formats},
           "format": final, "sliding": metrics.get(f"{final}_sliding", {}).get("val_bpb"),
           "bytes": metrics["bytes_total"], "boundaries": None}
    if hp.is_hnet:
        row["boundaries"] = boundaries.analyse(trainer, run.model, hp, run.val_tokens, run.rt.device, shifts=0)
    return row


def print_demo_summary(trainer, run, metrics: dict, seconds: float) -> None:
    hp = run.hp
    labels = {"int8": "int8+zlib", "int6": "int6+zstd"}
    final = metrics["headline_format"]
    print("\n" + "=" * 80)
    print(f"CPU demo done in {seconds:.0f}s: {run.step} steps, {hp.num_layers}x{hp.model_dim} "
          f"{'H-Net (outer %d)' % hp.outer_layers if hp.is_hnet else 'GPT'}, "
          f"{sum(p.numel() for p in run.model.parameters()):,} parameters")
    print(f"val_bpb  float {metrics['float']['val_bpb']:.4f}"
          + "".join(f" | {labels[f]} round trip {metrics[f + '_roundtrip']['val_bpb']:.4f}" for f in hp.formats)
          + (f" | {final} sliding (stride {hp.eval_stride}) {metrics[final + '_sliding']['val_bpb']:.4f}"
             if final + "_sliding" in metrics else ""))
    print(f"artifact {metrics['bytes_total']:,} bytes (code {metrics['bytes_code']:,}) of the 16,000,000 cap: "
          f"{'under' if not metrics['over_cap'] else 'OVER'}")
    if hp.is_hnet:  # a plain GPT has no router to report on
        report = boundaries.analyse(trainer, run.model, hp, run.val_tokens, run.rt.device, shifts=0)
        print(f"router: {report['tokens_per_chunk']:.2f} bytes per chunk (target {hp.target_avg_chunk_len:g}); "
              f"boundaries on word starts: precision {report['precision']:.3f}, recall {report['recall']:.3f} "
              f"(one byte before / after word starts: precision {report['precision_shift_minus1']:.3f} / "
              f"{report['precision_shift_plus1']:.3f})")
        print(f"a validation paragraph in its learned chunks:\n{report['example']}")
    print(f"run folder: {run.run_dir}")


def list_runs() -> None:
    for study in sorted(d for d in STUDIES.iterdir() if (d / "runs.json").is_file()):
        for name, r in load_runs(study).items():
            pub = r.get("published") or {}
            bpb = f"published {pub['val_bpb']:.4f}" if "val_bpb" in pub else "not a published run"
            if "val_bpb_std" in pub:
                bpb += f" +- {pub['val_bpb_std']:.3f} ({pub['seeds']} seeds)"
            print(f"{study.name[:2]} {name:<28} nproc {r.get('nproc', 1)}  {bpb}: {r.get('description', '')}")


COMMANDS_BEGIN = "<!-- commands: generated by `python train_hnet.py --commands STUDY` from runs.json; tests check it -->"
COMMANDS_END = "<!-- end of commands -->"


def readme_commands(study: Path) -> str:
    """The study README's commands block: each run by name, and the plain torchrun it stands for."""
    lines = [COMMANDS_BEGIN, "```bash"]
    for name, r in load_runs(study).items():
        seeds = r.get("seeds")
        pub = r.get("published") or {}
        what = f"published {pub['val_bpb']:.4f}" if "val_bpb" in pub else "not a published run"
        lines.append(f"# {name}: {r.get('nproc', 1)} process(es), {r.get('hardware', '')}, {what}")
        lines.append(f"python train_hnet.py {study.name[:2]} {name}" + (f" --seeds {','.join(map(str, seeds))}" if seeds else ""))
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in r["env"].items())
        lines.append(f"# = {env} torchrun --standalone --nproc_per_node={r.get('nproc', 1)} studies/{study.name}/train_gpt.py")
    lines += ["```", COMMANDS_END]
    return "\n".join(lines)


def estimate_size(trainer, hp) -> dict:
    """The run's parameter count, fp32 bytes and an estimate of its artifact, without training or
    data: one matrix of each shape is filled with N(0, 1) weights (so a scale floor does not bind),
    quantised and compressed in the trainer's final format (round to nearest, no Hessian), and its
    bytes per element scaled to every matrix of that shape; small tensors count at their stored
    width. Trained weights compress differently: this is an estimate, labelled as one."""
    import torch

    with torch.device("meta"):
        model = trainer.HNet(hp)
    fmt = hp.formats[-1]
    shapes, small = {}, 0
    for name, p in model.state_dict().items():
        if p.ndim == 2 and p.numel() > hp.keep_float_max_numel:
            key = (tuple(p.shape), fmt == "int8" or name == "tok_emb.weight")
            shapes[key] = shapes.get(key, 0) + 1
        else:
            small += p.numel() * (4 if any(k in name for k in trainer.CONTROL_NAMES) else 2)
    g = torch.Generator().manual_seed(0)
    model_bytes = small
    for (shape, as_int8), count in shapes.items():
        w = torch.randn(shape, generator=g)
        if as_int8:
            q, scale = trainer.quantize_int8_rows(w, bool(hp.quant_scale_floor))
        else:
            q, scale = trainer.quantize_int6_matrix(w, None, hp)
            trainer.prune_int6({"w": (q, scale)}, hp.prune_pct, bool(hp.prune_nonzero))
        model_bytes += count * len(trainer.compress({"q": q, "scale": scale}, fmt))
    params = sum(p.numel() for p in model.parameters())
    code = len((Path(trainer.__file__)).read_bytes())
    return {"model_params": params, "float_bytes": 4 * params, "format": fmt, "code_bytes": code,
            "estimated_model_bytes": model_bytes, "estimated_total_bytes": code + model_bytes}


def print_estimate(e: dict, cap: int, published: dict | None) -> None:
    label = {"int8": "int8 + zlib-9", "int6": "int6 + zstd-22"}[e["format"]]
    total = e["estimated_total_bytes"]
    print(f"model_params:{e['model_params']}")
    print(f"float_bytes:{e['float_bytes']} (fp32 weights)")
    print(f"estimated_artifact_bytes:{total} ({label}: model ~{e['estimated_model_bytes']:,} + code "
          f"{e['code_bytes']:,}) = {total / cap:.1%} of the {cap:,}-byte cap"
          f"{'' if total <= cap else ' (the estimate is over it)'}")
    print("  an ESTIMATE from Gaussian weights, not a trained model: trained weights are heavier-tailed and "
          "usually compress a few percent better; the real size is printed after training"
          + (f"; the published artifact was {published['bytes_total']:,} bytes" if "bytes_total" in (published or {}) else ""))


def run_seeds(study: Path, run: str, env: dict, nproc: int, seeds: list[int], cmd: list[str]) -> int:
    """Run the same configuration once per seed, one after another; then the per-seed table and
    mean and sample std of the headline BPB, as the studies report them."""
    rows, stamp = [], unique_stamp()
    for seed in seeds:
        run_id = f"{run}_seed{seed}_{stamp}"
        out = Path(env["OUTPUT_DIR"]) / run_id if env.get("OUTPUT_DIR") else ROOT / "runs" / run_id
        seed_env = {**env, "SEED": str(seed), "RUN_ID": run_id, "OUTPUT_DIR": str(out)}
        print(f"=== seed {seed}: {out}", flush=True)
        if nproc == 1:
            code = run_in_process(study, seed_env, demo=False)
        else:
            code = subprocess.run(cmd, env={**os.environ, **seed_env}).returncode
        sub_path = out / "submission.json"
        if code != 0 or not sub_path.is_file():
            print(f"error: seed {seed} exited with {code}; no summary over an incomplete set of seeds", file=sys.stderr)
            return code or 1
        sub = json.loads(sub_path.read_text())
        rows.append((seed, sub["steps"], sub["val_bpb"], sub["bytes_total"]))
    print(f"\n{'seed':>6}{'steps':>9}{'val_bpb':>12}{'bytes_total':>14}")
    for seed, steps, bpb, size in rows:
        print(f"{seed:>6}{steps:>9}{bpb:>12.6f}{size:>14,}")
    bpbs = [r[2] for r in rows]
    std = statistics.stdev(bpbs) if len(bpbs) > 1 else 0.0
    print(f"mean val_bpb {statistics.mean(bpbs):.6f} +- {std:.6f} (sample std over {len(bpbs)} seeds), "
          f"best {min(bpbs):.6f} (seed {rows[bpbs.index(min(bpbs))][0]})")
    return 0


def parse_seeds(text: str, published: list) -> list[int]:
    if text == "published":
        if not published:
            raise SystemExit("error: --seeds without a list: this run has no published seeds in runs.json")
        return list(published)
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"error: --seeds {text!r}: expected integers separated by commas, e.g. 1337,1234,2026") from None
    if not seeds:
        raise SystemExit("error: --seeds: no seed given")
    return seeds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", nargs="?", help="study folder or its number prefix, e.g. 02 (or --study)")
    p.add_argument("run", nargs="?", help="a run name from the study's runs.json")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE environment overrides")
    p.add_argument("--study", dest="study_opt", metavar="STUDY", help="the study, as an option")
    p.add_argument("--seed", type=int, help="the run's seed (the same as SEED=S)")
    p.add_argument("--seeds", nargs="?", const="published", metavar="S1,S2,...",
                   help="run once per seed, one after another, then print mean and std (alone: the run's published seeds)")
    p.add_argument("--nproc", type=int, help="processes (default: the run's nproc)")
    p.add_argument("--list", action="store_true", help="list every named run")
    p.add_argument("--commands", metavar="STUDY", help="print a study's README commands block (from its runs.json)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print the command, the parameter count and an artifact size estimate; run nothing")
    args = p.parse_args(argv)
    if args.list:
        list_runs()
        return 0
    if args.commands:
        print(readme_commands(study_dir(args.commands)))
        return 0
    if args.study_opt:  # --study 01 RUN: the positionals shift by one
        args.overrides = [a for a in (args.run,) if a] + args.overrides
        args.study, args.run = args.study_opt, args.study
    demo = args.study is None
    if demo or "=" in (args.study or ""):  # bare call, possibly with overrides: the demo
        args.overrides = [a for a in (args.study, args.run) if a] + args.overrides
        args.study, args.run = "02", "cpu_demo"
    if args.run is None:
        p.error("give a run name after the study (see --list)")
    if "=" in args.run:
        p.error(f"{args.run!r} stands where a run name goes: give the run first, e.g. "
                f"train_hnet.py {args.study} <run> {args.run} (see --list)")
    if args.nproc is not None and args.nproc < 1:
        p.error(f"--nproc {args.nproc}: must be at least 1")
    if args.seed is not None:
        args.overrides.append(f"SEED={args.seed}")
    study = study_dir(args.study)
    env, nproc = run_env(study, args.run, args.overrides)
    nproc = args.nproc or nproc
    spec = load_runs(study)[args.run]  # run_env has checked that it exists
    seeds = parse_seeds(args.seeds, spec.get("seeds")) if args.seeds else None
    if seeds and args.seed is not None:
        p.error("give --seed or --seeds, not both")
    trainer = eval_bpb.import_file(study / "train_gpt.py")
    try:  # the dry run and the launch both validate the whole configuration first
        hp, _ = trainer.Hyperparameters.from_env(env)
    except trainer.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(study / "train_gpt.py")]
    if args.dry_run:
        for seed in seeds or [None]:
            seed_env = env if seed is None else {**env, "SEED": str(seed)}
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in seed_env.items()) + " " + " ".join(map(shlex.quote, cmd)))
        print_estimate(estimate_size(trainer, hp), trainer.SIZE_CAP_BYTES, spec.get("published"))
        return 0
    if args.run == "cpu_demo" or "sample_export" in env.get("DATA_PATH", ""):
        ensure_sample_export()
    if seeds:
        return run_seeds(study, args.run, env, nproc, seeds, cmd)
    if nproc == 1:
        return run_in_process(study, env, demo=args.run == "cpu_demo")
    os.execvpe(cmd[0], cmd, {**os.environ, **env})


if __name__ == "__main__":
    sys.exit(main())
