"""Launch a study's named run, or, with no arguments, the CPU demo.

    python train_hnet.py                          # CPU demo: study 02 on the embedded corpus
    python train_hnet.py --list                   # every named run of every study
    python train_hnet.py 02 byte260_10min         # a published run (torchrun on its nproc)
    python train_hnet.py --study 01 byte260_10min --seeds 1337,1234,2026   # one after another
    python train_hnet.py 02 byte260_10min --seed 7 --nproc 1 --dry-run

A run's environment comes from the study's runs.json; KEY=VALUE arguments override it (change
one thing, run again). Every run writes runs/<RUN_ID>/ in this repository unless OUTPUT_DIR says
otherwise. Runs on one process execute in this process, so the demo can show the learned chunks
afterwards; runs on several processes are handed to torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from harness import cost, modules, runs

ROOT = modules.ROOT
LABELS = {"int8": "int8 + zlib round trip", "int6": "int6 + zstd round trip"}


def with_run_folder(env: dict) -> dict:
    """RUN_ID and OUTPUT_DIR set here, so the run folder is this repository's runs/<RUN_ID> wherever
    the command was started (the data paths resolve to the repository too)."""
    env = dict(env)
    env.setdefault("RUN_ID", time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6])
    env.setdefault("OUTPUT_DIR", str(ROOT / "runs" / env["RUN_ID"]))
    return env


def resume_hint(study: Path, run: str, overrides: list[str], path: str) -> str:
    args = [study.name[:2], run, *(o for o in overrides if not o.startswith("RESUME_FROM=")), f"RESUME_FROM={path}"]
    return "to continue through this launcher: python train_hnet.py " + " ".join(shlex.quote(a) for a in args)


def run_in_process(study: Path, env: dict, demo: bool, how: tuple[str, list[str]] | None = None) -> int:
    """Train one run here; the demo prints its summary. `how` (run name, overrides) names the run
    for the resume instructions when it stops."""
    trainer = modules.trainer_of(study)
    try:
        hp, warnings = trainer.Hyperparameters.from_env({**os.environ, **env})
        t0 = time.time()
        run, metrics = trainer.run_training(hp, warnings)
    except trainer.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except trainer.TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        checkpoint = str(e).rpartition("RESUME_FROM=")[2]
        if how and "RESUME_FROM=" in str(e):
            print(resume_hint(study, *how, checkpoint), file=sys.stderr)
        return e.exit_code
    except trainer.NonFiniteScore as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        folder = env.get("OUTPUT_DIR", "the run folder")
        print(f"\nstopped: interrupted after training, during export or evaluation. The trained weights are in "
              f"{folder}/checkpoints/ (the last step_*.pt); RESUME_FROM=<it> skips straight to the export.",
              file=sys.stderr)
        if how:
            print(resume_hint(study, *how, f"{folder}/checkpoints/step_NNNNNN.pt"), file=sys.stderr)
        return 130
    if demo:
        print_demo_summary(trainer, run, metrics, time.time() - t0)
    return 4 if metrics["over_cap"] else 0


def print_demo_summary(trainer, run, metrics: dict, seconds: float) -> None:
    """What the first command shows a newcomer: every score labelled with what it scores."""
    import boundaries

    hp = run.hp
    final = metrics["headline_format"]
    params = sum(p.numel() for p in run.model.parameters())
    kind = f"H-Net (outer {hp.outer_layers})" if hp.is_hnet else "GPT"
    print("\n" + "=" * 80)
    print(f"CPU demo done in {seconds:.0f}s: {run.step} of {hp.iterations} steps, {hp.num_layers}x{hp.model_dim} "
          f"{kind}, {params:,} parameters")
    if run.step < hp.iterations:
        print(f"WARNING: the safety limit MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds:g} stopped training at "
              f"step {run.step} of {hp.iterations}: this machine is slower than the ones the README's numbers come "
              "from, and these numbers are not comparable with them (raise the limit to train every step)")
    sliding = f"sliding (stride {hp.eval_stride})" if f"{final}_sliding" in metrics else ""
    scored = metrics["float"]["bytes"]
    print(f"\n{'val_bpb (' + format(scored, ',') + ' validation bytes)':<40}{'non-overlapping':>16}  {sliding}")
    print(f"  {'float weights, before export':<38}{metrics['float']['val_bpb']:>16.4f}")
    for fmt in hp.formats:
        label = LABELS[fmt] + (" (the score)" if fmt == final else "")
        row = f"  {label:<38}{metrics[fmt + '_roundtrip']['val_bpb']:>16.4f}"
        if fmt == final and sliding:
            row += f"  {metrics[final + '_sliding']['val_bpb']:.4f}"
        print(row)
    verdict = "under" if not metrics["over_cap"] else "OVER"
    print(f"\nartifact {metrics['bytes_total']:,} bytes (code {metrics['bytes_code']:,} + model "
          f"{metrics['bytes_total'] - metrics['bytes_code']:,}) of the 16,000,000 cap: {verdict}")
    if hp.is_hnet:  # a plain GPT has no router to report on
        report = boundaries.analyse(trainer, run.model, hp, run.val_tokens, run.rt.device, shifts=0)
        print(f"router: {report['tokens_per_chunk']:.2f} bytes per chunk (target {hp.target_avg_chunk_len:g}); "
              f"boundaries on word starts: precision {report['precision']:.3f}, recall {report['recall']:.3f} "
              f"(one byte before / after word starts: precision {report['precision_shift_minus1']:.3f} / "
              f"{report['precision_shift_plus1']:.3f})")
        print(f"a validation paragraph in its learned chunks:\n{report['example']}")
    print_demo_sample(trainer, run)
    print(f"run folder: {run.run_dir}")


def print_demo_sample(trainer, run, prompt_bytes: int = 60, n_bytes: int = 150) -> None:
    """The artifact's model continues the start of the first validation speech (generate.py)."""
    import boundaries
    import generate

    start = b"".join(boundaries.token_texts(run.hp, run.val_tokens[1:1 + 4 * prompt_bytes]))[:prompt_bytes]
    prompt = start[:start.rfind(b" ") + 1].decode("utf-8", "replace")  # end on a word's last space
    print(f"\nand writing ({n_bytes} bytes after {len(prompt)} of a validation speech; temperature 0.8, top-k 40, "
          f"seed 0; `python eval_bpb.py {run.run_dir}/final_model.{run.hp.formats[-1]}.ptz --sample \"...\"` for more):")
    r = generate.report(trainer, run.model, run.hp, prompt, n_bytes, 0.8, 40, 0, cache=True)
    print(r["text"])


