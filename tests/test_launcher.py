"""The launcher: every KEY checked against the trainer, dry runs validate, commands that work
from an unactivated venv, and clear errors for misplaced arguments."""
import json
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
    words = shlex.split(out)
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
            launcher.check_keys(trainer, run["env"], name)
            trainer.Hyperparameters.from_env(run["env"])


def test_the_baseline_preset_trains_the_whole_600_seconds():
    t = load_module("studies/02_improved_hnet_byte260_and_sp1024/train_gpt.py")
    env = json.loads((ROOT / "studies/02_improved_hnet_byte260_and_sp1024/runs.json").read_text())
    hp, _ = t.Hyperparameters.from_env(env["runs"]["baseline_gpt_sp1024_10min"]["env"])
    assert t.training_cap_ms(hp) == 600_000 and hp.formats == ["int8"] and not hp.eval_sliding
