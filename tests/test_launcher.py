"""The launcher: every KEY checked against the trainer, dry runs validate, commands that work
from an unactivated venv, and clear errors for misplaced arguments."""
import json
import re
import shlex
import sys

import pytest

from conftest import ROOT, load_module

launcher = load_module("train_hnet.py")


def launch(capsys, *argv):
    code = launcher.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("override, hint", [
    ("SEQ_LEN=1024", "did you mean TRAIN_SEQ_LEN?"),
    ("LAYERS=10", "did you mean NUM_LAYERS?"),
    ("LR=0.1", "is not a variable"),
])
def test_an_unknown_override_is_an_error_with_a_hint(capsys, override, hint):
    with pytest.raises(SystemExit) as info:
        launcher.main(["02", "byte260_10min", override, "--dry-run"])
    message = str(info.value.code)
    assert f"{override.split('=')[0]} is not a variable" in message and hint in message


def test_the_dry_run_validates_values_before_printing(capsys):
    code, out, err = launch(capsys, "02", "byte260_10min", "SEED=abc", "--dry-run")
    assert code == 2 and "SEED='abc' is not a valid int" in err and out == ""


def test_the_dry_run_prints_a_command_that_runs_without_an_activated_venv(capsys):
    code, out, _ = launch(capsys, "02", "byte260_10min", "SEED=7", "NCCL_DEBUG=INFO", "--nproc", "2", "--dry-run")
    assert code == 0
    words = shlex.split(out.splitlines()[0])  # the command; the size estimate follows it
    assert "SEED=7" in words and "NCCL_DEBUG=INFO" in words  # torch/NCCL variables pass through
    start = words.index(sys.executable)
    assert words[start:start + 5] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      "--nproc_per_node=2"]
    assert words[-1].endswith("studies/02_improved_hnet_byte260_and_sp1024/train_gpt.py")


def test_an_override_in_place_of_the_run_name_and_zero_processes_are_errors(capsys):
    with pytest.raises(SystemExit) as info:
        launcher.main(["02", "SEED=7"])
    assert info.value.code == 2 and "stands where a run name goes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        launcher.main(["02", "byte260_10min", "--nproc", "0", "--dry-run"])
    assert info.value.code == 2 and "--nproc 0: must be at least 1" in capsys.readouterr().err


def test_every_named_run_is_a_valid_configuration():
    for study in sorted((ROOT / "studies").iterdir()):
        if not (study / "runs.json").is_file():
            continue
        trainer = load_module(f"studies/{study.name}/train_gpt.py")
        for name, run in json.loads((study / "runs.json").read_text())["runs"].items():
            launcher.modules.check_keys(trainer, run["env"], name)
            trainer.Hyperparameters.from_env(run["env"])


def test_the_baseline_preset_trains_the_whole_600_seconds():
    t = load_module("studies/02_improved_hnet_byte260_and_sp1024/train_gpt.py")
    env = json.loads((ROOT / "studies/02_improved_hnet_byte260_and_sp1024/runs.json").read_text())
    hp, _ = t.Hyperparameters.from_env(env["runs"]["baseline_gpt_sp1024_10min"]["env"])
    assert t.training_cap_ms(hp) == 600_000 and hp.formats == ["int8"] and not hp.eval_sliding


# The spec's parameter counts of the published configurations.
PUBLISHED_PARAMS = {
    ("01", "byte260_10min"): 17_455_176, ("01", "byte260_4h"): 17_455_176, ("01", "sp1024_10min"): 16_666_696,
    ("02", "byte260_4h"): 22_966_880, ("02", "byte260_10min"): 22_966_880, ("02", "sp1024_4h"): 21_520_472,
    ("02", "sp1024_10min"): 21_520_472, ("02", "baseline_gpt_sp1024_10min"): 17_059_912,
}


def all_runs():
    for study in sorted((ROOT / "studies").iterdir()):
        if (study / "runs.json").is_file():
            for name in json.loads((study / "runs.json").read_text())["runs"]:
                yield study.name, name


