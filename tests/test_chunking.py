"""Dynamic chunking pieces against slow, obviously right references, in every study's trainer."""
import pytest
import torch

from conftest import study, study02

STUDIES = ["01", "02", "03"]


def reference_ema(z, p):
    """s_0 = z_0, s_c = p_c z_c + (1 - p_c) s_{c-1}: the plain loop the scan replaces."""
    out = [z[:, 0]]
    for c in range(1, z.size(1)):
        out.append(p[:, c, None] * z[:, c] + (1 - p[:, c, None]) * out[-1])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("name", STUDIES)
def test_dechunk_scan_matches_loop_forward_and_backward(name):
    t = study(name)
    torch.manual_seed(0)
    for chunks in (1, 2, 7, 64, 100):
        z = torch.randn(3, chunks, 16, dtype=torch.float64, requires_grad=True)
        p = torch.rand(3, chunks, dtype=torch.float64).mul(0.5).add(0.5).requires_grad_()
        idx = torch.arange(chunks).expand(3, chunks)
        fast = t.DeChunkLayer()(z, p, idx)
        slow = reference_ema(z, p.clamp(1e-4, 1 - 1e-4))
        assert torch.allclose(fast, slow, atol=1e-5)
        g = torch.randn_like(fast)
        gz_fast, gp_fast = torch.autograd.grad((fast * g).sum(), (z, p), materialize_grads=True)
        gz_slow, gp_slow = torch.autograd.grad((slow * g).sum(), (z, p), materialize_grads=True)
        assert torch.allclose(gz_fast, gz_slow, atol=1e-5)
        assert torch.allclose(gp_fast, gp_slow, atol=1e-5)


@pytest.mark.parametrize("name", STUDIES)
def test_scan_has_no_overflow_at_long_lengths(name):
    t = study(name)
    a = torch.full((1, 4096, 1), 0.5)
    b = torch.ones(1, 4096, 1)
    s = t.linear_scan(a, b)
    assert torch.isfinite(s).all()
    assert torch.allclose(s[0, -1], torch.tensor([2.0]), atol=1e-6)  # geometric series 1 + 1/2 + ...


def router_from_mask(t, mask):
    p = torch.where(mask, torch.full(mask.shape, 0.8), torch.full(mask.shape, 0.2))
    return t.RoutingModuleOutput(p, mask, torch.where(mask, p, 1 - p))


def test_chunk_keeps_boundary_states_in_order_and_caps():
    t = study02()
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 1, 1]], dtype=torch.bool)  # boundaries at 0 2 3 6 8 9
    h = torch.arange(10, dtype=torch.float32).view(1, 10, 1).expand(1, 10, 4).contiguous()
    out = t.ChunkLayer()(h, router_from_mask(t, mask), cap=8)
    assert out.hidden[0, :, 0].tolist() == [0, 2, 3, 6, 8, 9, 0, 0]  # zero-padded past the last boundary
    assert out.probs[0].tolist() == [0.800000011920929] * 6 + [0, 0]
    assert out.chunk_index[0].tolist() == [0, 0, 1, 2, 2, 2, 3, 3, 4, 5]
    capped = t.ChunkLayer()(h, router_from_mask(t, mask), cap=3)
    assert capped.hidden[0, :, 0].tolist() == [0, 2, 3]
    # every byte after the third boundary reads the last kept chunk
    assert capped.chunk_index[0].tolist() == [0, 0, 1, 2, 2, 2, 2, 2, 2, 2]


def test_ratio_loss_is_one_at_target_and_pulls_g_toward_it():
    t = study02()
    n = 6.0
    for frac, sign in ((1 / n, 0), (0.5, 1), (0.05, -1)):
        mask = torch.zeros(1, 600, dtype=torch.bool)
        mask[0, : int(round(frac * 600))] = True
        p = torch.full((1, 600), frac, requires_grad=True)
        router = t.RoutingModuleOutput(p, mask, p)
        loss = t.ratio_loss(router, n, per_seq=True)
        (grad,) = torch.autograd.grad(loss, p)
        if sign == 0:
            assert abs(loss.item() - 1.0) < 1e-6
            assert grad.abs().max() < 1e-6
        else:
            # gradient descent moves G = mean p toward 1/N
            assert torch.sign(grad.sum()).item() == sign
            assert loss.item() > 1.0


def test_ste_forward_is_exactly_one_and_passes_gradient():
    t = study02()
    c = torch.rand(1000, dtype=torch.float32).requires_grad_()
    y = t.ste_one(c)
    assert torch.equal(y, torch.ones_like(y))
    (g,) = torch.autograd.grad((y * torch.arange(1000.0)).sum(), c)
    assert torch.equal(g, torch.arange(1000.0))


def test_scale_grad_is_identity_forward_and_scales_backward():
    t = study02()
    x = torch.randn(5, requires_grad=True)
    y = t.ScaleGrad.apply(x, 0.75)
    assert torch.equal(y, x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(g, torch.full((5,), 0.75))


def test_router_first_position_is_a_boundary_and_identity_init_compares_neighbours():
    t = study02()
    router = t.RoutingModule(8)
    h = torch.randn(2, 5, 8)
    h[:, 2] = h[:, 1] * 3.0  # same direction as its predecessor: cosine 1, p = 0
    h[:, 4] = -h[:, 3]  # opposite direction: cosine -1, p = 1
    out = router(h)
    assert torch.equal(out.boundary_prob[:, 0], torch.ones(2))
    assert torch.allclose(out.boundary_prob[:, 2], torch.zeros(2), atol=1e-6)
    assert torch.allclose(out.boundary_prob[:, 4], torch.ones(2), atol=1e-6)
    assert torch.equal(out.boundary_mask, out.boundary_prob >= 0.5)
    assert torch.equal(out.selected_probs, torch.where(out.boundary_mask, out.boundary_prob, 1 - out.boundary_prob))
