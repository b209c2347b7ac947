"""What a run will cost before it runs (harness/cost.py, train_hnet.py --dry-run): FLOPs against a
hand count, the step-time prediction against the published step times it was fitted on."""
import re

import pytest

from conftest import load_module, study01, study02, tiny_hparams

cost = load_module("harness/cost.py")
launcher = load_module("train_hnet.py")
PER_BLOCK = 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 32 * 64 + 64 * 32)  # q k v proj fc proj, d=32, kv 16


def test_flops_of_a_tiny_hnet_equal_a_hand_count():
    t = study02()
    hp = tiny_hparams(t)  # d 32, 2 heads of 16, 1 KV head, MLP 2; 1 + 2 + 1 blocks; L 64, cap 64 // 4 = 16
    parts = cost.flops_per_sequence(t, hp)
    outer_per_byte = 2 * PER_BLOCK + 2 * (2 * 32 * 32) + 2 * 32 * 32  # encoder + decoder, router q/k, residual
    assert parts["outer"] == outer_per_byte * 64
    assert parts["main"] == 2 * PER_BLOCK * 16  # the main stage at the chunk cap, not at the bytes
    assert parts["attention"] == 2 * (2 * 32 * 64 * 64) + 2 * (2 * 32 * 16 * 16)  # causal: 2 x L x d_q a position
    assert parts["head"] == 2 * 260 * 32 * 64
    c = cost.cost_model(t, hp)
    assert c["flops_per_byte"] == pytest.approx(3 * sum(parts.values()) / 64)  # forward + backward
    assert c["bytes_per_step"] == 1024


def test_flops_of_a_gpt_and_of_study_01s_dynamic_chunks():
    t = study02()
    parts = cost.flops_per_sequence(t, tiny_hparams(t, OUTER_LAYERS="0"))
    assert parts == {"main": 4 * PER_BLOCK * 64, "outer": 0.0, "attention": 4 * 2 * 32 * 64 * 64,
                     "head": 2 * 260 * 32 * 64}
    t1 = study01()
    hp = tiny_hparams(t1)  # no fixed cap: the main stage at L / TARGET_AVG_CHUNK_LEN (4) positions
    assert cost.flops_per_sequence(t1, hp)["main"] == 2 * PER_BLOCK * 16


def test_the_prediction_reproduces_its_calibration_runs_and_says_what_it_is(capsys):
    for study, run, ms in (("02", "byte260_4h", 93.0), ("02", "baseline_gpt_sp1024_10min", 43.5)):
        assert launcher.main([study, run, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert f"predicted_ms_per_step:{ms:.1f} on 8xH100" in out and "PREDICTION" in out
        assert re.search(r"flops_per_byte:\d+\.\d M forward \+ backward", out)
        assert re.search(r"memory_per_gpu:\d+\.\d GiB estimated", out)
    # study 02's 10-minute run: 5,957 published steps; the prediction fitted on the 4-hour one
    assert launcher.main(["02", "byte260_10min", "--dry-run"]) == 0
    steps = int(re.search(r"predicted_steps:([\d,]+)", capsys.readouterr().out).group(1).replace(",", ""))
    assert abs(steps - 5957) / 5957 < 0.01