@pytest.mark.parametrize("study, run", list(all_runs()))
def test_every_runs_dry_run_prints_the_parameter_count_of_the_model_its_trainer_builds(capsys, study, run):
    import torch

    code, out, _ = launch(capsys, study[:2], run, "--dry-run")
    assert code == 0
    printed = int(re.search(r"^model_params:(\d+)$", out, re.M).group(1))
    trainer = load_module(f"studies/{study}/train_gpt.py")
    env = json.loads((ROOT / "studies" / study / "runs.json").read_text())["runs"][run]["env"]
    hp, _ = trainer.Hyperparameters.from_env(env)
    with torch.device("meta"):
        built = sum(p.numel() for p in trainer.HNet(hp).parameters())
    assert printed == built
    if (study[:2], run) in PUBLISHED_PARAMS:
        assert printed == PUBLISHED_PARAMS[study[:2], run]
    estimate = int(re.search(r"^estimated_artifact_bytes:(\d+) ", out, re.M).group(1))
    published = json.loads((ROOT / "studies" / study / "runs.json").read_text())["runs"][run].get("published") or {}
    if "bytes_total" in published:  # the estimate is labelled one, but must be in the right place
        assert abs(estimate - published["bytes_total"]) < 0.06 * published["bytes_total"]
        assert f"the published artifact was {published['bytes_total']:,} bytes" in out
    assert "ESTIMATE" in out and re.search(r"^float_bytes:%d " % (4 * built), out, re.M)
    spec = json.loads((ROOT / "studies" / study / "runs.json").read_text())["runs"][run]
    if study.startswith("03") and spec["nproc"] == 8:  # our own 8xH100 presets are sized to fit
        assert estimate <= 16_000_000 and "grouped streams" in out


def test_list_shows_every_run_of_both_studies_with_its_published_bpb(capsys):
    code, out, _ = launch(capsys, "--list")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(list(all_runs()))
    assert any(line.startswith("01 byte260_10min") and "published 1.4116 +- 0.013 (3 seeds)" in line for line in lines)
    assert any(line.startswith("01 sp1024_10min") and "published 1.3734" in line for line in lines)
    assert any(line.startswith("02 byte260_4h") and "published 1.2070" in line for line in lines)


def test_study_option_seed_flag_and_published_seeds_in_the_dry_run(capsys):
    code, out, _ = launch(capsys, "--study", "01", "byte260_10min", "--seeds", "--dry-run")
    commands = [line for line in out.splitlines() if "torch.distributed.run" in line]
    assert code == 0 and [re.search(r"SEED=(\d+)", c).group(1) for c in commands] == ["1337", "1234", "2026"]
    assert commands[0].split()[-1].endswith("studies/01_hnet_byte260_vs_sp1024/train_gpt.py")
    code, out, _ = launch(capsys, "01", "byte260_10min", "--seed", "7", "--dry-run")
    assert code == 0 and "SEED=7 " in out
    with pytest.raises(SystemExit, match="expected integers"):
        launcher.main(["01", "byte260_10min", "--seeds", "1,x", "--dry-run"])


def test_a_multi_seed_run_reports_the_mean_and_std_of_its_own_rows(capsys, sample_byte260, tmp_path):
    tiny = ["MODEL_DIM=32", "NUM_HEADS=2", "NUM_KV_HEADS=1", "NUM_LAYERS=4", "OUTER_LAYERS=1", "TRAIN_SEQ_LEN=64",
            "TRAIN_BATCH_TOKENS=1024", "ITERATIONS=3", "MAX_WALLCLOCK_SECONDS=0", "VAL_MAX_TOKENS=2048",
            "KEEP_FLOAT_MAX_NUMEL=256", f"DATA_PATH={sample_byte260}", f"OUTPUT_DIR={tmp_path}"]
    code, out, _ = launch(capsys, "01", "cpu_byte260", *tiny, "--seeds", "3,4")
    assert code == 0
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d\.\d{6})\s+([\d,]+)$", out, re.M)
    assert [r[0] for r in rows] == ["3", "4"]
    subs = [json.loads(next(tmp_path.glob(f"cpu_byte260_seed{s}_*/submission.json")).read_text()) for s in (3, 4)]
    assert [float(r[2]) for r in rows] == [round(s["val_bpb"], 6) for s in subs]
    assert subs[0]["val_bpb"] != subs[1]["val_bpb"]  # the seed reached the trainer
    bpbs = [s["val_bpb"] for s in subs]
    mean, std = sum(bpbs) / 2, abs(bpbs[0] - bpbs[1]) / 2 ** 0.5
    assert f"mean val_bpb {mean:.6f} +- {std:.6f} (sample std over 2 seeds)" in out


