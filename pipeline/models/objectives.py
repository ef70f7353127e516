"""A pretrained diffusers model's own training objective, read from its scheduler config.

A base model was trained with one objective, and fine-tuning it with another damages it within
minutes (docs/ARCHITECTURE.md has the measurement). Its ``scheduler/scheduler_config.json``
says which:

* a DDPM-family scheduler (DDPM, DDIM, PNDM, Euler, ...): ``prediction_type`` ``epsilon``,
  ``v_prediction`` or ``sample`` under its betas (``DDPMScheduler.from_config`` builds the
  ``alphas_cumprod``, so ``beta_schedule``, ``rescale_betas_zero_snr`` and the rest mean what
  diffusers means); integer timesteps in ``[0, num_train_timesteps)``;
* ``FlowMatchEulerDiscreteScheduler`` (SD3): rectified flow, ``x_t = (1 - s) x0 + s noise``,
  target ``noise - x0``, the sigma ``s`` shifted by ``shift`` (``s' = shift s / (1 + (shift - 1)
  s)``, as the scheduler shifts its own), timestep ``s' * num_train_timesteps``.

Everything after :func:`from_scheduler_config` is a pure function of (model output, latents,
noise, timesteps): :func:`noisy_latents`, :func:`target`, :func:`loss`, with the options
diffusers' training scripts have: :func:`sample_timesteps` (uniform, logit-normal, or SD3's
"mode" density; ``diffusers.training_utils.compute_density_for_timestep_sampling`` with the SD3
example's defaults), ``min_snr_gamma`` (Min-SNR weighting exactly as
``diffusers.training_utils.compute_snr`` and the text-to-image examples weigh epsilon and
v-prediction), ``weighting`` (flow: SD3's ``sigma_sqrt`` / ``cosmap`` loss weights over sigma,
exactly as ``compute_loss_weighting_for_sd3``) and :func:`sample_noise`'s ``noise_offset``.

Flow timesteps: SD3's example draws ``u`` and takes the scheduler's ``timesteps[u * T]``, a
descending table, so its sigma is the shifted ``1 - u``; here it is the shifted ``u``. The three
densities of ``u`` are symmetric about 1/2, so both give the same distribution of sigma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.errors import ConfigError

KINDS = ("epsilon", "v_prediction", "sample", "flow")
SAMPLINGS = ("uniform", "logit-normal", "mode")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")  # flow loss weights over sigma (SD3's --weighting_scheme)
MODE_SCALE = 1.29  # the SD3 example's --mode_scale
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


@dataclass(frozen=True)
class Objective:
    """What a model predicts and under which noise schedule."""

    kind: str  # one of KINDS
    num_train_timesteps: int
    scheduler: str  # the scheduler class it was read from
    alphas_cumprod: torch.Tensor | None = None  # DDPM kinds: (num_train_timesteps,) float64
    shift: float = 1.0  # flow: the sigma shift

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint records (the schedule itself is the base's)."""
        return {
            "kind": self.kind,
            "num_train_timesteps": self.num_train_timesteps,
            "scheduler": self.scheduler,
            "shift": self.shift,
        }


def from_scheduler_config(config: dict[str, Any], where: str = "scheduler") -> Objective:
    """The objective a base model was trained with, from its scheduler config (one line on error)."""
    cls = config.get("_class_name", "")
    steps = int(config.get("num_train_timesteps", 1000))
    if cls in FLOW_SCHEDULERS:
        if config.get("use_dynamic_shifting"):
            raise ConfigError(f"{where}: {cls} with use_dynamic_shifting (resolution-dependent shift) is not supported")
        return Objective("flow", steps, cls, shift=float(config.get("shift", 1.0)))
    kind = config.get("prediction_type", "epsilon")
    if kind not in KINDS[:3]:
        raise ConfigError(f"{where}: prediction_type {kind!r}; supported: epsilon, v_prediction, sample")
    from diffusers import DDPMScheduler

    try:
        ddpm = DDPMScheduler.from_config({k: v for k, v in config.items() if k != "_class_name"})
    except (ValueError, NotImplementedError, TypeError) as exc:
        raise ConfigError(f"{where}: a {cls or 'scheduler'} whose noise schedule cannot be built ({exc})") from None
    return Objective(kind, steps, cls or "DDPMScheduler", alphas_cumprod=ddpm.alphas_cumprod.double())


def sample_timesteps(
    obj: Objective, n: int, generator: torch.Generator | None = None, sampling: str = "uniform"
) -> torch.Tensor:
    """``n`` training timesteps, as the model takes them: integers for DDPM kinds, floats in
    ``[0, num_train_timesteps]`` (the shifted sigma times the count) for flow.

    ``uniform``: u ~ U(0, 1); ``logit-normal``: u = sigmoid(N(0, 1)) (SD3's default), which
    favours the middle of the schedule; ``mode``: u = 1 - v - 1.29 (cos^2(pi v / 2) - 1 + v),
    v ~ U(0, 1) (SD3's mode density, which also favours the middle)."""
    if sampling not in SAMPLINGS:
        raise ConfigError(f"timestep sampling {sampling!r}; expected one of {SAMPLINGS}")
    if sampling == "logit-normal":
        u = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        u = torch.rand(n, generator=generator)
    if sampling == "mode":
        u = 1 - u - MODE_SCALE * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return timesteps_at(obj, u)


