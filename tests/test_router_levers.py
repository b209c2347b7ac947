"""Study 02's router levers for small runs (issue 9): each is off in the published presets, and off
means the published computation exactly; on, each does what its name says."""
import json
import re

import torch

from conftest import ROOT, final_state, run_tiny, study02, tiny_hparams

LEVERS = ("RATIO_TARGET_START", "RATIO_TARGET_STEPS", "OUTER_LR_MULT", "GRAD_ACCUM_STEPS", "LR_WARMUP_STEPS")


def train_losses(run_dir):
    return re.findall(r"train_loss:(\S+) ratio_loss:(\S+)", (run_dir / "train.log").read_text())


def test_published_presets_leave_every_lever_off():
    runs = json.loads((ROOT / "studies" / "02_improved_hnet_byte260_and_sp1024" / "runs.json").read_text())["runs"]
    published = {name: r for name, r in runs.items() if r.get("published")}
    assert published and not any(k in r["env"] for r in published.values() for k in LEVERS)
    hp = tiny_hparams(study02())
    assert (hp.ratio_target_steps, hp.outer_lr_mult, hp.grad_accum_steps, hp.lr_warmup_steps) == (0, 1.0, 0, 0)


def test_ratio_target_schedule_by_hand(sample_byte260, tmp_path):
    t = study02()
    hp = tiny_hparams(t, TARGET_AVG_CHUNK_LEN="6", RATIO_TARGET_START="2", RATIO_TARGET_STEPS="8")
    # N(s) = 2 + (6 - 2) * s / 8 up to step 8, then 6
    assert [t.ratio_target(hp, s) for s in (0, 2, 4, 7, 8, 100)] == [2.0, 3.0, 4.0, 5.5, 6.0, 6.0]
    assert t.ratio_target(tiny_hparams(t, TARGET_AVG_CHUNK_LEN="6"), 0) == 6.0  # off: N from the start

    run, _ = run_tiny(t, sample_byte260, tmp_path / "ramp", ITERATIONS="3", GPTQ_CALIB_BATCHES="0",
                      EVAL_SLIDING="0", RATIO_TARGET_START="2", RATIO_TARGET_STEPS="8")
    # TINY N is 4: the third and last step (s = 2) trained against 2 + (4 - 2) * 2 / 8 = 2.5
    assert run.model.ratio_target.item() == t.ratio_target(run.hp, 2) == 2.5
    # never in evaluation: the score ignores the ratio target, and the artifact does not carry it
    assert "ratio_target" not in final_state(tmp_path / "ramp")
    scores = []
    for n in (2.0, 4.0):
        run.model.ratio_target.fill_(n)
        scores.append(t.evaluate_bpb(run.model, run.rt, run.hp, run.val_tokens, run.luts))
    assert scores[0] == scores[1]


def test_ratio_target_at_n_is_the_fixed_target_exactly(sample_byte260, tmp_path):
    # the schedule's tensor path with START = N trains exactly as the published float path
    t = study02()
    common = dict(ITERATIONS="3", GPTQ_CALIB_BATCHES="0", EVAL_SLIDING="0", EXPORT_FORMATS="int8")
    run_tiny(t, sample_byte260, tmp_path / "fixed", **common)
    run_tiny(t, sample_byte260, tmp_path / "ramp", RATIO_TARGET_START="4", RATIO_TARGET_STEPS="2", **common)
    run_tiny(t, sample_byte260, tmp_path / "low", RATIO_TARGET_START="2", RATIO_TARGET_STEPS="2", **common)
    a, b = final_state(tmp_path / "fixed"), final_state(tmp_path / "ramp")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path / "fixed") == train_losses(tmp_path / "ramp")
    assert train_losses(tmp_path / "fixed")[0][1] != train_losses(tmp_path / "low")[0][1]  # it does bite


def test_outer_lr_mult_scales_only_the_outer_matrices(sample_byte260, tmp_path):
    t = study02()
    common = dict(ITERATIONS="1", GPTQ_CALIB_BATCHES="0", EVAL_SLIDING="0", EXPORT_FORMATS="int8")
    run_tiny(t, sample_byte260, tmp_path / "one", **common)
    run_tiny(t, sample_byte260, tmp_path / "two", OUTER_LR_MULT="2", **common)
    hp = tiny_hparams(t)
    torch.manual_seed(hp.seed)
    init = t.HNet(hp).state_dict()
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    matrices = {n for n, m in t.HNet(hp).named_modules() if isinstance(m, t.CastedLinear)}
    outer = [n + ".weight" for n in matrices if not n.startswith("main.")]
    assert outer and any(n.startswith("routing.") for n in outer)
    assert sum((one[k] - init[k]).abs().sum().item() > 0 for k in outer) >= 4  # (zero-init projections stay put)
    for k in init:
        if k in outer:  # one step from the same gradient: Muon's update is linear in its LR
            torch.testing.assert_close(two[k] - init[k], 2 * (one[k] - init[k]), rtol=1e-4, atol=1e-6)
        else:  # the main stage, the embedding and every Adam vector: untouched by the multiplier
            assert torch.equal(one[k], two[k]), k


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
