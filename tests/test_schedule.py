"""The training schedule: study 02's variables of ours (LR warmup, micro-steps, forced QAT) are off
in every published preset and off means the published computation; and late QAT switches on late:
never inside the LR warmup, and never from a wall-clock estimate made of a few slow steps."""
import json
import re

import pytest
import torch

from conftest import ROOT, final_state, run_tiny, study02, tiny_hparams

OURS = ("LR_WARMUP_STEPS", "GRAD_ACCUM_STEPS", "QAT_FROM_STEP", "LATE_QAT_MIN_STEPS")


def published_runs() -> dict:
    runs = json.loads((ROOT / "studies" / "02_improved_hnet_byte260_and_sp1024" / "runs.json").read_text())["runs"]
    return {name: r for name, r in runs.items() if r.get("published")}


def test_published_presets_leave_ours_off():
    published = published_runs()
    assert published and not any(k in r["env"] for r in published.values() for k in OURS)
    hp = tiny_hparams(study02())
    assert (hp.grad_accum_steps, hp.lr_warmup_steps, hp.qat_from_step) == (0, 0, 0)


def qat_log(run_dir) -> list[str]:
    return re.findall(r"^(?:late_)?qat: on from step \d+", (run_dir / "train.log").read_text(), re.M)


def test_the_lr_warmup_never_switches_late_qat_on(sample_byte260, tmp_path):
    # The latch once read the LR multiplier, warmup included: with LR_WARMUP_STEPS=4 the first step
    # trains at 1/4, below any threshold, and every warmup run trained on fake int6 from step 2.
    t = study02()
    run, _ = run_tiny(t, sample_byte260, tmp_path / "warm", ITERATIONS="12", WARMDOWN_ITERS="6",
                      LR_WARMUP_STEPS="4", LATE_QAT_THRESHOLD="0.5", GPTQ_CALIB_BATCHES="0", EVAL_SLIDING="0")
    # the warmdown factor (12 - s) / 6 falls below 0.5 at step s = 10 (from 0): on from step 12 (from 1)
    assert qat_log(tmp_path / "warm") == ["late_qat: on from step 12"]
    assert run.qat


def test_without_a_warmup_the_latch_is_the_published_one(sample_byte260, tmp_path):
    t = study02()
    hp = tiny_hparams(t, ITERATIONS="12", WARMDOWN_ITERS="6", LATE_QAT_THRESHOLD="0.5", MAX_WALLCLOCK_SECONDS="0")
    # published: on after the first step whose multiplier is below the threshold
    first = next(s for s in range(12) if t.lr_schedule(hp, s, 0.0).lr < 0.5)
    assert first == 10 and t.qat_due(hp, first + 1, t.lr_schedule(hp, first, 0.0))
    assert not any(t.qat_due(hp, s + 1, t.lr_schedule(hp, s, 0.0)) for s in range(first))


def schedule_of_a_4h_run(t, first_step_ms: float, step_ms: float = 93.0, steps: int = 160_000):
    """(hp, unguarded latch, guarded latch) of the byte260_4h preset, its clock simulated: each latch
    is the index (from 0) of the first step trained on fake int6."""
    env = {k: v for k, v in published_runs()["byte260_4h"]["env"].items() if k not in ("DATA_PATH", "TOKENIZER_PATH")}
    hp, _ = t.Hyperparameters.from_env(env)
    unguarded = guarded = None
    for s in range(steps):
        elapsed = 0.0 if s == 0 else first_step_ms + step_ms * (s - 1)
        sched = t.lr_schedule(hp, s, elapsed)
        if unguarded is None and sched.warmdown < hp.late_qat_threshold:
            unguarded = s + 1
        if guarded is None and t.qat_due(hp, s + 1, sched):
            guarded = s + 1
        if unguarded is not None and guarded is not None:
            break
    return hp, unguarded, guarded


def test_a_slow_first_step_cannot_latch_qat_for_a_whole_4_hour_run():
    # Under the cap the warmdown is WARMDOWN_ITERS x the mean step time. One 30 s first step (a
    # stall, a slow disk) makes that estimate 25,000 x 30 s at step 1, so the published rule would
    # switch fake int6 on after step 1 and keep it for 153,000 steps.
    t = study02()
    hp, unguarded, guarded = schedule_of_a_4h_run(t, first_step_ms=30_000.0)
    assert hp.late_qat_threshold == 0.85 and unguarded == 2  # fake int6 from the third step on
    assert guarded > 100_000  # the estimate has recovered long before step 200; QAT waits for the real warmdown