def timesteps_at(obj: Objective, u: torch.Tensor) -> torch.Tensor:
    """The timesteps at the quantiles ``u`` in [0, 1]: ``floor(u T)`` for DDPM kinds; for flow
    the sigma ``u`` shifted as ``FlowMatchEulerDiscreteScheduler`` shifts its own, times ``T``."""
    if obj.kind == "flow":
        s = obj.shift * u / (1 + (obj.shift - 1) * u)
        return s * obj.num_train_timesteps
    return (u * obj.num_train_timesteps).long().clamp_(0, obj.num_train_timesteps - 1)


def sample_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None, offset: float = 0.0):
    """Gaussian noise; ``offset`` adds a per-sample, per-channel constant (noise offset, as the
    diffusers examples do: ``noise + offset * randn(B, C, 1, 1)``) so the model learns to move
    an image's mean brightness."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], *([1] * (len(shape) - 2))), generator=generator)
    return noise


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _alphas(obj: Objective, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) broadcast over ``like``."""
    assert obj.alphas_cumprod is not None
    a = obj.alphas_cumprod[t.long().cpu()]
    return _expand(a.sqrt(), like), _expand((1 - a).sqrt(), like)


def _sigma(obj: Objective, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return _expand(t.double().cpu() / obj.num_train_timesteps, like)


def noisy_latents(obj: Objective, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model input at timesteps ``t`` (``DDPMScheduler.add_noise``, or the flow interpolation)."""
    if obj.kind == "flow":
        s = _sigma(obj, t, latents)
        return (1 - s) * latents + s * noise
    a, b = _alphas(obj, t, latents)
    return a * latents + b * noise


def target(obj: Objective, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the model should output: the noise, the velocity (``DDPMScheduler.get_velocity``),
    the clean latents, or the flow's ``noise - latents``."""
    if obj.kind == "epsilon":
        return noise
    if obj.kind == "sample":
        return latents
    if obj.kind == "flow":
        return noise - latents
    a, b = _alphas(obj, t, latents)
    return a * noise - b * latents


def snr(obj: Objective, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar / (1 - alpha_bar) at ``t`` (``diffusers.training_utils.compute_snr``)."""
    if obj.alphas_cumprod is None:
        raise ConfigError("min-snr weighting needs a DDPM noise schedule; a flow model has none")
    a = obj.alphas_cumprod[t.long().cpu()]
    return (a / (1 - a)).float().to(t.device)


def snr_weights(obj: Objective, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights per sample, as diffusers' text-to-image examples compute them:
    ``min(snr, gamma) / snr`` for epsilon, ``/ (snr + 1)`` for v-prediction, unchanged for sample."""
    s = snr(obj, t)
    w = torch.minimum(s, torch.full_like(s, gamma))
    if obj.kind == "epsilon":
        return w / s
    if obj.kind == "v_prediction":
        return w / (s + 1)
    return w


def flow_weights(obj: Objective, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """SD3's loss weights per sample at ``t`` (``compute_loss_weighting_for_sd3``): ``sigma_sqrt``
    sigma^-2, ``cosmap`` 2 / (pi (1 - 2 sigma + 2 sigma^2)), ``none`` 1."""
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if obj.kind != "flow" and weighting != "none":
        raise ConfigError(f"loss weighting {weighting!r} weighs a flow model's loss; this model is {obj.kind}")
    s = t.double().cpu() / obj.num_train_timesteps
    if weighting == "sigma_sqrt":
        return (s**-2.0).float().to(t.device)
    if weighting == "cosmap":
        return (2 / (math.pi * (1 - 2 * s + 2 * s**2))).float().to(t.device)
    return torch.ones_like(s).float().to(t.device)


def loss(
    obj: Objective,
    output: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    min_snr_gamma: float = 0.0,
    weighting: str = "none",
) -> torch.Tensor:
    """The mean squared error of ``output`` against the objective's target (in float32),
    weighted per sample by Min-SNR when ``min_snr_gamma`` > 0 or by a flow ``weighting``."""
    err = (output.float() - target(obj, latents, noise, t).float()) ** 2
    if not min_snr_gamma and weighting == "none":
        return err.mean()
    per_sample = err.mean(dim=tuple(range(1, err.ndim)))
    if min_snr_gamma:
        per_sample = per_sample * snr_weights(obj, t, min_snr_gamma).to(per_sample.device)
    if weighting != "none":
        per_sample = per_sample * flow_weights(obj, t, weighting).to(per_sample.device)
    return per_sample.mean()
