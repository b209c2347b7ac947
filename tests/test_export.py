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
    q_g, s_g = t.gptq_quantize_int6(w, h, block_size=32, damp=0.01, clip_quantile=1.0)
    q_r, s_r = t.quantize_int6_rows(w, 1.0)
    assert q_g.dtype == torch.int8 and q_g.abs().max() <= 31 and q_r.abs().max() <= 31
    assert output_error(x, w, q_g, s_g) < 0.7 * output_error(x, w, q_r, s_r)
    hp = tiny_hparams(t)
    q_b, s_b = t.quantize_int6_best(w, h, hp)  # best clip per row is never worse than clip 1.0
    assert output_error(x, w, q_b, s_b) <= output_error(x, w, q_g, s_g) + 1e-12


def test_pruning_zeroes_the_smallest_fraction():
    t = study02()
    _, w, _ = correlated_layer(1)
    q, s = t.quantize_int6_rows(w)
    pruned = t.prune_smallest(q, s, 0.03)
    k = round(0.03 * q.numel())
    assert (pruned == 0).sum().item() == max(k, (q == 0).sum().item())
    magnitude = q.float().abs() * s.float()[:, None]
    assert magnitude[pruned == 0].max() <= magnitude[pruned != 0].min()
    assert torch.equal(pruned[pruned != 0], q[pruned != 0])


def test_late_qat_forward_sees_the_exported_int6_and_passes_gradients():
    t = study02()
    model = torch.nn.Sequential(t.CastedLinear(16, 8))
    lin = model[0]
    x = torch.randn(4, 16)
    q, s = t.quantize_int6_rows(lin.weight.detach())
    t.refresh_qat(model, True)
    y = lin(x)
    assert torch.allclose(y, x @ (q.float() * s.float()[:, None]).T, atol=1e-5)
    assert not torch.allclose(y, x @ lin.weight.T, atol=1e-5)  # the int6 grid is not the float weight
    (g,) = torch.autograd.grad(y.sum(), lin.weight)
    assert torch.allclose(g, x.sum(0).expand(8, 16))  # straight-through: the float weight's gradient
    assert torch.equal(lin.eval()(x), x @ lin.weight.T)  # evaluation always uses the weight itself
    t.refresh_qat(model, False)
    assert torch.equal(lin.train()(x), x @ lin.weight.T)


@pytest.mark.parametrize("fmt", ["int8", "int6"])
def test_round_trip_reproduces_the_quantised_weights_exactly(fmt, tmp_path):
    t = study02()
    hp = tiny_hparams(t)
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
    sub = json.loads((out / "submission.json").read_text())
    assert sub["val_bpb"] == metrics["int6_sliding"]["val_bpb"] and sub["bytes_total"] == metrics["bytes_total"]


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
    for name, data in (("truncated", blob[: len(blob) // 2]), ("garbage", b"\x00" * 100),
                       ("flipped", blob[:40] + bytes(b ^ 0xFF for b in blob[40:80]) + blob[80:])):
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
    (tmp_path / "shapes").write_bytes(t.compress(payload, "int6"))
    assert eval_bpb.main([str(tmp_path / "shapes")]) == 2
    assert "do not fit the model" in capsys.readouterr().err
