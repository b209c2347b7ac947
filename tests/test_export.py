"""Export: GPTQ int6, pruning, the exact round trip, and eval_bpb.py scoring the same file."""
import json

import pytest
import torch

import eval_bpb
from conftest import run_tiny, study02, tiny_hparams, write_shard


def correlated_layer(seed=0, rows=48, cols=96, n=2048):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols) * 0.2
    x = torch.randn(n, cols, generator=g) @ mixing  # strongly correlated input features
    w = torch.randn(rows, cols, generator=g) * 0.05
    return x, w, x.T @ x / n


def output_error(x, w, q, s):
    return ((x @ (w - q.float() * s.float()[:, None]).T) ** 2).mean().item()


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    t = study02()
    x, w, h = correlated_layer()
    q_r, s_r = t.quantize_int6_rows(w, floor=False)
    q_g = t.gptq_quantize_int6(w, h, s_r, block_size=32, damp=0.01)
    assert q_g.dtype == torch.int8 and q_g.abs().max() <= 31 and q_r.abs().max() <= 31
    assert output_error(x, w, q_g, s_r) < 0.7 * output_error(x, w, q_r, s_r)


def test_row_clip_search_takes_each_rows_best_candidate():
    """GPTQ_CLIP_SEARCH=row: every row's output error d H d^T is the least over the candidate
    clips, each computed here on its own; on heavy-tailed rows some beat clip 1.0 strictly."""
    t = study02()
    x, _, h = correlated_layer(2)
    w = torch.distributions.StudentT(1.5).sample((48, 96)) * 0.02  # heavy tails: clipping can pay
    hp = tiny_hparams(t, GPTQ_CLIP_SEARCH="row", QUANT_SCALE_FLOOR="0")
    q_b, s_b = t.quantize_int6_matrix(w, h, hp)

    def row_errors(q, s):
        d = w - q.float() * s.float()[:, None]
        return ((d @ h) * d).sum(dim=1)
    candidates = []
    for cq in t.ROW_CLIP_QUANTILES:
        _, s = t.quantize_int6_rows(w, False, cq)
        candidates.append(row_errors(t.gptq_quantize_int6(w, h, s, hp.gptq_block_size, hp.gptq_damp), s))
    best = torch.stack(candidates).min(dim=0).values
    assert torch.allclose(row_errors(q_b, s_b), best, rtol=1e-5)
    assert (row_errors(q_b, s_b) < 0.99 * candidates[0]).any()  # candidates[0] is clip 1.0


def test_matrix_clip_search_is_the_published_per_matrix_choice():
    t = study02()
    _, w, _ = correlated_layer(3)
    hp = tiny_hparams(t)  # published defaults: GPTQ_CLIP_SEARCH=matrix, floors on
    q, s = t.quantize_int6_matrix(w, None, hp)
    errors = {}
    for cq in t.PUBLISHED_CLIP_QUANTILES:
        qc, sc = t.quantize_int6_rows(w, True, cq)
        errors[cq] = ((w - qc.float() * sc.float()[:, None]) ** 2).sum().item()
    best = min(errors, key=errors.get)
    expected_q, expected_s = t.quantize_int6_rows(w, True, best)
    assert torch.equal(q, expected_q) and torch.equal(s, expected_s)


def test_gptq_falls_back_to_round_to_nearest_on_a_hessian_that_is_not_positive_definite():
    t = study02()
    hp = tiny_hparams(t, QUANT_SCALE_FLOOR="0", PRUNE_PCT="0")
    _, w, h = correlated_layer(4, rows=600, cols=64)
    bad = -torch.eye(64)  # negative definite: no damping makes it positive definite
    with pytest.raises(torch.linalg.LinAlgError):
        t.inverse_hessian_factor(bad, hp.gptq_damp)
    t.inverse_hessian_factor(h, hp.gptq_damp)  # a real Hessian passes
    payload = t.quantize_state_dict({"m.weight": w, "n.weight": w.clone()}, "int6", hp,
                                    {"m.weight": bad, "n.weight": h})
    assert payload["stats"]["gptq_fallbacks"] == ["m.weight"]
    rtn_q, rtn_s = t.quantize_int6_matrix(w, None, hp)
    assert torch.equal(payload["tensors"]["m.weight"]["q"], rtn_q)
    assert not torch.equal(payload["tensors"]["n.weight"]["q"], rtn_q)  # GPTQ ran on the good one