def list_runs() -> None:
    for study in sorted(d for d in modules.STUDIES.iterdir() if (d / "runs.json").is_file()):
        for name, r in modules.load_runs(study).items():
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
    for name, r in modules.load_runs(study).items():
        seeds = r.get("seeds")
        pub = r.get("published") or {}
        what = f"published {pub['val_bpb']:.4f}" if "val_bpb" in pub else "not a published run"
        lines.append(f"# {name}: {r.get('nproc', 1)} process(es), {r.get('hardware', '')}, {what}")
        lines.append(f"python train_hnet.py {study.name[:2]} {name}"
                     + (f" --seeds {','.join(map(str, seeds))}" if seeds else ""))
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in r["env"].items())
        lines.append(f"# = {env} torchrun --standalone --nproc_per_node={r.get('nproc', 1)} "
                     f"studies/{study.name}/train_gpt.py")
    lines += ["```", COMMANDS_END]
    return "\n".join(lines)


def run_seeds(study: Path, run: str, env: dict, nproc: int, seeds: list[int], cmd: list[str]) -> int:
    """Run the same configuration once per seed, one after another; then the per-seed table and
    mean and sample std of the headline BPB, as the studies report them."""
    rows, stamp = [], runs.unique_stamp()
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


def parse_args(argv):
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
    if args.study_opt:  # --study 01 RUN: the positionals shift by one
        args.overrides = [a for a in (args.run,) if a] + args.overrides
        args.study, args.run = args.study_opt, args.study
    args.demo = args.study is None or "=" in args.study
    if args.demo:  # bare call, possibly with overrides: the demo
        args.overrides = [a for a in (args.study, args.run) if a] + args.overrides
        args.study, args.run = "02", "cpu_demo"
    if args.run is None and not (args.list or args.commands):
        p.error("give a run name after the study (see --list)")
    if args.run and "=" in args.run:
        p.error(f"{args.run!r} stands where a run name goes: give the run first, e.g. "
                f"train_hnet.py {args.study} <run> {args.run} (see --list)")
    if args.nproc is not None and args.nproc < 1:
        p.error(f"--nproc {args.nproc}: must be at least 1")
    if args.seed is not None and args.seeds:
        p.error("give --seed or --seeds, not both")
    if args.seed is not None:
        args.overrides.append(f"SEED={args.seed}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        list_runs()
        return 0
    if args.commands:
        print(readme_commands(modules.study_dir(args.commands)))
        return 0
    study = modules.study_dir(args.study)
    env, nproc = modules.run_env(study, args.run, args.overrides)
    nproc = args.nproc or nproc
    spec = modules.load_runs(study)[args.run]  # run_env has checked that it exists
    seeds = parse_seeds(args.seeds, spec.get("seeds")) if args.seeds else None
    trainer = modules.trainer_of(study)
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
        cost.print_estimate(cost.estimate_size(trainer, hp), trainer.SIZE_CAP_BYTES, spec.get("published"))
        cost.print_cost(cost.cost_model(trainer, hp))
        return 0
    runs.ensure_sample_export(env)
    if seeds:
        return run_seeds(study, args.run, env, nproc, seeds, cmd)
    env = with_run_folder(env)
    if nproc == 1:
        return run_in_process(study, env, demo=args.run == "cpu_demo", how=(args.run, args.overrides))
    os.execvpe(cmd[0], cmd, {**os.environ, **env})


if __name__ == "__main__":
    sys.exit(main())
