"""The model: exact parameter counts, causality, the dynamic chunk cap."""
import pytest
import torch

from conftest import STUDY03_ON, study01, study02, study03, tiny_hparams
from conftest import study as study_named


@pytest.mark.parametrize("study, env, expected", [
    ("01", {}, 17_455_176),  # study 01 byte260: 9 layers (2 + 5 + 2), dim 512, KV 4
    ("01", {"VOCAB_SIZE": "1024", "NUM_KV_HEADS": "2", "TOKENIZER_PATH": "x.model"}, 16_666_696),  # study 01 sp1024
    ("02", {}, 22_966_880),  # study 02 byte260: 12 layers, OUTER_LAYERS 3, dim 512, KV 4
    ("02", {"VOCAB_SIZE": "1024", "NUM_LAYERS": "11", "TOKENIZER_PATH": "x.model"}, 21_520_472),  # study 02 sp1024
    ("02", {"VOCAB_SIZE": "1024", "NUM_LAYERS": "9", "OUTER_LAYERS": "0", "TOKENIZER_PATH": "x.model"}, 17_059_912),
    ("03", {}, 22_966_880),  # study 03 with every addition off is study 02
    ("03", {"VOCAB_SIZE": "1024", "NUM_LAYERS": "9", "OUTER_LAYERS": "0", "TOKENIZER_PATH": "x.model"}, 17_059_912),
])
def test_parameter_counts_match_the_spec(study, env, expected):
    t = study01() if study == "01" else study02() if study == "02" else study03()
    hp, _ = t.Hyperparameters.from_env(env)
    with torch.device("meta"):
        model = t.HNet(hp)
    assert sum(p.numel() for p in model.parameters()) == expected


def trained_like(model, seed=0):
    """Random non-zero weights everywhere (zero-init projections would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 2 else 1.0) + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


CAUSAL_CASES = [("02", 1, {}), ("02", 0, {}), ("01", 1, {}), ("03", 1, STUDY03_ON), ("03", 0, STUDY03_ON),
                ("03", 1, {**STUDY03_ON, "ROUTER": "space"}), ("03", 1, {"OFFICIAL_INIT": "1", "BIGRAM_HASH": "64"})]


@pytest.mark.parametrize("name, outer, extra", CAUSAL_CASES)
def test_changing_later_bytes_never_changes_earlier_predictions(name, outer, extra):
    """Study 01's chunk count depends on the whole batch, so a later edit can change it; earlier
    positions must not notice (trailing padding chunks are invisible under causal attention). Study
    03's hashed bigrams and smear gate read the byte before: they must not read the byte after."""
    t = study_named(name)
    divisor = {"CHUNK_DIVISOR": "2"} if name != "01" else {}
    hp = tiny_hparams(t, OUTER_LAYERS=str(outer), TRAIN_SEQ_LEN="96", **divisor, **extra)
    model = trained_like(t.HNet(hp))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(4, 260, (2, 96), generator=g)
    x[torch.rand(x.shape, generator=g) < 0.2] = ord(" ") + 4  # text-like: spaces, for the rule-based router
    with torch.no_grad():
        base_h, _, base_mask = model.hidden_states(x)
        base = model.logits(base_h)
        changed_downstream = count_changed = 0
        for pos in (0, 5, 31, 62, 94):
            x2 = x.clone()
            x2[:, pos + 1:] = torch.randint(4, 260, x2[:, pos + 1:].shape, generator=g)
            h2, _, mask2 = model.hidden_states(x2)
            logits2 = model.logits(h2)
            assert (logits2[:, :pos + 1] - base[:, :pos + 1]).abs().max() <= 1e-5, f"position {pos} saw the future"
            assert not torch.equal(logits2[:, pos + 1:], base[:, pos + 1:])
            if outer:
                assert torch.equal(mask2[:, :pos + 1], base_mask[:, :pos + 1])
                changed_downstream += int(not torch.equal(mask2[:, pos + 1:], base_mask[:, pos + 1:]))
                count_changed += int(mask2.sum(1).max() != base_mask.sum(1).max())
    if outer:
        assert changed_downstream >= 3, "the test must move boundaries after the edit to mean anything"
    if name == "01":
        assert count_changed >= 2, "the edits must change study 01's chunk count for this to mean anything"


def test_dynamic_cap_equals_fixed_cap_unless_rows_are_truncated():
    t = study02()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(4, 260, (4, 64), generator=g)
    # chunk divisor 1: the fixed cap is the sequence length, nothing can be truncated
    roomy = trained_like(t.HNet(tiny_hparams(t, TRAIN_SEQ_LEN="64", CHUNK_DIVISOR="1")))
    with torch.no_grad():
        fixed = roomy(x, x).loss
        dynamic = roomy(x, x, dynamic_cap=True).loss
        counts = roomy.hidden_states(x)[2].sum(1)
    assert counts.max() < 64, "the dynamic cap must be smaller than the fixed one here"
    assert torch.allclose(fixed, dynamic, atol=1e-5)
    # divisor 16: cap 4 chunks, fewer than the boundaries: the fixed cap truncates, the dynamic one does not
    tight = trained_like(t.HNet(tiny_hparams(t, TRAIN_SEQ_LEN="64", CHUNK_DIVISOR="16")))
    with torch.no_grad():
        assert tight.hidden_states(x)[2].sum(1).min() > 4
        fixed = tight(x, x).loss
        dynamic = tight(x, x, dynamic_cap=True).loss
    assert not torch.allclose(fixed, dynamic, atol=1e-3)


def test_ratio_loss_only_in_training_loss_not_in_eval_nats():
    t = study02()
    hp = tiny_hparams(t)
    model = trained_like(t.HNet(hp))
    x = torch.randint(4, 260, (2, 64))
    routed = []
    model.routing.register_forward_hook(lambda m, i, o: routed.append(o))
    with torch.no_grad():
        out = model(x, x)
        manual = torch.nn.functional.cross_entropy(model.logits(model.hidden_states(x)[0]).flatten(0, 1), x.flatten(),
                                                   reduction="none")
    # the ratio loss is returned beside the loss, as the published formula per sequence (the default)
    f = routed[0].boundary_mask.float().mean(dim=1)
    g = routed[0].boundary_prob.mean(dim=1)
    n = hp.target_avg_chunk_len
    expected = (n / (n - 1) * ((n - 1) * f * g + (1 - f) * (1 - g))).mean()
    assert f.min() < 1 and abs(out.ratio_loss.item() - expected.item()) < 1e-6 and abs(expected.item() - 1) > 1e-3
    # and the loss is the cross entropy alone, nothing of the ratio loss in it
    assert torch.allclose(out.loss.flatten(), manual, atol=1e-6)
