"""Two gloo processes under torchrun train to the same weights as one process with accumulation."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import eval_bpb
from conftest import ROOT, STUDY03_ON, TINY_ENV, run_tiny, study, study01, study02

TRAINER = ROOT / "studies" / "02_improved_hnet_byte260_and_sp1024" / "train_gpt.py"
TRAINERS = {"02": TRAINER, "03": ROOT / "studies" / "03_byte_hnet_vs_byte_gpt" / "train_gpt.py"}
EXTRA = {"02": {}, "03": STUDY03_ON}  # study 03 with every addition on


@pytest.mark.parametrize("name", ["02", "03"])
def test_two_processes_equal_one_process_with_accumulation(name, sample_byte260, tmp_path):
    t, extra = study(name), EXTRA[name]
    run_tiny(t, sample_byte260, tmp_path / "one", ITERATIONS="3", GPTQ_CALIB_BATCHES="0", EVAL_SLIDING="0", **extra)
    env = {**os.environ, **TINY_ENV, **extra, "DATA_PATH": str(sample_byte260), "OUTPUT_DIR": str(tmp_path / "two"),
           "ITERATIONS": "3", "GPTQ_CALIB_BATCHES": "0", "EVAL_SLIDING": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(TRAINERS[name])], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size:2 grad_accum_steps:4" in proc.stdout
    one = torch.load(tmp_path / "one" / "final_model.pt", map_location="cpu")
    two = torch.load(tmp_path / "two" / "final_model.pt", map_location="cpu")
    # Same batches, fp32 sums in another order (two ranks' means vs eight accumulated micro-steps).
    # Muon's matrices agree to 1e-5 after three steps. Adam's vectors get 1e-3: in the first steps
    # some of their gradients are near zero (zero-init projections) and Adam divides each by its own
    # RMS, which magnifies summation-order noise; so do Adam's tables (the embedding and study 03's
    # bigram table; seen at 4e-5). A wrong batch split or a missing average is ~1e-2.
    adam_tables = ("tok_emb.weight", "bigram.table.weight")
    for k in one:
        if one[k].numel():
            tol = 1e-5 if k.endswith(".weight") and one[k].ndim == 2 and k not in adam_tables else 1e-3
            assert (one[k] - two[k]).abs().max().item() < tol, k
    losses = lambda d: re.findall(r"train_loss:(\S+)", (d / "train.log").read_text())
    assert losses(tmp_path / "one") == losses(tmp_path / "two")
    torch.manual_seed(1337)
    init = t.HNet(t.Hyperparameters.from_env({**TINY_ENV, **extra})[0]).state_dict()
    moved = max((one[k] - init[k]).abs().max().item() for k in one if one[k].numel())
    assert moved > 1e-3  # the steps did move the weights
    # and the artifact each wrote holds the same int6 codes
    a, b = (int6_codes(tmp_path / d / "final_model.int6.ptz", t) for d in ("one", "two"))
    assert a.keys() == b.keys() and len(a) >= 4
    same = sum(int((a[k]["q"] == b[k]["q"]).sum()) for k in a)
    total = sum(a[k]["q"].numel() for k in a)
    assert same / total > 0.999, f"{total - same} of {total} int6 codes differ"


def test_eval_bpb_under_torchrun_matches_one_process(sample_byte260, tmp_path):
    t = study02()
    _, metrics = run_tiny(t, sample_byte260, tmp_path / "run", ITERATIONS="2", GPTQ_CALIB_BATCHES="0")
    artifact = tmp_path / "run" / "final_model.int6.ptz"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "eval_bpb.py"), str(artifact), "--json", str(tmp_path / "two.json"),
                           "--no-boundaries"], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    # the windows are split across ranks and the float64 sums all-reduced: same targets, same bytes
    assert two["roundtrip"]["tokens"] == metrics["int6_roundtrip"]["tokens"]
    assert two["roundtrip"]["bytes"] == metrics["int6_roundtrip"]["bytes"]
    assert abs(two["roundtrip"]["val_bpb"] - metrics["int6_roundtrip"]["val_bpb"]) < 1e-9
    assert abs(two["sliding"]["val_bpb"] - metrics["int6_sliding"]["val_bpb"]) < 1e-9


def _record_teardown(monkeypatch, dist_module) -> list:
    calls = []
    monkeypatch.setattr(dist_module, "is_initialized", lambda: True)
    monkeypatch.setattr(dist_module, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist_module, "destroy_process_group", lambda: calls.append("destroy"))
    return calls


@pytest.mark.parametrize("study", ["01", "02"])
def test_ranks_meet_before_the_process_group_goes(study, monkeypatch):
    # Without the barrier a rank that finished first tore its gloo pairs down while rank 0 was still
    # writing: 4 of 20 two-process runs ended in SIGABRT ("terminate called without an active
    # exception") after a correct score; with it, 0 of 60.
    t = study01() if study == "01" else study02()
    calls = _record_teardown(monkeypatch, t.dist)
    monkeypatch.setattr(t.Hyperparameters, "from_env", classmethod(lambda cls, env=None: (None, [])))
    monkeypatch.setattr(t, "run_training", lambda hp, warnings: (None, {"over_cap": False}))
    assert t.main() == 0 and calls == ["barrier", "destroy"]
    calls.clear()

    def fails(hp, warnings):  # an error on one rank: the others may never arrive, so no barrier
        raise t.ConfigError("DATA_PATH=x: no shards")
    monkeypatch.setattr(t, "run_training", fails)
    assert t.main() == 2 and calls == ["destroy"]


def test_eval_bpb_ranks_meet_before_the_process_group_goes(monkeypatch, tmp_path):
    import torch.distributed as dist

    calls = _record_teardown(monkeypatch, dist)
    monkeypatch.setenv("RANK", "1")  # a non-zero rank prints nothing
    monkeypatch.setattr(eval_bpb, "evaluate", lambda args: ({}, 0))
    assert eval_bpb.main([str(tmp_path / "a.ptz")]) == 0 and calls == ["barrier", "destroy"]
    calls.clear()

    def fails(args):
        raise eval_bpb.EvalError("corrupt artifact", 3)
    monkeypatch.setattr(eval_bpb, "evaluate", fails)
    assert eval_bpb.main([str(tmp_path / "a.ptz")]) == 3 and calls == ["destroy"]


def torchrun(script, env: dict, *args, nproc: int = 2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(script), *map(str, args)], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def int6_codes(path, t=None) -> dict:
    t = t or study02()
    return {k: v for k, v in t.read_artifact(path)["tensors"].items() if v.get("bits") == 6}


def test_the_end_of_a_run_on_two_processes_gptq_export_and_both_evaluations(sample_byte260, tmp_path):
    # Where a finished 8-GPU run can still fail: rank-0 calibration while the others wait, the
    # all-ranks Hessian all-reduce, the int6 export and the sliding evaluation split across ranks.
    # Both processes export from the one-process run's final checkpoint, so the float weights are
    # identical and only the calibration and evaluation code differs by world size.
    t = study02()
    common = {"ITERATIONS": "3", "GPTQ_CALIB_BATCHES": "5", "EVAL_SLIDING": "1"}
    run_tiny(t, sample_byte260, tmp_path / "one", GPTQ_CALIB_ALL_RANKS="1", **common)
    checkpoint = tmp_path / "one" / "checkpoints" / "step_000003.pt"
    one = json.loads((tmp_path / "one" / "submission.json").read_text())
    base = {**TINY_ENV, **common, "DATA_PATH": str(sample_byte260), "RESUME_FROM": str(checkpoint)}
    for mode in ("1", "0"):
        out = tmp_path / f"two_{mode}"
        proc = torchrun(TRAINER, {**base, "GPTQ_CALIB_ALL_RANKS": mode, "OUTPUT_DIR": str(out)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = (out / "train.log").read_text()
        assert "world_size:2 grad_accum_steps:4" in log and "gptq: hessians for" in log
        for line in ("final_int6_zstd_roundtrip_exact", "final_int6_zstd_sliding_exact"):
            assert re.search(line + r" val_loss:\S+ val_bpb:\S+", log), (mode, line)
        two = json.loads((out / "submission.json").read_text())
        # the artifact two ranks wrote scores the same read back by one process
        eval_json = tmp_path / f"eval_{mode}.json"
        assert eval_bpb.main([str(out / "final_model.int6.ptz"), "--json", str(eval_json), "--no-boundaries"]) == 0
        scored = json.loads(eval_json.read_text())
        assert abs(scored["sliding"]["val_bpb"] - two["val_bpb"]) < 1e-9
        assert abs(scored["roundtrip"]["val_bpb"] - two["int6_roundtrip_val_bpb"]) < 1e-9
        if mode == "1":  # all ranks: the micro-batches one process reads, so the same Hessians and artifact
            a, b = int6_codes(tmp_path / "one" / "final_model.int6.ptz"), int6_codes(out / "final_model.int6.ptz")
            assert a.keys() == b.keys() and len(a) >= 4
            same = sum(int((a[k]["q"] == b[k]["q"]).sum()) for k in a)
            total = sum(a[k]["q"].numel() for k in a)
            assert same / total > 0.9999, f"{total - same} of {total} int6 codes differ"
            assert all(torch.allclose(a[k]["scale"].float(), b[k]["scale"].float()) for k in a)
            assert abs(two["val_bpb"] - one["val_bpb"]) < 1e-5
            assert abs(two["int6_roundtrip_val_bpb"] - one["int6_roundtrip_val_bpb"]) < 1e-5


def test_all_ranks_calibration_reads_what_one_process_reads(sample_byte260, monkeypatch):
    # the share-out itself, without processes: rank r of W takes every W-th micro-batch of the K
    t = study02()
    hp = t.Hyperparameters.from_env({**TINY_ENV, "DATA_PATH": str(sample_byte260), "GPTQ_CALIB_BATCHES": "5",
                                     "GPTQ_CALIB_ALL_RANKS": "1"})[0]
    seen = {}
    for world, ranks in ((1, [0]), (2, [0, 1]), (4, [0, 1, 2, 3])):
        for rank in ranks:
            rt = t.Runtime(torch.device("cpu"), rank=rank, world_size=world, grad_accum_steps=8 // world)
            model = t.HNet(hp)
            batches = []
            model.register_forward_pre_hook(lambda m, a: batches.append(a[0].clone()))
            run = t.Run(hp, rt, lambda *a, **k: None, ROOT, model, model, [], t.DistributedTokenLoader(hp, rt),
                        torch.zeros(0), None, {})
            monkeypatch.setattr(t.dist, "all_reduce", lambda *a, **k: None)
            t.collect_hessians(run)
            seen.setdefault(world, []).extend(batches)
    one = torch.cat(seen[1])
    for world in (2, 4):  # the same 5 micro-batches of 8 sequences, none twice, none left out
        many = torch.cat(seen[world])
        assert many.shape == one.shape
        assert sorted(map(tuple, many.tolist())) == sorted(map(tuple, one.tolist())), world
