"""A base model's own objective (pipeline.models.objectives): the math is diffusers' own, read
from the scheduler config; and on a tiny SD-architecture UNet first trained on epsilon
("pretrained"), fine-tuning with its own objective keeps lowering its epsilon loss while a
wrong one (v-prediction, flow matching) raises it."""

from __future__ import annotations

import pytest
import torch
from tiny_bases import SD_SCHEDULER, tiny_unet

from pipeline.errors import ConfigError
from pipeline.models import objectives


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads contend and each step is slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SD2_V = {**SD_SCHEDULER, "prediction_type": "v_prediction"}
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def test_ddpm_noising_velocity_and_snr_are_diffusers_own():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    obj = objectives.from_scheduler_config(SD2_V)
    ref = DDPMScheduler.from_config(SD2_V)
    assert obj.kind == "v_prediction" and obj.num_train_timesteps == 1000
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = objectives.sample_timesteps(obj, 6, g)
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < 1000
    torch.testing.assert_close(objectives.noisy_latents(obj, x, n, t), ref.add_noise(x, n, t))
    torch.testing.assert_close(objectives.target(obj, x, n, t), ref.get_velocity(x, n, t))
    torch.testing.assert_close(objectives.snr(obj, t), compute_snr(ref, t))
    # Min-SNR weights exactly as train_text_to_image_lora.py weighs them
    s = compute_snr(ref, t)
    w = torch.stack([s, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]
    torch.testing.assert_close(objectives.snr_weights(obj, t, 5.0), w / (s + 1))
    eps = objectives.from_scheduler_config(SD_SCHEDULER)
    torch.testing.assert_close(objectives.snr_weights(eps, t, 5.0), w / s)
    assert objectives.target(eps, x, n, t) is n


def test_flow_timesteps_are_shifted_as_the_scheduler_shifts_its_own():
    from diffusers import FlowMatchEulerDiscreteScheduler

    obj = objectives.from_scheduler_config(SD3)
    assert (obj.kind, obj.shift) == ("flow", 3.0)
    sched = FlowMatchEulerDiscreteScheduler.from_config(SD3)
    u = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000  # the scheduler's unshifted training sigmas
    torch.testing.assert_close(objectives.timesteps_at(obj, u), sched.timesteps)
    x, n = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([0.0, 1000.0])
    noisy = objectives.noisy_latents(obj, x, n, t)
    torch.testing.assert_close(noisy[0], x[0])
    torch.testing.assert_close(noisy[1], n[1])
    torch.testing.assert_close(objectives.target(obj, x, n, t), n - x)
    with pytest.raises(ConfigError, match="DDPM noise schedule"):
        objectives.loss(obj, x, x, n, t, min_snr_gamma=5.0)


def test_logit_normal_sampling_favours_the_middle_and_noise_offset_shifts_means():
    obj = objectives.from_scheduler_config(SD_SCHEDULER)
    g = torch.Generator().manual_seed(1)
    uni = objectives.sample_timesteps(obj, 4000, g, "uniform").float()
    mid = objectives.sample_timesteps(obj, 4000, g, "logit-normal").float()
    share = lambda t: ((t > 250) & (t < 750)).float().mean()
    assert share(mid) > share(uni) + 0.15
    plain = objectives.sample_noise((64, 4, 8, 8), torch.Generator().manual_seed(2))
    offset = objectives.sample_noise((64, 4, 8, 8), torch.Generator().manual_seed(2), offset=0.5)
    assert plain.mean(dim=(2, 3)).std() < 0.2 < offset.mean(dim=(2, 3)).std()


def test_unsupported_scheduler_configs_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="prediction_type 'bogus'"):
        objectives.from_scheduler_config({**SD_SCHEDULER, "prediction_type": "bogus"})
    with pytest.raises(ConfigError, match="use_dynamic_shifting"):
        objectives.from_scheduler_config({**SD3, "use_dynamic_shifting": True})
    with pytest.raises(ConfigError, match="timestep sampling"):
        objectives.sample_timesteps(objectives.from_scheduler_config(SD_SCHEDULER), 2, None, "cosine")


def _data(n: int = 32):
    """Structured latents (smooth fields) with a text embedding each, and a fixed evaluation set."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(n, 4, 2, 2, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)
    text = torch.randn(n, 6, 32, generator=g)
    return x, text


def _eps_loss(unet, obj, x, text) -> float:
    """The model's epsilon loss on a fixed set of (noise, t) per sample."""
    g = torch.Generator().manual_seed(123)
    losses = []
    with torch.no_grad():
        for _ in range(4):
            n = torch.randn(x.shape, generator=g)
            t = objectives.sample_timesteps(obj, x.shape[0], g)
            out = unet(objectives.noisy_latents(obj, x, n, t), t, encoder_hidden_states=text).sample
            losses.append(float(((out - n) ** 2).mean()))
    return sum(losses) / len(losses)


def _train(unet, obj, x, text, steps: int, lr: float, seed: int):
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (8,), generator=g)
        x0, c = x[idx], text[idx]
        n = objectives.sample_noise(x0.shape, g)
        t = objectives.sample_timesteps(obj, 8, g)
        out = unet(objectives.noisy_latents(obj, x0, n, t), t, encoder_hidden_states=c).sample
        objectives.loss(obj, out, x0, n, t).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_the_right_objective_improves_a_pretrained_model_and_wrong_ones_damage_it():
    import copy

    torch.manual_seed(0)
    x, text = _data()
    eps = objectives.from_scheduler_config(SD_SCHEDULER)
    pretrained = tiny_unet("sd")
    _train(pretrained, eps, x, text, steps=120, lr=1e-3, seed=1)
    before = _eps_loss(pretrained, eps, x, text)
    after = {}
    for name, config in (("epsilon", SD_SCHEDULER), ("v_prediction", SD2_V), ("flow", SD3)):
        model = copy.deepcopy(pretrained)
        _train(model, objectives.from_scheduler_config(config), x, text, steps=40, lr=2e-4, seed=2)
        after[name] = _eps_loss(model, eps, x, text)
    print({"pretrained": before, **after})
    assert after["epsilon"] < before
    assert after["v_prediction"] > before * 1.2 and after["flow"] > before * 1.05
