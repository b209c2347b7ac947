"""Study 01's trainer: the published recipe (dynamic chunk count, int8 + zlib, non-overlapping
evaluation) and the guards it shares with study 02 (its causality
and parameter-count tests are in test_model.py, beside study 02's)."""
import json
import re

import pytest
import torch

import eval_bpb
from conftest import run_tiny, study01, study02, tiny_hparams, write_shard
from test_model import trained_like


def test_defaults_are_the_published_byte260_recipe():
    hp, _ = study01().Hyperparameters.from_env({})
    assert (hp.num_layers, hp.outer_layers, hp.train_seq_len) == (9, 2, 1024)
    assert (hp.target_avg_chunk_len, hp.ratio_loss_weight, hp.ratio_loss_per_seq, hp.quant_scale_floor) == (9, 0.05, 1, 1)
    assert hp.formats == ["int8"]


@pytest.mark.parametrize("name", ["EVAL_STRIDE", "GPTQ_CALIB_BATCHES", "LATE_QAT_THRESHOLD", "CHUNK_DIVISOR"])
def test_study_02_variables_are_errors_here(name):
    t = study01()
    with pytest.raises(t.ConfigError, match=f"unknown variable {name}"):
        t.Hyperparameters.from_env({name: "1"})


def test_the_chunk_count_is_the_batchs_largest_boundary_count():
    t = study01()
    model = trained_like(t.HNet(tiny_hparams(t, TRAIN_SEQ_LEN="64")))
    seen = []
    model.main.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[1]))
    g = torch.Generator().manual_seed(5)
    expected = []
    with torch.no_grad():
        for _ in range(4):
            x = torch.randint(4, 260, (3, 64), generator=g)
            # rows with different amounts of repetition, so rows and batches differ in boundary counts
            x[0, 16:] = x[0, 15]
            mask = model.hidden_states(x)[2]
            expected.append(int(mask.sum(1).max()))
            model(x, x)
    assert seen[1::2] == expected  # hidden_states then forward: every other hook call is the forward
    assert len(set(expected)) > 1, "the batches must differ in boundary counts for this to mean anything"
    assert all(c < 64 for c in expected)


def test_per_sequence_ratio_loss_equals_a_hand_computation():
    """Rows with different boundary rates: the published per-sequence loss averages each row's own
    loss, which differs from the loss of the batch's pooled F and G."""
    t = study01()
    n = 4.0
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [0, 4]] = True  # F = 2/8
    mask[1, [0, 1, 2, 3, 5, 7]] = True  # F = 6/8
    p = torch.tensor([[1.0, .1, .2, .3, .9, .1, .2, .3], [1.0, .8, .7, .6, .4, .9, .2, .6]])
    router = t.RoutingModuleOutput(p, mask, torch.where(mask, p, 1 - p))

    def hand(f, g):
        return n / (n - 1) * ((n - 1) * f * g + (1 - f) * (1 - g))
    g0, g1 = p[0].mean().item(), p[1].mean().item()
    per_seq = (hand(2 / 8, g0) + hand(6 / 8, g1)) / 2
    pooled = hand(8 / 16, (g0 + g1) / 2)
    for trainer in (t, study02()):
        assert trainer.ratio_loss(router, n, per_seq=True).item() == pytest.approx(per_seq, rel=1e-6)
        assert trainer.ratio_loss(router, n, per_seq=False).item() == pytest.approx(pooled, rel=1e-6)
    assert abs(per_seq - pooled) > 0.05


def test_the_int8_scale_floor_is_published_and_switchable():
    """A row with max |w| below 1: the 1/127 floored grid by default, its own finer grid with the floor off."""
    t = study01()
    w = torch.linspace(-0.2, 0.2, 64).repeat(3, 1)
    _, floored = t.quantize_int8_rows(w, bool(tiny_hparams(t).quant_scale_floor))
    assert torch.allclose(floored.float(), torch.full((3,), 1 / 127), rtol=1e-3)
    q, fine = t.quantize_int8_rows(w, False)
    assert (fine.float() < 0.2 / 127 * 1.01).all() and q.abs().max() == 127


@pytest.fixture(scope="module")
def run01(sample_byte260, tmp_path_factory):
    out = tmp_path_factory.mktemp("s01") / "run"
    run, metrics = run_tiny(study01(), sample_byte260, out, ITERATIONS="8", CHECKPOINT_EVERY="4")
    return out, metrics


