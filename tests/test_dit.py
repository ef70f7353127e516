"""The transformer denoiser (DiT), text conditioning of both denoiser families, and the registry
(CPU, tiny models, no Ray)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from pipeline.config import ConfigError
from pipeline.models import denoiser, dit, flow, unet
from pipeline.models.dit import DiT, DiTConfig
from pipeline.models.unet import UNet, UNetConfig

TEXT_DIM, POOLED_DIM = 16, 8


def _perturbed(cfg, seed: int = 0) -> nn.Module:
    """The network of ``cfg`` with every zero-initialised layer (U-Net ``conv2``/``conv_out``,
    DiT adaLN modulation and final layer, every cross-attention output) given small random
    weights, so its output depends on every input."""
    torch.manual_seed(seed)
    net = denoiser.build(cfg).eval()
    zeroed = [m for m in net.modules() if isinstance(m, nn.Linear | nn.Conv2d) and not m.weight.any()]
    assert zeroed
    with torch.no_grad():
        for layer in zeroed:
            layer.weight.normal_(0.0, 0.05)
            if layer.bias is not None:
                layer.bias.normal_(0.0, 0.05)
    return net


def _text_cfg(arch: str, **kw):
    size = "dit-tiny" if arch == "dit" else "tiny"
    return denoiser.config_for(size, text_dim=TEXT_DIM, pooled_dim=POOLED_DIM, **kw)


ARCHS = ["unet", "dit"]


# --------------------------------------------------------------------------- DiT shapes


@pytest.mark.parametrize("hw", [(8, 8), (8, 16), (16, 8), (12, 20)])
def test_dit_takes_any_grid_of_patch_multiples(hw):
    torch.manual_seed(0)
    net = _perturbed(denoiser.config_for("dit-tiny", text_dim=TEXT_DIM))
    x = torch.randn(2, 4, *hw)
    with torch.no_grad():
        out = net(x, torch.tensor([0.2, 0.8]), text=torch.randn(2, 3, TEXT_DIM))
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-4


def test_dit_position_embedding_is_not_a_parameter():
    net = DiT(denoiser.config_for("dit-tiny"))
    with torch.no_grad():
        net(torch.randn(1, 4, 8, 8), torch.rand(1))
        net(torch.randn(1, 4, 8, 12), torch.rand(1))
    assert not any("pos" in k for k in net.state_dict())
    assert {k[:2] for k in net._pos} == {(4, 4), (4, 6)}
    pe = dit.sincos_2d(3, 5, 64)
    assert pe.shape == (15, 64) and len({tuple(r.tolist()) for r in pe}) == 15  # every position distinct


def test_dit_rejects_a_grid_that_is_not_a_patch_multiple():
    net = DiT(denoiser.config_for("dit-tiny"))
    for hw in [(9, 8), (8, 7)]:
        with pytest.raises(ValueError, match="multiples of the DiT patch size 2"):
            net(torch.randn(1, 4, *hw), torch.rand(1))


def test_unet_rejects_a_grid_that_is_not_a_multiple():
    net = UNet(denoiser.config_for("tiny"))
    with pytest.raises(ValueError, match="must be multiples of 2"):
        net(torch.randn(1, 4, 9, 8), torch.rand(1))


def test_untrained_dit_predicts_zero_and_class_and_cond_inputs_work():
    cfg = denoiser.config_for("dit-tiny", num_classes=3, cond_channels=4)
    torch.manual_seed(0)
    net = DiT(cfg).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        assert not net(x, t, cond=torch.randn(2, 4, 8, 8), y=torch.tensor([0, 2])).any()  # adaLN-Zero
    with pytest.raises(ValueError, match="needs conditioning channels"):
        net(x, t)
    net = _perturbed(cfg)
    cond = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        none, neg = net(x, t, cond=cond, y=None), net(x, t, cond=cond, y=torch.tensor([-1, -5]))
        real = net(x, t, cond=cond, y=torch.tensor([0, 2]))
        other_cond = net(x, t, cond=cond + 1, y=None)
    torch.testing.assert_close(none, neg)
    assert (none - real).abs().max() > 1e-4
    assert (none - other_cond).abs().max() > 1e-4


# --------------------------------------------------------------------------- text conditioning


def _text_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(2, 5, TEXT_DIM, generator=g)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    return text, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_tokens_do_not_change_the_output(arch):
    net = _perturbed(_text_cfg(arch))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.4, 0.6])
    text, mask = _text_batch()
    with torch.no_grad():
        base = net(x, t, text=text, text_mask=mask)
        # other values in row 0's padding (even non-finite ones) and 4 more padding tokens per row
        repad = text.clone()
        repad[0, 3], repad[0, 4, :3] = 1e3, torch.tensor([float("nan"), float("inf"), -float("inf")])
        longer = torch.cat([repad, 50 * torch.randn(2, 4, TEXT_DIM)], dim=1)
        longer_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
        padded = net(x, t, text=longer, text_mask=longer_mask)
        # a real token changed: the text path matters, so the check above could fail
        changed = text.clone()
        changed[0, 1] += 1.0
        moved = net(x, t, text=changed, text_mask=mask)
    torch.testing.assert_close(padded, base, atol=1e-5, rtol=1e-5)
    assert (moved[0] - base[0]).abs().max() > 1e-4
    torch.testing.assert_close(moved[1], base[1])  # rows are independent


@pytest.mark.parametrize("arch", ARCHS)
def test_empty_caption_is_finite_and_equals_no_text(arch):
    net = _perturbed(_text_cfg(arch))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.4, 0.6])
    text, mask = _text_batch()
    with torch.no_grad():
        none = net(x, t)
        empty = net(x, t, text=text, text_mask=torch.zeros_like(mask))
        zero_tokens = net(x, t, text=text[:, :0], text_mask=mask[:, :0])
        with_text = net(x, t, text=text, text_mask=mask)
        no_mask = net(x, t, text=text)  # text_mask=None: every token is real
        all_real = net(x, t, text=text, text_mask=torch.ones_like(mask))
    assert torch.isfinite(none).all() and torch.isfinite(empty).all()
    torch.testing.assert_close(empty, none, atol=1e-5, rtol=1e-5)  # the null token alone either way
    torch.testing.assert_close(zero_tokens, none, atol=1e-5, rtol=1e-5)
    assert (with_text - none).abs().max() > 1e-4
    torch.testing.assert_close(no_mask, all_real)


@pytest.mark.parametrize("arch", ARCHS)
def test_pooled_embedding_changes_the_output(arch):
    net = _perturbed(_text_cfg(arch))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.4, 0.6])
    text, mask = _text_batch()
    pooled = torch.randn(2, POOLED_DIM)
    with torch.no_grad():
        a = net(x, t, text=text, text_mask=mask, pooled=pooled)
        b = net(x, t, text=text, text_mask=mask, pooled=pooled + 1.0)
        none = net(x, t, text=text, text_mask=mask)
        zero = net(x, t, text=text, text_mask=mask, pooled=torch.zeros(2, POOLED_DIM))
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(none, zero)  # pooled=None is the zero vector
    with pytest.raises(ValueError, match="pooled must be"):
        net(x, t, pooled=torch.randn(2, POOLED_DIM + 1))


@pytest.mark.parametrize("arch", ARCHS)
def test_text_free_configs_ignore_text(arch):
    size = "dit-tiny" if arch == "dit" else "tiny"
    net = _perturbed(denoiser.config_for(size))
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    text, mask = _text_batch()
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, text=text, text_mask=mask, pooled=torch.randn(2, 3)), net(x, t))
    assert not any("cross" in k or "text" in k or "pooled" in k for k in net.state_dict())


def test_unet_cross_attention_sits_at_the_lowest_levels_and_starts_as_identity():
    cfg = denoiser.config_for("small", text_dim=TEXT_DIM)  # widths (64, 128), 2 blocks per level
    net = UNet(cfg)
    assert net.mid_cross is not None
    assert len(net.down_cross) == 2 and len(net.up_cross) == 3  # the 128-wide level only
    assert all(m.norm.num_channels == 128 for m in [*net.down_cross.values(), *net.up_cross.values()])
    assert len(UNet(denoiser.config_for("small", text_dim=TEXT_DIM, text_levels=2)).down_cross) == 4
    # zero-initialised outputs: perturbing all but the cross-attention, the text changes nothing yet
    torch.manual_seed(0)
    with torch.no_grad():
        for m in [net.conv_out] + [b.conv2 for b in net.modules() if isinstance(b, unet.Block)]:
            m.weight.normal_(0.0, 0.05)
        x, t = torch.randn(1, 4, 8, 8), torch.rand(1)
        text = torch.randn(1, 4, TEXT_DIM)
        torch.testing.assert_close(net(x, t, text=text), net(x, t))
    with pytest.raises(ConfigError, match="text_levels"):
        denoiser.config_for("tiny", text_dim=8, text_levels=3)
    with pytest.raises(ConfigError, match="heads=5"):
        denoiser.config_for("tiny", text_dim=8, heads=5)


# --------------------------------------------------------------------------- registry


def test_registry_names_configs_and_grid_multiples():
    assert set(denoiser.ARCHITECTURES["unet"].sizes) == {"tiny", "small", "base", "large"}
    for name in ["dit-tiny", "dit-s", "dit-b", "dit-l", "dit-xl"]:
        cfg = denoiser.config_for(name, latent_channels=16)
        assert isinstance(cfg, DiTConfig) and cfg.patch == 2 and cfg.latent_channels == 16
        assert denoiser.architecture_of(cfg).name == "dit" and denoiser.grid_multiple(cfg) == 2
    assert {n: (c["hidden"], c["depth"], c["heads"]) for n, c in denoiser.ARCHITECTURES["dit"].sizes.items()} == {
        "dit-tiny": (64, 2, 2),
        "dit-s": (384, 12, 6),
        "dit-b": (768, 12, 12),
        "dit-l": (1024, 24, 16),
        "dit-xl": (1152, 28, 16),
    }
    unet = denoiser.config_for("base")
    assert isinstance(unet, UNetConfig) and denoiser.architecture_of(unet).name == "unet"
    assert denoiser.grid_multiple(unet) == 4 and denoiser.grid_multiple(denoiser.config_for("tiny")) == 2
    assert UNet(denoiser.config_for("tiny")).downsample_multiple == 2
    assert DiT(denoiser.config_for("dit-tiny", patch=4)).downsample_multiple == 4
    with pytest.raises(ConfigError, match=r"unknown denoiser size 'nope'; choose from \[.*'tiny'.*'dit-xl'\]"):
        denoiser.config_for("nope")
    with pytest.raises(ConfigError, match="multiple of heads"):
        DiTConfig(hidden=64, heads=3)


# DiT paper, table 4 (class-conditional ImageNet, 4 latent channels): S/2 33.0M, B/2 130.5M, L/2 458.0M,
# XL/2 675.0M. The paper's models also predict the variance (8 output channels); ours predict the
# velocity only, a few thousand parameters fewer.
PAPER = [("dit-s", 33.0e6), ("dit-b", 130.5e6), ("dit-l", 458.0e6), ("dit-xl", 675.0e6)]


@pytest.mark.parametrize(("name", "paper"), PAPER)
def test_dit_parameter_counts_match_the_paper(name, paper):
    cfg = denoiser.config_for(name, num_classes=1000)
    n = dit.param_count(cfg)  # on the meta device: nothing allocated
    assert abs(n - paper) / paper < 0.03
    if name == "dit-s":  # the meta count is the real one
        assert sum(p.numel() for p in DiT(cfg).parameters()) == n


@pytest.mark.parametrize("arch", ARCHS)
def test_config_dict_round_trips_through_json_and_keeps_the_weights(arch):
    cfg = _text_cfg(arch, num_classes=5, cond_channels=4)
    net = _perturbed(cfg)
    d = json.loads(json.dumps(denoiser.to_dict(cfg)))
    assert d["arch"] == arch and d["text_dim"] == TEXT_DIM and d["pooled_dim"] == POOLED_DIM
    assert denoiser.config_from_dict(d) == cfg
    back = denoiser.from_dict(d)
    assert type(back) is type(net) and back.cfg == cfg
    back.load_state_dict(net.state_dict())  # strict: the same parameters
    x, t, cond = torch.randn(1, 4, 8, 8), torch.rand(1), torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 2, TEXT_DIM)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x, t, cond=cond, text=text), net(x, t, cond=cond, text=text))


def test_old_unet_dict_without_arch_or_text_fields_loads():
    old = {
        "latent_channels": 4,
        "cond_channels": 0,
        "num_classes": 2,
        "widths": [32, 64],
        "blocks_per_level": 1,
        "attention": False,
        "groups": 8,
    }
    net = denoiser.from_dict(old)
    assert isinstance(net, UNet)
    assert net.cfg.text_dim == 0 and net.cfg.pooled_dim == 0 and net.cfg.widths == (32, 64)
    assert net.cfg == denoiser.config_for("tiny", num_classes=2)
    assert "arch" not in old  # not mutated
    with pytest.raises(ConfigError, match="unknown denoiser architecture 'mamba'"):
        denoiser.from_dict({**old, "arch": "mamba"})
    with pytest.raises(TypeError):
        denoiser.from_dict({**old, "bogus": 1})


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch", ARCHS)
def test_a_few_steps_lower_the_flow_matching_loss_with_text(arch):
    torch.manual_seed(0)
    cfg = _text_cfg(arch)
    net = denoiser.build(cfg).train()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.rand(4, generator=g)
    text = torch.randn(4, 3, TEXT_DIM, generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    pooled = torch.randn(4, POOLED_DIM, generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)

    def step() -> float:
        loss = flow.loss(lambda x_t, tt: net(x_t, tt, text=text, text_mask=mask, pooled=pooled), x0, t, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    losses = [step() for _ in range(12)]
    assert all(v == v for v in losses)  # no NaN
    assert losses[-1] < 0.8 * losses[0]


# --------------------------------------------------------------------------- loading a checkpoint


@pytest.mark.parametrize("arch", ARCHS)
def test_loading_builds_the_family_the_checkpoint_records(tmp_path, arch):
    from pipeline.io import checkpoint
    from pipeline.models import autoencoder, loading

    vae_dir = str(tmp_path / checkpoint.VAE_DIR)
    autoencoder.save_kl(autoencoder.new_kl("tiny", seed=0)[0], vae_dir)
    vae = autoencoder.load(vae_dir)
    cfg = _text_cfg(arch)
    net = _perturbed(cfg)
    model = denoiser.to_dict(cfg)
    if arch == "unet":  # an older checkpoint: no "arch", no text fields
        cfg = denoiser.config_for("tiny")
        net = _perturbed(cfg)
        model = {
            k: v
            for k, v in denoiser.to_dict(cfg).items()
            if k not in ("arch", "text_dim", "pooled_dim", "heads", "text_levels")
        }
    info = checkpoint.CheckpointInfo(kind="diffusion", model=model, latent_shape=[4, 8, 8], vae_identity=vae.identity)
    checkpoint.save(str(tmp_path), info, {"model": net.state_dict(), "ema": net.state_dict()})
    loaded = loading.load(str(tmp_path), device="cpu")
    assert type(loaded.denoiser) is type(net) and loaded.denoiser.cfg == cfg
    x, t = torch.randn(1, 4, 8, 8), torch.rand(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.denoiser(x, t), net(x, t))
