"""The denoiser network and the flow-matching functions: shapes, conditioning, samplers (CPU, no Ray)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.models import denoiser, flow, unet
from pipeline.models.unet import UNet, UNetConfig


def _perturbed(cfg: UNetConfig, seed: int = 0) -> UNet:
    """A denoiser whose zero-initialised layers (every block's ``conv2`` and ``conv_out``) are
    given small random weights, so its output depends on every input."""
    torch.manual_seed(seed)
    net = UNet(cfg).eval()
    zeroed = [net.conv_out] + [m.conv2 for m in net.modules() if isinstance(m, unet.Block)]
    with torch.no_grad():
        for layer in zeroed:
            assert not layer.weight.any()  # zero-initialised as documented
            layer.weight.normal_(0.0, 0.05)
            layer.bias.normal_(0.0, 0.05)
    return net


# --------------------------------------------------------------------------- denoiser


@pytest.mark.parametrize("size", ["tiny", "small"])  # "base"/"large" (39M/170M parameters) take seconds
def test_output_shape_matches_latent_for_every_size(size):
    torch.manual_seed(0)
    net = UNet(denoiser.config_for(size)).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = net(x, torch.tensor([0.1, 0.9]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert not out.any()  # zero-initialised output layer: the untrained net predicts zero


def test_perturbed_denoiser_output_is_nonzero():
    cfg = denoiser.config_for("tiny")
    net = _perturbed(cfg)
    with torch.no_grad():
        out = net(torch.randn(2, 4, 8, 8), torch.rand(2))
    assert out.abs().mean() > 1e-4


def test_cond_channels_are_required_and_used():
    net = _perturbed(denoiser.config_for("tiny", cond_channels=4))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
    with pytest.raises(ValueError, match="needs conditioning channels"):
        net(x, t)
    cond = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a = net(x, t, cond=cond)
        b = net(x, t, cond=cond.clone())
        c = net(x, t, cond=cond + 1.0)
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4


def test_class_conditioning_negative_id_is_the_null_class():
    net = _perturbed(denoiser.config_for("tiny", num_classes=3))
    assert net.class_emb is not None and net.class_emb.num_embeddings == 4  # 3 classes + null
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        none = net(x, t, y=None)
        neg = net(x, t, y=torch.tensor([-1, -7]))
        null = net(x, t, y=torch.tensor([3, 3]))  # the null class id is num_classes
        real = net(x, t, y=torch.tensor([0, 2]))
        other = net(x, t, y=torch.tensor([1, 2]))
    torch.testing.assert_close(none, neg)
    torch.testing.assert_close(none, null)
    assert (none - real).abs().max() > 1e-4
    assert (real[0] - other[0]).abs().max() > 1e-4  # class 0 vs 1 differ on sample 0 ...
    torch.testing.assert_close(real[1], other[1])  # ... and sample 1 (class 2 both times) does not


def test_unknown_size_and_bad_widths_are_config_errors():
    with pytest.raises(ConfigError, match="unknown denoiser size 'nope'"):
        denoiser.config_for("nope")
    with pytest.raises(ConfigError, match="multiples of groups=16"):
        UNetConfig(widths=(64, 100), groups=16)


def test_config_dict_round_trips():
    cfg = denoiser.config_for("small", cond_channels=4, num_classes=10)
    d = denoiser.to_dict(cfg)
    assert d["widths"] == [64, 128] and d["attention"] is True and d["num_classes"] == 10
    assert d["arch"] == "unet"
    back = denoiser.config_from_dict(d)
    assert back == cfg
    assert isinstance(back.widths, tuple)
    net = denoiser.from_dict(d)
    assert isinstance(net, UNet) and net.cfg == cfg


# --------------------------------------------------------------------------- flow


def test_interpolate_endpoints_and_midpoint():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    torch.testing.assert_close(flow.interpolate(x0, noise, torch.zeros(3)), x0)
    torch.testing.assert_close(flow.interpolate(x0, noise, torch.ones(3)), noise)
    mixed = flow.interpolate(x0, noise, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(mixed[0], x0[0])
    torch.testing.assert_close(mixed[1], 0.5 * (x0[1] + noise[1]))
    torch.testing.assert_close(mixed[2], noise[2])


def test_loss_is_zero_for_the_true_velocity():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 2, 2, generator=g), torch.randn(4, 4, 2, 2, generator=g)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])

    def exact(x_t, tt):  # recovers noise - x0 from x_t, so it also checks the interpolation
        return (x_t - x0) / tt.view(-1, 1, 1, 1)

    assert flow.loss(exact, x0, t, noise).item() < 1e-10
    zero = flow.loss(lambda x_t, tt: torch.zeros_like(x_t), x0, t, noise)
    torch.testing.assert_close(zero, ((noise - x0) ** 2).mean())


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 4, 7])
def test_samplers_integrate_a_straight_path_exactly(sampler, steps):
    g = torch.Generator().manual_seed(2)
    x0_true, x1 = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    calls = []

    def model_fn(x, t):
        calls.append(t.clone())
        assert t.shape == (2,)
        return x1 - x0_true

    out = flow.SAMPLERS[sampler](model_fn, x1.clone(), steps)
    torch.testing.assert_close(out, x0_true, atol=1e-5, rtol=1e-5)
    assert calls[0].tolist() == [1.0, 1.0]
    assert len(calls) == (steps if sampler == "euler" else 2 * steps - 1)  # heun skips its t=0 call

    # SDEdit-style start from a partly noised input
    x_mid = flow.interpolate(x0_true, x1, torch.full((2,), 0.4))
    out = flow.SAMPLERS[sampler](lambda x, t: x1 - x0_true, x_mid, steps, t_start=0.4)
    torch.testing.assert_close(out, x0_true, atol=1e-5, rtol=1e-5)


def test_sampler_callback_sees_every_step():
    seen = []

    def cb(i, x):
        seen.append(i)
        return x * 0  # the callback's return value replaces x

    out = flow.euler(lambda x, t: torch.ones_like(x), torch.ones(1, 1, 2, 2), 3, callback=cb)
    assert seen == [0, 1, 2]
    assert not out.any()


def test_sample_t_range_and_uniform_share():
    g = torch.Generator().manual_seed(3)
    t = flow.sample_t(20000, "cpu", generator=g, mean=0.0, std=1.0)
    assert t.shape == (20000,) and ((t > 0) & (t < 1)).all()
    assert (t < 0.1).float().mean() < 0.03  # logit-normal: few samples near the ends
    shifted = flow.sample_t(20000, "cpu", generator=g, mean=2.0, std=1.0)
    assert ((shifted > 0) & (shifted < 1)).all()
    assert shifted.mean() > 0.8
    uni = flow.sample_t(20000, "cpu", generator=g, mean=2.0, std=1.0, uniform_share=1.0)
    assert ((uni >= 0) & (uni < 1)).all()
    assert abs(uni.mean().item() - 0.5) < 0.02
    assert abs((uni < 0.1).float().mean().item() - 0.1) < 0.02  # flat, not logit-normal
    half = flow.sample_t(20000, "cpu", generator=g, mean=2.0, std=1.0, uniform_share=0.5)
    assert 0.6 < half.mean().item() < 0.75  # between the uniform (0.5) and shifted (~0.85) means


def test_guided_scale_one_calls_once_and_scale_s_extrapolates():
    calls = []

    def model_fn(x, t, y=None):
        calls.append(x.shape[0])
        assert y is not None and y.shape == (x.shape[0],)
        shift = torch.where(y < 0, torch.zeros_like(y), y + 1).to(x.dtype)
        return x * 2 + shift.view(-1, 1, 1, 1)  # v_c - v_u = y + 1

    x, t, y = torch.randn(3, 4, 2, 2), torch.rand(3), torch.tensor([0, 1, 4])
    null = torch.full_like(y, -1)
    out = flow.guided(model_fn, 1.0, {"y": y}, {"y": null})(x, t)
    assert calls == [3]
    torch.testing.assert_close(out, model_fn(x, t, y=y))

    calls.clear()
    s = 3.5
    out = flow.guided(model_fn, s, {"y": y}, {"y": null})(x, t)
    assert calls == [6]  # conditional and unconditional halves in one batched call
    v_c, v_u = x * 2 + (y + 1).float().view(-1, 1, 1, 1), x * 2
    torch.testing.assert_close(out, v_u + s * (v_c - v_u))

    calls.clear()
    unconditional = flow.guided(lambda x, t, **kw: calls.append(kw) or x, s, {})(x, t)
    assert calls == [{}] and torch.equal(unconditional, x)  # nothing to guide on: one plain call


def test_timesteps_run_from_start_to_zero():
    torch.testing.assert_close(flow.timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    ts = flow.timesteps(3, t_start=0.6)
    assert len(ts) == 4
    torch.testing.assert_close(ts, torch.tensor([0.6, 0.4, 0.2, 0.0]))