def test_published_pruning_changes_nothing_when_zeros_already_fill_the_quantile():
    """PRUNE_NONZERO=0 is the published rule: one threshold on |q| at the PRUNE_PCT quantile,
    zeros included. With the scale floor a row of small weights is mostly zeros already, so at
    3% nothing is pruned; PRUNE_NONZERO=1 prunes 3% of the nonzero values, smallest first."""
    t = study02()
    _, w, _ = correlated_layer(1)  # N(0, 0.05) weights: the 1/31 floor rounds many to 0
    q, s = t.quantize_int6_rows(w, floor=True)
    zeros = (q == 0).float().mean().item()
    assert zeros > 0.2
    published = q.clone()
    assert t.prune_int6({"w": (published, s)}, 0.03, nonzero=False) == 0
    assert torch.equal(published, q)
    ours = q.clone()
    live = int((q != 0).sum())
    changed = t.prune_int6({"w": (ours, s)}, 0.03, nonzero=True)
    assert changed == round(0.03 * live) and int((ours == 0).sum()) == int((q == 0).sum()) + changed
    magnitude = q.float().abs() * s.float()[:, None]
    newly = (ours == 0) & (q != 0)
    assert magnitude[newly].max() <= magnitude[ours != 0].min()
    # published rule on a grid with few zeros: everything at or under the threshold goes
    q2, s2 = t.quantize_int6_rows(w * 20, floor=True)
    before = q2.clone()
    t.prune_int6({"w": (q2, s2)}, 0.03, nonzero=False)
    threshold = before.abs().flatten().float().kthvalue(int(0.03 * before.numel())).values
    assert torch.equal(q2 == 0, before.abs() <= threshold)


def test_scale_floor_makes_the_grid_coarse_for_small_rows():
    """A row with max |w| < 1 quantises on the 1/31 (int6) and 1/127 (int8) floored grid with
    QUANT_SCALE_FLOOR=1 (published) and on its own finer grid with 0."""
    t = study02()
    w = torch.linspace(-0.2, 0.2, 64).repeat(3, 1)
    for floor, step6, step8 in ((True, 1 / 31, 1 / 127), (False, 0.2 / 31, None)):
        q6, s6 = t.quantize_int6_rows(w, floor)
        assert torch.allclose(s6.float(), torch.full((3,), step6), rtol=1e-3)
        q8, s8 = t.quantize_int8_rows(w, floor)
        if step8:
            assert torch.allclose(s8.float(), torch.full((3,), step8), rtol=1e-3)
        else:
            assert (s8.float() < 0.2 / 127 * 1.01).all()
    q_floor, _ = t.quantize_int6_rows(w, True)
    q_fine, _ = t.quantize_int6_rows(w, False)
    assert q_floor.abs().max() <= 7 and q_fine.abs().max() == 31


def test_late_qat_forward_sees_the_exported_int6_and_passes_gradients():
    t = study02()
    model = torch.nn.Sequential(t.CastedLinear(16, 8))
    lin = model[0]
    x = torch.randn(4, 16)
    q, s = t.quantize_int6_rows(lin.weight.detach(), floor=True)
    t.refresh_qat(model, True, floor=True)
    y = lin(x)
    assert torch.allclose(y, x @ (q.float() * s.float()[:, None]).T, atol=1e-5)
    assert not torch.allclose(y, x @ lin.weight.T, atol=1e-5)  # the int6 grid is not the float weight
    (g,) = torch.autograd.grad(y.sum(), lin.weight)
    assert torch.allclose(g, x.sum(0).expand(8, 16))  # straight-through: the float weight's gradient
    assert torch.equal(lin.eval()(x), x @ lin.weight.T)  # evaluation always uses the weight itself
    t.refresh_qat(model, False, floor=True)
    assert torch.equal(lin.train()(x), x @ lin.weight.T)


