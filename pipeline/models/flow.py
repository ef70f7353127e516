"""Flow matching: the interpolation, the loss and the samplers, as plain functions of a model.

x_t = (1 - t) * x_0 + t * noise, t ~ logit-normal; the network predicts the velocity
v = noise - x_0. Sampling integrates dx/dt = v from t = t_start (1 for pure noise; < 1 for
SDEdit-style restoration from a noised input) down to 0 with Euler or Heun steps.
``model_fn(x, t) -> v`` is any callable: classifier-free guidance is a wrapper around it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_t(
    n: int,
    device,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    uniform_share: float = 0.0,
) -> torch.Tensor:
    """Logit-normal time samples in (0, 1); ``uniform_share`` of them uniform instead.

    Logit-normal sampling rarely visits t near 1, where restoration starts; task models mix in
    uniform times so the first step (the conditional mean of the residual) is well trained.
    """
    t = torch.sigmoid(torch.randn(n, generator=generator, device=device) * std + mean)
    if uniform_share > 0:
        u = torch.rand(n, generator=generator, device=device)
        pick = torch.rand(n, generator=generator, device=device) < uniform_share
        t = torch.where(pick, u, t)
    return t


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def loss(model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity."""
    v = model_fn(interpolate(x0, noise, t), t)
    return F.mse_loss(v.float(), (noise - x0).float())


def guided(
    model_fn: Callable[..., torch.Tensor], scale: float, cond: dict[str, Any], uncond: dict[str, Any] | None = None
) -> ModelFn:
    """Classifier-free guidance: v = v_uncond + scale * (v_cond - v_uncond).

    ``cond`` holds the keyword inputs of the conditional call (``y`` class ids, ``text`` tokens
    with ``text_mask``, ``pooled``); ``uncond`` those of the unconditional call (``y`` = -1, the
    empty-caption embedding). Both halves run as one batch; token sequences of different
    lengths are padded, with the padding masked. Without ``uncond`` or at scale 1 the
    conditional call alone runs.
    """

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 1.0 or not uncond:
            return model_fn(x, t, **cond)
        both = model_fn(torch.cat([x, x]), torch.cat([t, t]), **_stack_halves(cond, uncond))
        v_c, v_u = both.chunk(2)
        return v_u + scale * (v_c - v_u)

    return fn


def _stack_halves(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Concatenate two calls' keyword inputs along the batch (text padded to one length)."""
    out: dict[str, Any] = {}
    for key in a.keys() | b.keys():
        u, v = a.get(key), b.get(key)
        if u is None and v is None:
            out[key] = None
            continue
        if u is None or v is None:
            raise ValueError(f"guidance: {key!r} is given for only one half")
        if key in ("text", "text_mask") and u.shape[1] != v.shape[1]:
            n = max(u.shape[1], v.shape[1])
            u, v = (F.pad(z, (0, 0, 0, n - z.shape[1]) if key == "text" else (0, n - z.shape[1])) for z in (u, v))
        out[key] = torch.cat([u, v])
    return out


def timesteps(steps: int, t_start: float = 1.0, device=None) -> torch.Tensor:
    return torch.linspace(t_start, 0.0, steps + 1, device=device)


Step = Callable[[ModelFn, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def euler_step(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of the flow ODE dx/dt = v(x, t) from ``t`` to ``t_next``."""
    return x + (t_next - t) * model_fn(x, t.expand(x.shape[0]))


def heun_step(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One Heun step (Karras et al. 2022, algorithm 1): an Euler step corrected by the velocity
    at its end point; the last step, to t = 0, stays an Euler step."""
    v = model_fn(x, t.expand(x.shape[0]))
    x_euler = x + (t_next - t) * v
    if t_next <= 0:
        return x_euler
    v2 = model_fn(x_euler, t_next.expand(x.shape[0]))
    return x + (t_next - t) * 0.5 * (v + v2)


@torch.no_grad()
def integrate(
    step: Step,
    model_fn: ModelFn,
    x: torch.Tensor,
    steps: int,
    t_start: float = 1.0,
    callback: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Integrate from ``t_start`` to 0 in ``steps`` uniform steps of ``step``; ``callback(i, x)``
    may replace ``x`` after each step (inpainting re-imposes the known latents there)."""
    ts = timesteps(steps, t_start, x.device)
    for i in range(steps):
        x = step(model_fn, x, ts[i], ts[i + 1])
        if callback is not None:
            x = callback(i, x)
    return x


def euler(model_fn: ModelFn, x: torch.Tensor, steps: int, t_start: float = 1.0, callback=None) -> torch.Tensor:
    return integrate(euler_step, model_fn, x, steps, t_start, callback)


def heun(model_fn: ModelFn, x: torch.Tensor, steps: int, t_start: float = 1.0, callback=None) -> torch.Tensor:
    return integrate(heun_step, model_fn, x, steps, t_start, callback)


SAMPLERS = {"euler": euler, "heun": heun}
