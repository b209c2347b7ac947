"""The READMEs: every relative link is a file git tracks (a .gitignore pattern once hid the logs
they cite), and the two set-up commands are the ones CI runs."""
import re
import subprocess

import pytest

from conftest import ROOT, load_module

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked_files() -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return set(out.splitlines())


def test_every_relative_link_in_the_readmes_is_a_tracked_file():
    tracked = tracked_files()
    readmes = [ROOT / "README.md", *sorted((ROOT / "studies").glob("*/README.md"))]
    checked = 0
    for readme in readmes:
        for target in LINK.findall(readme.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (readme.parent / target).resolve().relative_to(ROOT).as_posix()
            assert path in tracked or any(t.startswith(path + "/") for t in tracked), f"{readme.name} -> {target}"
            checked += 1
    assert checked > 0


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"^(pip install -r requirements\.txt && python .*?)\s+#", readme, re.M)
    assert len(commands) == 2 and "train_hnet.py" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_each_study_readme_has_the_commands_its_runs_json_produces():
    launcher = load_module("train_hnet.py")
    studies = sorted(d for d in (ROOT / "studies").iterdir() if (d / "runs.json").is_file())
    assert [d.name[:2] for d in studies] == ["01", "02"]
    for study in studies:
        readme = (study / "README.md").read_text(encoding="utf-8")
        block = launcher.readme_commands(study)
        assert readme.count(launcher.COMMANDS_BEGIN) == 1, f"{study.name}/README.md has no commands block"
        start = readme.index(launcher.COMMANDS_BEGIN)
        end = readme.index(launcher.COMMANDS_END, start) + len(launcher.COMMANDS_END)
        assert readme[start:end] == block, f"{study.name}/README.md: run `python train_hnet.py --commands {study.name[:2]}`"
