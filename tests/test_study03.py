"""Study 03's additions: every one off is study 02's computation, exactly; each one on changes what
it names and nothing it should not; the rule-based router cuts where it says; the grouped codec
reads back bit for bit and refuses a corrupt file."""
import re

import pytest
import torch

import eval_bpb
from conftest import STUDY03_ON, final_state, run_tiny, study02, study03, tiny_hparams

# each addition of study 03 with a value that switches it on at the tiny size
ADDITIONS = {"OUTER_DIM": "16", "OUTER_MLP_MULT": "0", "MAIN_LOOPS": "2", "OUTER_LR_MULT": "2", "OFFICIAL_INIT": "1",
             "BIGRAM_HASH": "512", "SMEAR_GATE": "1", "ACTIVATION": "leaky_relu2", "ROUTER": "space",
             "EXPORT_CODEC": "grouped"}
COMMON = dict(ITERATIONS="3", GPTQ_CALIB_BATCHES="2", EVAL_SLIDING="0")


def test_every_addition_is_a_variable_and_off_by_default():
    t3 = study03()
    known = {f.upper() for f in t3.Hyperparameters.__dataclass_fields__}
    assert set(ADDITIONS) <= known
    hp = t3.Hyperparameters.from_env({})[0]
    defaults = {k: str(getattr(hp, k.lower())) for k in ADDITIONS}
    assert defaults == {"OUTER_DIM": "0", "OUTER_MLP_MULT": "-1", "MAIN_LOOPS": "1", "OUTER_LR_MULT": "1.0",
                        "OFFICIAL_INIT": "0", "BIGRAM_HASH": "0", "SMEAR_GATE": "0", "ACTIVATION": "relu2",
                        "ROUTER": "learned", "EXPORT_CODEC": "torch_zstd"}


@pytest.mark.parametrize("name", ["XSA_LAYERS", "ROPE_DIMS", "LN_SCALE", "MUON_WEIGHT_DECAY"])
def test_a_retired_switch_is_refused_with_the_commit_that_has_it(name):
    # they measured nothing and left the trainer; silently ignoring one would run the base model
    # under the arm's name
    t3 = study03()
    assert name.lower() not in t3.Hyperparameters.__dataclass_fields__
    with pytest.raises(t3.ConfigError, match=f"unknown variable {name}: retired .* commit {t3.RETIRED_AT}"):
        t3.Hyperparameters.from_env({name: "1"})


def test_a_grouped_artifact_of_the_older_format_is_refused_with_the_commit_that_reads_it(tmp_path):
    # HNG1 stored its index as plain JSON; the reader would otherwise fail on it as on corrupt data
    from harness import files

    t3 = study03()
    old = tmp_path / "final_model.int6.ptz"
    old.write_bytes(b"HNG1" + (2).to_bytes(4, "little") + b"{}" + bytes(32))
    with pytest.raises(t3.ConfigError, match=f"older trainer .* commit {t3.RETIRED_AT} reads it"):
        t3.read_artifact(old)
    with pytest.raises(ValueError, match=f"older study-03 trainer .* commit {t3.RETIRED_AT} reads it"):
        files.read_payload(old)


def test_the_untied_head_goes_through_late_qat():
    # OFFICIAL_INIT=1's head was applied as F.linear on its weight, which skipped the int6 delta
    t3 = study03()
    model = t3.HNet(tiny_hparams(t3, OFFICIAL_INIT="1"))
    x = torch.randn(1, 5, model.lm_head.in_features)
    before = model.logits(x)
    t3.refresh_qat(model, True, False)
    assert model.lm_head.qat_delta.abs().sum() > 0
    assert not torch.equal(model.logits(x), before)  # training mode: the head sees its int6 rounding
    model.eval()
    assert torch.equal(model.logits(x), before)


def test_the_untied_head_gets_a_gptq_hessian(sample_byte260, tmp_path, monkeypatch):
    # ...and GPTQ's forward hook never saw its input: an empty Hessian, rounded to nearest
    t3 = study03()
    real, captured = t3.collect_hessians, {}
    monkeypatch.setattr(t3, "collect_hessians", lambda run: captured.setdefault("h", real(run)))
    run_tiny(t3, sample_byte260, tmp_path, **COMMON, OFFICIAL_INIT="1", KEEP_FLOAT_MAX_NUMEL="0")
    h = captured["h"]["lm_head.weight"]
    assert torch.isfinite(h).all() and torch.linalg.eigvalsh(h).min() > 0  # the inputs' second moment
    log = (tmp_path / "train.log").read_text().split("=" * 100, 1)[1]
    assert "gptq: hessians for" in log and "WARNING: gptq" not in log


def test_with_every_addition_off_it_trains_as_study_02_to_the_bit(sample_byte260, tmp_path):
    run_tiny(study02(), sample_byte260, tmp_path / "02", **COMMON)
    run_tiny(study03(), sample_byte260, tmp_path / "03", **COMMON)
    a, b = final_state(tmp_path / "02"), final_state(tmp_path / "03")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [[re.sub(r" (train_time|step_avg):\S+", "", x)  # every number but the clock's
              for x in (tmp_path / s / "train.log").read_text().split("=" * 100, 1)[1].splitlines()
              if x.startswith(("step:", "final_"))] for s in ("02", "03")]
    assert lines[0] == lines[1] and len(lines[0]) > 5  # every loss and every score