def test_the_guard_changes_nothing_in_a_run_whose_steps_are_steady():
    t = study02()
    hp, unguarded, guarded = schedule_of_a_4h_run(t, first_step_ms=93.0)
    assert unguarded == guarded and unguarded > 100_000
    # and where the step count ends the run first, the exact rule is never held back
    hp = tiny_hparams(t, ITERATIONS="150", WARMDOWN_ITERS="100", LATE_QAT_THRESHOLD="0.85", MAX_WALLCLOCK_SECONDS="600")
    s = next(s for s in range(150) if t.qat_due(hp, s + 1, t.lr_schedule(hp, s, 1000.0 * s)))
    assert s == 66 and s < hp.late_qat_min_steps  # (150 - 65) / 100 = 0.85 is not below; 66 is


@pytest.mark.parametrize("k", ["1", "3"])
def test_qat_from_step_forces_fake_int6_from_that_step(sample_byte260, tmp_path, k):
    t = study02()
    run, _ = run_tiny(t, sample_byte260, tmp_path / f"q{k}", ITERATIONS="4", QAT_FROM_STEP=k,
                      GPTQ_CALIB_BATCHES="0", EVAL_SLIDING="0", EXPORT_FORMATS="int8")
    assert qat_log(tmp_path / f"q{k}") == [f"qat: on from step {k}"]
    # off (the published run) and on are not the same training
    run_tiny(t, sample_byte260, tmp_path / "off", ITERATIONS="4", GPTQ_CALIB_BATCHES="0", EVAL_SLIDING="0",
             EXPORT_FORMATS="int8")
    a, b = final_state(tmp_path / f"q{k}"), final_state(tmp_path / "off")
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_grad_accum_steps_regroups_the_same_batch(sample_byte260, tmp_path):
    t = study02()
    common = dict(ITERATIONS="2", GPTQ_CALIB_BATCHES="0", EVAL_SLIDING="0", EXPORT_FORMATS="int8")
    run_tiny(t, sample_byte260, tmp_path / "eight", **common)
    run_tiny(t, sample_byte260, tmp_path / "explicit", GRAD_ACCUM_STEPS="8", **common)
    run_tiny(t, sample_byte260, tmp_path / "two", GRAD_ACCUM_STEPS="2", **common)
    a, b, c = (final_state(tmp_path / n) for n in ("eight", "explicit", "two"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # 0 means 8 // WORLD_SIZE
    assert "grad_accum_steps:2" in (tmp_path / "two" / "train.log").read_text()
    assert "grad_accum_steps:8" in (tmp_path / "eight" / "train.log").read_text()
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the grouping is really different


def test_grad_accum_steps_sets_the_micro_batch(sample_byte260):
    # GRAD_ACCUM_STEPS=2: a step is 2 micro-steps of 8 sequences (the published loader: each
    # micro-step takes its own span plus one target token); with the published per-sequence ratio
    # loss, accumulating them gives the gradient of one pass over all 16 (summation order aside).
    t = study02()
    hp = tiny_hparams(t, DATA_PATH=str(sample_byte260), GRAD_ACCUM_STEPS="2")
    rt = t.setup_device(hp)
    assert rt.grad_accum_steps == 2
    stream = t.TokenStream(t.shard_files(hp, "train"), hp.vocab_size).take(2 * 513).long()
    loader = t.DistributedTokenLoader(hp, rt)
    batches = [loader.next_batch() for _ in range(2)]
    for i, (x, y) in enumerate(batches):
        assert torch.equal(x.flatten(), stream[i * 513:i * 513 + 512]) and x.shape == (8, 64)
        assert torch.equal(y.flatten(), stream[i * 513 + 1:i * 513 + 513])
    grads = []
    for groups in (batches, [tuple(torch.cat(z) for z in zip(*batches))]):
        torch.manual_seed(hp.seed)
        model = t.HNet(hp)
        for x, y in groups:
            out = model(x, y)
            ((out.loss.mean() + hp.ratio_loss_weight * out.ratio_loss) / len(groups)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7, msg=n)