def test_a_tiny_run_exports_int8_and_eval_bpb_reproduces_its_number(run01, tmp_path, capsys):
    out, metrics = run01
    log = (out / "train.log").read_text()
    assert log.startswith('"""Study 01')
    assert re.search(r"final_int8_zlib_roundtrip_exact val_loss:\S+ val_bpb:\S+", log)
    assert "sliding" not in metrics and metrics["headline_format"] == "int8"
    assert not (out / "final_model.int6.ptz").exists()
    report = tmp_path / "r.json"
    assert eval_bpb.main([str(out / "final_model.int8.ptz"), "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["roundtrip"]["val_bpb"] == metrics["int8_roundtrip"]["val_bpb"]
    assert "sliding" not in r and r["boundaries"]["boundaries"] > 0
    assert r["trainer"].endswith("studies/01_hnet_byte260_vs_sp1024/train_gpt.py")
    sub = json.loads((out / "submission.json").read_text())
    assert sub["val_bpb"] == metrics["int8_roundtrip"]["val_bpb"] and sub["bytes_total"] == metrics["bytes_total"]


def test_resume_continues_exactly(run01, sample_byte260, tmp_path):
    out, _ = run01
    t = study01()
    run_tiny(t, sample_byte260, tmp_path / "resumed", ITERATIONS="8", RESUME_FROM=str(out / "checkpoints" / "step_000004.pt"))
    a = torch.load(out / "final_model.pt", map_location="cpu")
    b = torch.load(tmp_path / "resumed" / "final_model.pt", map_location="cpu")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_artifacts_and_bad_data_are_refused(run01, tmp_path, capsys):
    out, _ = run01
    blob = (out / "final_model.int8.ptz").read_bytes()
    (tmp_path / "flipped").write_bytes(blob[:100] + bytes([blob[100] ^ 1]) + blob[101:])
    assert eval_bpb.main([str(tmp_path / "flipped")]) == 2
    assert "flipped" in capsys.readouterr().err
    t = study01()
    wrong = tmp_path / "wrong"
    write_shard(wrong / "fineweb_val_000000.bin", torch.randint(0, 1024, (5000,)).numpy())
    write_shard(wrong / "fineweb_train_000000.bin", torch.randint(0, 1024, (5000,)).numpy())
    with pytest.raises(t.ConfigError, match=r"fineweb_val_000000.bin: holds id \d+ >= VOCAB_SIZE=260"):
        run_tiny(t, wrong, tmp_path / "o")


def test_eval_bpb_draws_the_html_page_and_counts_flips_against_the_float_model(run01, tmp_path, capsys):
    out, _ = run01
    page, report = tmp_path / "chunks.html", tmp_path / "r.json"
    assert eval_bpb.main([str(out / "final_model.int8.ptz"), "--html", str(page), "--compare", str(out / "final_model.pt"),
                          "--json", str(report), "--boundary-tokens", "2048"]) == 0
    r = json.loads(report.read_text())
    b = r["boundaries"]
    assert 0.0 <= b["flip_rate_vs_compare"] < 0.5 and "fixed_cap" not in b  # study 01 has no cap to truncate
    assert set(b["shift_flip_rate"]) == {"1", "2", "3", "4"} and len(b["chunk_bytes_hist"]) == 16
    assert r["compare_boundaries"]["boundaries"] > 0
    text = page.read_text(encoding="utf-8")
    assert "final_model.int8.ptz (byte260)" in text and "final_model.pt (float)" in text and "http" not in text
    printed = capsys.readouterr().out
    assert "boundary flips vs the float model" in printed and f"html: {page}" in printed
    # the final checkpoint holds the same float weights as final_model.pt: the same flips
    assert eval_bpb.main([str(out / "final_model.int8.ptz"), "--compare", str(out / "checkpoints" / "step_000008.pt"),
                          "--json", str(report), "--boundary-tokens", "2048", "--no-sliding"]) == 0
    assert json.loads(report.read_text())["boundaries"]["flip_rate_vs_compare"] == b["flip_rate_vs_compare"]
    assert eval_bpb.main([str(out / "final_model.int8.ptz"), "--compare", str(tmp_path / "missing.pt")]) == 2
    assert "--compare" in capsys.readouterr().err
