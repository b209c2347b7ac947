"""bench/gpu_check.py, the one command for a GPU session, kept from rotting while no GPU is at hand:
--cpu-smoke runs every section's code at a tiny size on CPU."""
import json

from conftest import load_module

gpu_check = load_module("bench/gpu_check.py")


def test_the_cpu_smoke_runs_every_section_and_reports_each_check(tmp_path, capsys):
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["failed"] and list(report["results"]) == list(gpu_check.SECTIONS)
    checks = {row["check"]: row for r in report["results"].values() for row in r["rows"]}
    for study in ("01", "02"):
        assert checks[f"{study}: published parameter count"]["ok"] is True
        assert checks[f"{study}: causality (bytes after t changed, logits up to t)"]["ok"] is True
        assert checks[f"{study}: bf16 forward and backward finite"]["ok"] is True
    assert checks["02: no recompile when late QAT switches on"]["ok"] is True
    assert checks["trainer's sliding score vs eval_bpb's"]["ok"] is True
    assert sum("ms a step" in c for c in checks) == 4  # study 02, study 01, the baseline GPT and study 03 (its preset)
    text = (tmp_path / "report.md").read_text()
    assert text.endswith("result: every check passed\n") and "## end_to_end" in text


def test_a_failing_section_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    def broken(args, out):
        out.add("half done", "1", True)
        raise RuntimeError("no kernel image is available")
    monkeypatch.setattr(gpu_check, "speed", broken)
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path), "--sections", "speed,correctness"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert "no kernel image is available" in report["results"]["speed"]["error"]
    assert report["results"]["correctness"]["rows"] and not report["results"]["correctness"]["error"]
    assert "FAILED" in (tmp_path / "report.md").read_text()


def test_a_missing_package_is_named_before_any_device_work(tmp_path, monkeypatch, capsys):
    real = gpu_check.importlib.import_module
    monkeypatch.setattr(gpu_check.importlib, "import_module",
                        lambda name: (_ for _ in ()).throw(ImportError(name)) if name == "zstandard" else real(name))
    monkeypatch.setattr(gpu_check, "correctness", lambda args, out: (_ for _ in ()).throw(AssertionError("ran")))
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "missing Python packages: zstandard" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()
