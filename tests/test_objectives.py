"""A base model's own objective (pipeline.models.objectives): the math is diffusers' own, read
from the scheduler config; and on a tiny SD-architecture UNet first trained on epsilon
("pretrained"), fine-tuning with its own objective keeps lowering its epsilon loss while a
wrong one (v-prediction, flow matching) raises it; likewise a tiny SD3 transformer on its
rectified flow against epsilon."""

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


def test_sd3s_mode_sampling_and_loss_weightings_are_diffusers_own():
    import math

    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    obj = objectives.from_scheduler_config(SD3)
    t = objectives.sample_timesteps(obj, 8, torch.Generator().manual_seed(3), "mode")
    u = compute_density_for_timestep_sampling("mode", 8, mode_scale=1.29, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(t, objectives.timesteps_at(obj, u))
    x, n, out = torch.randn(8, 4, 4, 4), torch.randn(8, 4, 4, 4), torch.randn(8, 4, 4, 4)
    sigmas = (t / 1000).reshape(-1, 1, 1, 1)
    for scheme in ("sigma_sqrt", "cosmap"):  # the SD3 example's loss, as it computes it
        w = compute_loss_weighting_for_sd3(scheme, sigmas)
        want = torch.mean((w * (out - (n - x)) ** 2).reshape(8, -1), 1).mean()
        torch.testing.assert_close(objectives.loss(obj, out, x, n, t, weighting=scheme), want)
    assert math.isclose(float(objectives.loss(obj, out, x, n, t)), float(((out - (n - x)) ** 2).mean()), rel_tol=1e-6)
    with pytest.raises(ConfigError, match="weighs a flow model"):
        eps = objectives.from_scheduler_config(SD_SCHEDULER)
        objectives.loss(eps, out, x, n, torch.zeros(8, dtype=torch.long), weighting="cosmap")


def test_logit_normal_and_mode_sampling_favour_the_middle_and_noise_offset_shifts_means():
    obj = objectives.from_scheduler_config(SD_SCHEDULER)
    g = torch.Generator().manual_seed(1)
    uni = objectives.sample_timesteps(obj, 4000, g, "uniform").float()
    mid = objectives.sample_timesteps(obj, 4000, g, "logit-normal").float()
    mode = objectives.sample_timesteps(obj, 4000, g, "mode").float()
    share = lambda t: ((t > 250) & (t < 750)).float().mean()
    assert share(mid) > share(uni) + 0.15 and share(mode) > share(uni) + 0.1
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


def _loss(model, obj, x, cond) -> float:
    """The model's loss under ``obj`` on a fixed set of (noise, t) per sample; ``cond(idx)`` gives
    its conditioning keyword arguments for the samples ``idx``."""
    g = torch.Generator().manual_seed(123)
    losses = []
    with torch.no_grad():
        for _ in range(4):
            n = torch.randn(x.shape, generator=g)
            t = objectives.sample_timesteps(obj, x.shape[0], g)
            out = model(objectives.noisy_latents(obj, x, n, t), timestep=t, **cond(slice(None))).sample
            losses.append(float(objectives.loss(obj, out, x, n, t)))
    return sum(losses) / len(losses)


def _train(model, obj, x, cond, steps: int, lr: float, seed: int):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (8,), generator=g)
        x0 = x[idx]
        n = objectives.sample_noise(x0.shape, g)
        t = objectives.sample_timesteps(obj, 8, g)
        out = model(objectives.noisy_latents(obj, x0, n, t), timestep=t, **cond(idx)).sample
        objectives.loss(obj, out, x0, n, t).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_the_right_objective_improves_a_pretrained_model_and_wrong_ones_damage_it():
    import copy

    torch.manual_seed(0)
    x, text = _data()

    def cond(idx):
        return {"encoder_hidden_states": text[idx]}

    eps = objectives.from_scheduler_config(SD_SCHEDULER)
    pretrained = tiny_unet("sd")
    _train(pretrained, eps, x, cond, steps=120, lr=1e-3, seed=1)
    before = _loss(pretrained, eps, x, cond)
    after = {}
    for name, config in (("epsilon", SD_SCHEDULER), ("v_prediction", SD2_V), ("flow", SD3)):
        model = copy.deepcopy(pretrained)
        _train(model, objectives.from_scheduler_config(config), x, cond, steps=40, lr=2e-4, seed=2)
        after[name] = _loss(model, eps, x, cond)
    print({"pretrained": before, **after})
    assert after["epsilon"] < before
    assert after["v_prediction"] > before * 1.2 and after["flow"] > before * 1.05


def test_sd3s_own_flow_objective_improves_a_pretrained_model_and_a_wrong_one_damages_it(tmp_path):
    """The same on a tiny SD3 transformer, called through its family's TRAINING entry: first
    trained on its own rectified flow (its base's scheduler: shift 3), fine-tuning on flow keeps
    lowering its flow loss, epsilon prediction raises it."""
    import copy

    from test_base_models import build_sd3

    from pipeline.models import base as basemod

    base = basemod.open_base(build_sd3(str(tmp_path / "sd3")))
    flow = objectives.from_scheduler_config(base.scheduler_config())
    assert (flow.kind, flow.shift) == ("flow", 3.0)
    torch.manual_seed(0)
    x, _ = _data()
    g = torch.Generator().manual_seed(0)
    text, pooled = torch.randn(len(x), 6, 96, generator=g), torch.randn(len(x), 40, generator=g)

    def cond(idx):
        n = len(text[idx])
        prompts = basemod.Prompts(text[idx], pooled[idx], None, torch.zeros(n, 6), torch.zeros(n, 2))
        return base.training.call(prompts, None)

    pretrained = base.load_denoiser().train()
    _train(pretrained, flow, x, cond, steps=300, lr=2e-3, seed=1)
    before = _loss(pretrained, flow, x, cond)
    after = {}
    for name, obj in (("flow", flow), ("epsilon", objectives.from_scheduler_config(SD_SCHEDULER))):
        model = copy.deepcopy(pretrained)
        _train(model, obj, x, cond, steps=40, lr=3e-4, seed=2)
        after[name] = _loss(model, flow, x, cond)
    print({"pretrained": before, **after})
    assert after["flow"] < before and after["epsilon"] > before * 1.08