@pytest.mark.parametrize("name", sorted(ADDITIONS))
def test_each_addition_on_changes_the_run(name, sample_byte260, tmp_path):
    t3 = study03()
    base, _ = run_tiny(t3, sample_byte260, tmp_path / "off", **COMMON)
    on, metrics = run_tiny(t3, sample_byte260, tmp_path / "on", **COMMON, **{name: ADDITIONS[name]})
    a, b = final_state(tmp_path / "off"), final_state(tmp_path / "on")
    if name == "EXPORT_CODEC":  # the same training, a different file that reads back the same
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert (tmp_path / "on" / "final_model.int6.ptz").read_bytes()[:4] == t3.GROUPED_MAGIC
        offs = t3.read_artifact(tmp_path / "off" / "final_model.int6.ptz")["tensors"]
        ons = t3.read_artifact(tmp_path / "on" / "final_model.int6.ptz")["tensors"]
        assert all(torch.equal(offs[k]["q"], ons[k]["q"]) for k in offs if "q" in offs[k])
        return
    changed = a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a)
    assert changed, f"{name}={ADDITIONS[name]} trained exactly as off"


def test_the_rule_based_router_cuts_after_whitespace_and_adds_no_ratio_loss():
    t3 = study03()
    hp = tiny_hparams(t3, ROUTER="space")
    model = t3.HNet(hp)
    text = b"We are fifteen years\ninto  this"
    ids = torch.tensor([[1] + [b + 4 for b in text]])
    out = model(ids, ids)
    starts = [0, 1] + [i + 2 for i, c in enumerate(text[:-1]) if c in b" \n"]  # BOS, the byte after it, after spaces
    assert out.boundary_mask[0].nonzero().flatten().tolist() == starts
    assert out.ratio_loss.item() == 0.0
    with pytest.raises(t3.ConfigError, match="ROUTER=space .* byte260"):
        t3.Hyperparameters.from_env({"ROUTER": "space", "VOCAB_SIZE": "1024", "TOKENIZER_PATH": "x.model"})


def test_the_widened_main_stage_and_its_parameter_budget():
    # the paper's widening: chunk vectors of OUTER_DIM get a learned pad to MODEL_DIM, sliced back after
    t3 = study03()
    hp = tiny_hparams(t3, OUTER_DIM="16", MODEL_DIM="32", OUTER_MLP_MULT="0")
    model = t3.HNet(hp)
    assert model.tok_emb.weight.shape == (260, 16) and model.main_pad.shape == (16,)
    assert model.encoder.blocks[0].mlp is None and model.main.blocks[0].mlp is not None
    assert model.main.blocks[0].attn.c_q.weight.shape == (32, 32) and model.encoder.blocks[0].attn.c_q.weight.shape == (16, 16)
    x = torch.randint(4, 260, (2, 64))
    assert model(x, x).loss.shape == (2, 64)
    with pytest.raises(t3.ConfigError, match="OUTER_DIM=64 exceeds MODEL_DIM=32"):
        tiny_hparams(t3, OUTER_DIM="64")


def test_a_grouped_artifact_scores_as_the_trainer_did_and_a_flipped_bit_is_refused(sample_byte260, tmp_path, capsys):
    import json
    import random

    t3 = study03()
    _, metrics = run_tiny(t3, sample_byte260, tmp_path / "run", ITERATIONS="3", **STUDY03_ON)
    capsys.readouterr()  # the training run's own lines, val_bpb among them
    path = tmp_path / "run" / "final_model.int6.ptz"
    report = tmp_path / "r.json"
    assert eval_bpb.main([str(path), "--json", str(report), "--no-boundaries"]) == 0
    capsys.readouterr()  # the good artifact's scores
    r = json.loads(report.read_text())
    assert r["roundtrip"]["val_bpb"] == metrics["int6_roundtrip"]["val_bpb"]
    assert r["sliding"]["val_bpb"] == metrics["int6_sliding"]["val_bpb"]
    blob = path.read_bytes()
    rng = random.Random(0)
    refused = 0
    for i in range(12):
        pos = rng.randrange(8, len(blob))
        flipped = bytearray(blob)
        flipped[pos] ^= 1 << rng.randrange(8)
        bad = tmp_path / f"bad{i}.ptz"
        bad.write_bytes(bytes(flipped))
        try:
            same = t3.tensors_digest(t3.read_artifact(bad)["tensors"]) == t3.read_artifact(path)["digest"]
        except t3.ConfigError:
            same = False
        if same:  # a flip nothing decoded depends on (JSON whitespace): the weights are the original
            continue
        refused += 1
        assert eval_bpb.main([str(bad), "--no-sliding", "--no-boundaries"]) == 2
        assert "val_bpb" not in capsys.readouterr().out
    assert refused >= 8