def test_a_bare_command_is_the_cpu_demo_and_its_run_folder_is_in_this_repository(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(launcher.runs, "ensure_sample_export", lambda env: calls.append(("export", env)))
    monkeypatch.setattr(launcher, "run_in_process", lambda study, env, demo, how=None: calls.append(
        ("run", study, env, demo, how)) or 0)
    monkeypatch.chdir(tmp_path)  # started from anywhere
    assert launcher.main([]) == 0
    (_, exported), (_, study, env, demo, how) = calls
    expected, _ = launcher.modules.run_env(launcher.modules.study_dir("02"), "cpu_demo", [])
    assert study.name.startswith("02_") and demo is True and how == ("cpu_demo", [])
    assert {k: env[k] for k in expected} == expected == exported
    assert env["OUTPUT_DIR"] == str(ROOT / "runs" / env["RUN_ID"])  # not ./runs of the current folder
    calls.clear()
    assert launcher.main(["SEED=3"]) == 0  # overrides alone: still the demo
    assert calls[1][2]["SEED"] == "3" and calls[1][3] is True


def test_a_stopped_or_interrupted_run_says_how_to_continue_through_the_launcher(monkeypatch, capsys, tmp_path):
    study = ROOT / "studies" / "02_improved_hnet_byte260_and_sp1024"
    t = launcher.modules.trainer_of(study)
    env = {"OUTPUT_DIR": str(tmp_path / "r"), "SEED": "3"}

    def stopped(hp, warnings):
        raise t.TrainingStopped("stopped by signal 2 after step 5; to continue, rerun with the same environment "
                                "plus RESUME_FROM=/x/step_000005.pt", 130)
    monkeypatch.setattr(t, "run_training", stopped)
    assert launcher.run_in_process(study, env, demo=True, how=("cpu_demo", ["SEED=3"])) == 130
    err = capsys.readouterr().err
    assert "to continue through this launcher: python train_hnet.py 02 cpu_demo SEED=3 " \
           "RESUME_FROM=/x/step_000005.pt" in err

    def interrupted(hp, warnings):
        raise KeyboardInterrupt
    monkeypatch.setattr(t, "run_training", interrupted)
    assert launcher.run_in_process(study, env, demo=True, how=("cpu_demo", [])) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted after training" in err
    assert f"{tmp_path / 'r'}/checkpoints/" in err and "python train_hnet.py 02 cpu_demo RESUME_FROM=" in err


@pytest.mark.parametrize("outer", ["0", "1"])
def test_the_demo_summary_finishes_cleanly_for_a_gpt_and_an_hnet(capsys, sample_byte260, tmp_path, outer):
    from conftest import TINY_ENV
    study = ROOT / "studies" / "02_improved_hnet_byte260_and_sp1024"
    env = {**TINY_ENV, "OUTER_LAYERS": outer, "DATA_PATH": str(sample_byte260), "OUTPUT_DIR": str(tmp_path / "demo")}
    assert launcher.run_in_process(study, env, demo=True) == 0
    out = capsys.readouterr().out
    assert "CPU demo done" in out and ("GPT" in out) == (outer == "0")
    assert ("bytes per chunk" in out) == (outer == "1")
    # every score says what it scores: the float model is non-overlapping like the round trips
    assert re.search(r"val_bpb \([\d,]+ validation bytes\) +non-overlapping +sliding \(stride 32\)", out)
    assert re.search(r"float weights, before export +\d\.\d{4}\n", out)
    assert re.search(r"int6 \+ zstd round trip \(the score\) +\d\.\d{4}  \d\.\d{4}\n", out)
    assert "6 of 6 steps" in out and "safety limit" not in out
    # and it ends by writing: the round-tripped model continues the start of a validation speech
    assert "and writing (150 bytes after" in out
    sample = out.split("and writing (")[1].splitlines()[1]
    assert "|" in sample and sample.startswith("[<bos>" if outer == "1" else "<bos>")
    assert f"run folder: {tmp_path / 'demo'}" in out


def test_a_demo_the_safety_limit_cut_short_says_its_numbers_are_not_the_readmes(capsys, sample_byte260, tmp_path):
    from conftest import TINY_ENV
    study = ROOT / "studies" / "02_improved_hnet_byte260_and_sp1024"
    env = {**TINY_ENV, "DATA_PATH": str(sample_byte260), "OUTPUT_DIR": str(tmp_path / "slow"),
           "ITERATIONS": "100000", "MAX_WALLCLOCK_SECONDS": "2", "GPTQ_RESERVE_SECONDS": "0", "TRAIN_LOG_EVERY": "0"}
    assert launcher.run_in_process(study, env, demo=True) == 0
    out = capsys.readouterr().out
    steps = int(re.search(r"done in \d+s: (\d+) of 100000 steps", out).group(1))
    assert f"WARNING: the safety limit MAX_WALLCLOCK_SECONDS=2 stopped training at step {steps} of 100000" in out


def test_a_shell_variable_the_preset_would_replace_is_an_error_not_a_silent_1m_model(capsys, monkeypatch):
    monkeypatch.setenv("MODEL_DIM", "256")  # the cpu preset sets MODEL_DIM=128
    with pytest.raises(SystemExit) as info:
        launcher.main(["03", "cpu", "--dry-run"])
    message = str(info.value.code)
    assert "MODEL_DIM=256 in the shell environment" in message and "cpu (MODEL_DIM=128)" in message
    code, out, err = launch(capsys, "03", "cpu", "MODEL_DIM=256", "--dry-run")  # as an argument it applies
    assert code == 0 and "MODEL_DIM=256" in out
    monkeypatch.setenv("MODEL_DIM", "128")  # the preset's own value is no conflict
    assert launch(capsys, "03", "cpu", "--dry-run")[0] == 0
