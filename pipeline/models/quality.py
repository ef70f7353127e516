"""Image quality metrics on tensors in [-1, 1]: PSNR and SSIM (Gaussian window, per image)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _to01(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) tensors in [-1, 1]."""
    mse = ((_to01(a) - _to01(b)) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def psnr_y(a: torch.Tensor, b: torch.Tensor, border: int = 0) -> torch.Tensor:
    """Per-image PSNR in dB on the luma channel (ITU-R BT.601, as MATLAB's ``rgb2ycbcr``), with
    ``border`` pixels cropped on every side: the convention of the super-resolution literature
    (border = the scale factor), so numbers compare with published tables."""
    coeffs = torch.tensor([65.481, 128.553, 24.966], device=a.device).view(1, 3, 1, 1) / 255.0
    ya, yb = ((_to01(t) * coeffs).sum(1) + 16 / 255 for t in (a, b))
    if border:
        ya, yb = ya[:, border:-border, border:-border], yb[:, border:-border, border:-border]
    mse = ((ya - yb) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _window(size: int = 11, sigma: float = 1.5, channels: int = 3, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, 11x11 Gaussian window, valid region) in [-1, 1]."""
    x, y = _to01(a), _to01(b)
    c = x.shape[1]
    w = _window(channels=c, device=x.device)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)
