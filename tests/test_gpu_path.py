"""The CUDA code path, run on CPU as far as torch allows: bf16 autocast end to end (training,
Hessians, GPTQ, export, both evaluations), torch.compile with fullgraph and no recompiles, and
the host-sync budget of the training loop."""
import math
import re

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import run_tiny, study02, tiny_hparams


@pytest.fixture(scope="module", params=["02", "03"])
def precision_runs(request, sample_byte260, tmp_path_factory):
    """The same tiny run in fp32 and under CPU bf16 autocast, with the Hessians GPTQ was given; for
    study 02 and for study 03 with every addition on."""
    from conftest import STUDY03_ON, study

    t = study(request.param)
    extra = STUDY03_ON if request.param == "03" else {}
    out, captured = {}, {}
    real = t.collect_hessians
    try:
        for mode in ("off", "bf16"):
            t.collect_hessians = lambda run, mode=mode: captured.setdefault(mode, real(run))
            run, metrics = run_tiny(t, sample_byte260, tmp_path_factory.mktemp(mode) / "run", AUTOCAST=mode,
                                    ITERATIONS="12", WARMDOWN_ITERS="4", MATRIX_LR="0.05", **extra)
            out[mode] = (run, metrics)
    finally:
        t.collect_hessians = real
    return out, captured


def test_bf16_autocast_runs_train_gptq_export_and_both_evaluations(precision_runs):
    runs, _ = precision_runs
    run, metrics = runs["bf16"]
    assert run.rt.autocast_dtype == torch.bfloat16 and runs["off"][0].rt.autocast_dtype is None
    log = (run.run_dir / "train.log").read_text()
    assert "autocast:torch.bfloat16" in log
    for line in ("final_int8_zlib_roundtrip_exact", "final_int6_zstd_roundtrip_exact", "final_int6_zstd_sliding_exact"):
        assert re.search(line + r" val_loss:\S+ val_bpb:\S+", log), line
    fp32 = runs["off"][1]["int6_roundtrip"]["val_bpb"]
    bf16 = metrics["int6_roundtrip"]["val_bpb"]
    assert math.isfinite(bf16) and math.isfinite(metrics["int6_sliding"]["val_bpb"])
    # 12 steps from the same init and data: bf16 rounding moves the result, but only a little
    assert abs(bf16 - fp32) < 0.03 * fp32, (bf16, fp32)
    assert "gptq: hessians for" in log and "WARNING: gptq" not in log.split("=" * 100)[-1]


def test_hessians_under_bf16_autocast_are_fp32_and_positive_definite(precision_runs):
    _, captured = precision_runs
    t = study02()
    hessians = captured["bf16"]
    assert len(hessians) >= 4
    for name, h in hessians.items():
        assert h.dtype == torch.float32, name
        assert torch.allclose(h, h.T), name
        damped = h + 0.01 * torch.diag(h).mean() * torch.eye(h.size(0))
        assert torch.linalg.cholesky_ex(damped).info == 0, name
    # and the hook itself: a matmul under bf16 autocast would come back bf16
    sums, counts = {}, {}
    hook = t.hessian_hook(sums, counts, "k", "cpu")
    x = torch.randn(4, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hook(None, (x.bfloat16(),), None)
    assert sums["k"].dtype == torch.float32 and counts["k"] == 32
    xf = x.bfloat16().float().flatten(0, 1)
    assert torch.allclose(sums["k"], xf.T @ xf, atol=1e-4)


def compiled_tiny(t, **overrides):
    """(hp, model, its fullgraph aot_eager compile, a graph counter, a batch) at the tiny size."""
    hp = tiny_hparams(t, **overrides)
    torch.manual_seed(0)
    model = t.HNet(hp)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    return hp, model, compiled, counter, torch.randint(4, 260, (2, hp.train_seq_len))


@pytest.mark.parametrize("name", ["02", "03"])
def test_compiled_hnet_is_one_graph_for_training_one_for_eval_and_none_for_late_qat(name):
    from conftest import STUDY03_ON, study

    t = study(name)
    hp, model, compiled, counter, x = compiled_tiny(t, **(STUDY03_ON if name == "03" else {}))
    for qat in (False, False, True, True):
        if qat:
            t.refresh_qat(model, True, True)  # late QAT switches on: new buffer values, same graph
        out = compiled(x, x)
        (out.loss.mean() + 0.1 * out.ratio_loss).backward()
    assert counter.frame_count == 1
    model.eval()
    with torch.no_grad():
        eager = model(x, x).loss
        for _ in range(2):
            compiled_loss = compiled(x, x).loss
    assert counter.frame_count == 2
    assert torch.allclose(compiled_loss, eager, atol=1e-5)
    torch._dynamo.reset()


def test_the_trainer_compiled_end_to_end_without_recompiles(sample_byte260, tmp_path, monkeypatch):
    """COMPILE_MODEL=1 through the real loop: priming, training with late QAT, validation with a
    padded last batch, export and sliding eval. A recompile past the two graphs fails the run."""
    t = study02()
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    _, metrics = run_tiny(t, sample_byte260, tmp_path / "c", COMPILE_MODEL="1", COMPILE_BACKEND="aot_eager",
                          WARMUP_STEPS="1", ITERATIONS="4", LATE_QAT_THRESHOLD="0.9", VAL_MAX_TOKENS="3000",
                          EVAL_BATCH_SEQS="4")
    assert math.isfinite(metrics["int6_sliding"]["val_bpb"])
    assert "late_qat: on" in (tmp_path / "c" / "train.log").read_text()
    torch._dynamo.reset()


def test_training_loop_makes_one_host_transfer_per_optimizer_step(sample_byte260, tmp_path, monkeypatch):
    """Count every way a tensor reaches the host (.item, .tolist, .cpu, .numpy, bool/float/int
    of a tensor) inside train(), validation and checkpoint writing excluded."""
    t = study02()
    state = {"on": False, "count": 0}

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if state["on"]:
                state["count"] += 1
            return real(self, *a, **k)
        return wrapper
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))

    def paused(fn):
        def wrapper(*a, **k):
            on, state["on"] = state["on"], False
            try:
                return fn(*a, **k)
            finally:
                state["on"] = on
        return wrapper

    def counted(fn):
        def wrapper(*a, **k):
            state["on"] = True
            try:
                return fn(*a, **k)
            finally:
                state["on"] = False
        return wrapper
    monkeypatch.setattr(t, "evaluate_bpb", paused(t.evaluate_bpb))
    monkeypatch.setattr(t, "save_checkpoint", paused(t.save_checkpoint))
    monkeypatch.setattr(t, "train", counted(t.train))
    steps = 6
    run_tiny(t, sample_byte260, tmp_path / "s", ITERATIONS=str(steps), LATE_QAT_THRESHOLD="0.9", EMA_DECAY="0.9",
             TRAIN_LOG_EVERY="1")
    assert 0 < state["count"] <= steps, state["count"]
