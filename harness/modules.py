"""Trainers and data scripts are self-contained files, not a package: they are imported by path.
A study is a folder of studies/ with a train_gpt.py and a runs.json naming its runs."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "studies"
# Overrides with these prefixes are for torch, NCCL or the OpenMP runtime, not the trainer: they
# pass through unchecked. Every other KEY must be a field of the trainer's Hyperparameters.
PASSTHROUGH_PREFIXES = ("TORCH_", "TORCHINDUCTOR_", "TORCHDYNAMO_", "PYTORCH_", "NCCL_", "GLOO_", "CUDA_",
                        "NVIDIA_", "OMP_", "MKL_", "KMP_", "TRITON_", "HF_")


def import_file(path: str | Path):
    """Import a repository file by path; the same path always gives the same module object."""
    path = Path(path).resolve()
    name = "trainer_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def study_dir(name: str) -> Path:
    """A study folder by its name or number prefix (02 -> studies/02_...)."""
    folders = sorted(d for d in STUDIES.iterdir() if d.is_dir())
    matches = [d for d in folders if d.name == name or d.name.startswith(name + "_")]
    if len(matches) != 1:
        raise SystemExit(f"error: study {name!r} matches {len(matches)} of: {', '.join(d.name for d in folders)}")
    return matches[0]


def trainer_of(study: Path):
    return import_file(study / "train_gpt.py")


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
    """A named run's environment with KEY=VALUE overrides applied, every key checked against the
    trainer, paths made absolute; and its process count."""
    runs = load_runs(study)
    if run not in runs:
        raise SystemExit(f"error: {study.name}/runs.json has no run {run!r}; runs: {', '.join(runs)}")
    given = {}  # an argument is explicit and wins over the preset and the shell
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.isupper():
            raise SystemExit(f"error: override {item!r} is not KEY=VALUE")
        given[key] = value
    trainer = trainer_of(study)
    check_keys(trainer, runs[run]["env"], f"{study.name}/runs.json run {run}")
    check_keys(trainer, given, "override")
    env = {**runs[run]["env"], **given}
    for key, value in env.items():  # paths in runs.json are relative to the repository root
        if key in ("DATA_PATH", "TOKENIZER_PATH") and value.startswith("./"):
            env[key] = str(ROOT / value)
    # `MODEL_DIM=256 python train_hnet.py 03 cpu` would train the preset's MODEL_DIM: refuse it
    outvoted = sorted(k for k, v in runs[run]["env"].items()
                      if k not in given and os.environ.get(k, env[k]) not in (env[k], v))
    if outvoted:
        shell = " ".join(f"{k}={os.environ[k]}" for k in outvoted)
        raise SystemExit(f"error: {shell} in the shell environment would be replaced by {study.name}/runs.json "
                         f"run {run} ({' '.join(f'{k}={env[k]}' for k in outvoted)}); pass KEY=VALUE as an "
                         f"argument after the run name to change it, or unset it")
    return env, int(runs[run].get("nproc", 1))