@pytest.mark.parametrize("fmt, name", [("int8", "02"), ("int6", "02"), ("int6", "03")])
def test_round_trip_reproduces_the_quantised_weights_exactly(fmt, name, tmp_path):
    from conftest import STUDY03_ON, study

    t = study(name)
    hp = tiny_hparams(t, **(STUDY03_ON if name == "03" else {}))  # study 03: the grouped codec, bigram table
    torch.manual_seed(0)
    model = t.HNet(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    state = model.state_dict()
    payload = t.quantize_state_dict(state, fmt, hp)
    path = tmp_path / f"m.{fmt}.ptz"
    t.write_atomic(path, t.compress(payload, fmt))
    back = t.dequantize_state_dict(t.read_artifact(path))
    expected = t.dequantize_state_dict(payload)
    assert back.keys() == state.keys()
    quantised = [k for k, e in payload["tensors"].items() if "q" in e]
    assert "tok_emb.weight" in quantised and payload["tensors"]["tok_emb.weight"]["bits"] == 8
    if name == "03":
        assert t.read_artifact(path) is not None and path.read_bytes()[:4] == t.GROUPED_MAGIC
        assert payload["tensors"]["bigram.table.weight"]["bits"] == 8  # a table, like the embedding
    assert len(quantised) > 3
    for k in state:
        assert torch.equal(back[k], expected[k]), k
        if "q" in payload["tensors"][k]:
            assert payload["tensors"][k]["q"].abs().max() <= (31 if payload["tensors"][k]["bits"] == 6 else 127)
    fresh = t.model_from_payload(t.read_artifact(path), torch.device("cpu"))
    assert all(torch.equal(fresh.state_dict()[k], back[k].to(fresh.state_dict()[k].dtype)) for k in back)


@pytest.fixture(scope="module")
def tiny_run(sample_byte260, tmp_path_factory):
    t = study02()
    out = tmp_path_factory.mktemp("export") / "run"
    run, metrics = run_tiny(t, sample_byte260, out, ITERATIONS="8", DYNAMIC_CAP="1")
    return out, metrics


def test_eval_bpb_reproduces_the_trainers_numbers(tiny_run, tmp_path, capsys):
    out, metrics = tiny_run
    report = tmp_path / "r.json"
    code = eval_bpb.main([str(out / "final_model.int6.ptz"), "--json", str(report), "--dynamic-cap"])
    assert code == 0
    r = json.loads(report.read_text())
    assert r["roundtrip"]["val_bpb"] == metrics["int6_roundtrip"]["val_bpb"]
    assert r["sliding"]["val_bpb"] == metrics["int6_sliding"]["val_bpb"]
    assert r["dynamic_cap"]["val_bpb"] == metrics["int6_dynamic_cap"]["val_bpb"]
    assert r["size"]["total_bytes"] == metrics["bytes_total"]
    printed = capsys.readouterr().out
    assert "sliding (stride 32)" in printed and "headroom" in printed and "precision" in printed
    # the data's own warnings reach the reader: this artifact scores a prefix of validation
    assert "WARNING: VAL_MAX_TOKENS=4096: every score covers the first 4,096 of" in printed
    assert r["data_warnings"] and "VAL_MAX_TOKENS" in r["data_warnings"][0]
    sub = json.loads((out / "submission.json").read_text())
    assert sub["val_bpb"] == metrics["int6_sliding"]["val_bpb"] and sub["bytes_total"] == metrics["bytes_total"]
    # --compare reads a checkpoint as plain tensors (weights_only): flips against the last step's weights
    checkpoint = sorted((out / "checkpoints").glob("step_*.pt"))[-1]
    assert eval_bpb.main([str(out / "final_model.int6.ptz"), "--compare", str(checkpoint), "--no-sliding",
                          "--json", str(report)]) == 0
    assert 0 <= json.loads(report.read_text())["boundaries"]["flip_rate_vs_compare"] < 0.5


def test_eval_bpb_fails_loudly_over_the_cap(tiny_run, monkeypatch, capsys):
    out, _ = tiny_run
    t = study02()
    monkeypatch.setattr(t, "SIZE_CAP_BYTES", 50_000)
    assert eval_bpb.main([str(out / "final_model.int6.ptz"), "--no-sliding", "--no-boundaries"]) == 4
    captured = capsys.readouterr()
    assert "over the 50,000-byte cap" in captured.err
    assert "OVER THE CAP" in captured.out


def test_eval_bpb_rejects_corrupt_and_mismatched_artifacts(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    t = study02()
    blob = (out / "final_model.int6.ptz").read_bytes()
    mid = len(blob) // 2  # inside the compressed body, well past any frame or block header
    for name, data in (("truncated", blob[: len(blob) // 2]), ("garbage", b"\x00" * 100),
                       ("flipped", blob[:mid] + bytes(b ^ 0xFF for b in blob[mid:mid + 40]) + blob[mid + 40:])):
        (tmp_path / name).write_bytes(data)
        assert eval_bpb.main([str(tmp_path / name)]) == 2
        assert f"{tmp_path / name}: not a readable artifact" in capsys.readouterr().err
    payload = t.read_artifact(out / "final_model.int6.ptz")
    payload["trainer"]["sha256"] = "0" * 64
    (tmp_path / "edited").write_bytes(t.compress(payload, "int6"))
    assert eval_bpb.main([str(tmp_path / "edited"), "--no-sliding", "--no-boundaries"]) == 3
    assert "changed since the artifact was made" in capsys.readouterr().err
    assert eval_bpb.main([str(tmp_path / "edited"), "--no-sliding", "--no-boundaries", "--ignore-hash"]) == 0
    sp_like = tmp_path / "sp_data"
    write_shard(sp_like / "fineweb_val_000000.bin", torch.randint(0, 1024, (5000,)).numpy())
    assert eval_bpb.main([str(out / "final_model.int6.ptz"), "--data", str(sp_like)]) == 2
    assert "VOCAB_SIZE=260" in capsys.readouterr().err
    payload = t.read_artifact(out / "final_model.int6.ptz")
    payload["tensors"]["tok_emb.weight"]["q"] = payload["tensors"]["tok_emb.weight"]["q"][:, :5]
    payload["digest"] = t.tensors_digest(payload["tensors"])  # a well-formed file of the wrong shapes
    (tmp_path / "shapes").write_bytes(t.compress(payload, "int6"))
    assert eval_bpb.main([str(tmp_path / "shapes")]) == 2
    assert "do not fit the model" in capsys.readouterr().err
