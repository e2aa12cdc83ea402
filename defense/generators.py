"""The two generators of DHBE: G synthesises samples, Gp synthesises small trigger patches."""
from __future__ import annotations

import torch
from torch import nn

from defense.spec import InputSpec, require


class SampleGenerator(nn.Module):
    """G: z -> a synthetic image in normalised space (zero mean, unit variance per channel).

    Linear -> BN -> [upsample x2 -> conv3x3 -> BN -> LeakyReLU(0.2)] x2 -> conv3x3 -> tanh ->
    BN(affine=False), the shape of the official DHBE/DFAD generator; `width` is its ngf."""

    UPSAMPLINGS = 2

    def __init__(self, spec: InputSpec, latent_dim: int = 256, width: int = 64) -> None:
        super().__init__()
        factor = 2 ** self.UPSAMPLINGS
        require(spec.height % factor == 0 and spec.width % factor == 0,
                f"the sample generator needs image sides divisible by {factor}; got {spec.height}x{spec.width} "
                f"(resize the data set, e.g. --image-size 16)")
        self.latent_dim = latent_dim
        self.base = (2 * width, spec.height // factor, spec.width // factor)
        self.project = nn.Sequential(nn.Linear(latent_dim, 2 * width * self.base[1] * self.base[2]),)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, spec.channels, 3, 1, 1),
            nn.Tanh(),
            nn.BatchNorm2d(spec.channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(z.shape[0], *self.base))


class TriggerGenerator(nn.Module):
    """Gp: z' -> a patch in [-amplitude, amplitude] (pixel space), one per latent vector.

    Linear -> BN -> conv3x3 -> BN(affine=False) -> tanh, as in the official code."""

    def __init__(self, channels: int, patch_size: int | tuple[int, int], latent_dim: int = 256, width: int = 64,
                 amplitude: float = 1.0) -> None:
        super().__init__()
        height, width_px = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
        require(height >= 1 and width_px >= 1, f"patch size must be >= 1, got {patch_size}")
        self.shape = (width, height, width_px)
        self.amplitude = amplitude
        self.project = nn.Sequential(nn.Linear(latent_dim, width * height * width_px),
                                     nn.BatchNorm1d(width * height * width_px))
        self.body = nn.Sequential(nn.Conv2d(width, channels, 3, 1, 1), nn.BatchNorm2d(channels, affine=False), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.amplitude * self.body(self.project(z).view(z.shape[0], *self.shape))


def paste_patches(images: torch.Tensor, patches: torch.Tensor, per_sample: bool, max_copies: int = 1,
                  generator: torch.Generator | None = None, replace: bool = False) -> torch.Tensor:
    """Paste Gp's patches onto images (pixel space).

    Official behaviour: `images + pad(patch)` at one random place for the whole batch (`random_pad`).
    Departures (config flags): a random place per sample (`per_sample`), 1..`max_copies` copies per
    sample, and `replace`, where the patch, mapped from [-1, 1] to [0, 1], replaces the pixels under it
    as a BadNets trigger does (overlapping copies are averaged)."""
    n, channels, height, width = images.shape
    k = patches.shape[-1]
    require(k <= min(height, width), f"a {k}x{k} patch does not fit {height}x{width} images")
    # replace: [-a, a] -> pixel values, clamped to the valid range [0, 1]
    values = ((patches + 1) / 2).clamp(0.0, 1.0) if replace else patches
    if not per_sample:
        row = int(torch.randint(0, height - k + 1, (1,), generator=generator, device=images.device))
        col = int(torch.randint(0, width - k + 1, (1,), generator=generator, device=images.device))
        padding = (col, width - k - col, row, height - k - row)
        canvas = torch.nn.functional.pad(values, padding)
        if not replace:
            return images + canvas
        mask = torch.nn.functional.pad(torch.ones_like(values), padding)
        return images * (1 - mask) + canvas
    copies = torch.randint(1, max_copies + 1, (n,), generator=generator, device=images.device)
    offsets = torch.arange(k, device=images.device)
    batch_idx = torch.arange(n, device=images.device)[:, None, None].expand(n, k, k)
    values = values.permute(0, 2, 3, 1)
    canvas = torch.zeros(n, height, width, channels, dtype=images.dtype, device=images.device)
    count = torch.zeros(n, height, width, 1, dtype=images.dtype, device=images.device)
    for copy_index in range(max_copies):
        rows = torch.randint(0, height - k + 1, (n,), generator=generator, device=images.device)
        cols = torch.randint(0, width - k + 1, (n,), generator=generator, device=images.device)
        row_idx = (rows[:, None] + offsets)[:, :, None].expand(n, k, k)
        col_idx = (cols[:, None] + offsets)[:, None, :].expand(n, k, k)
        active = (copy_index < copies).to(values.dtype)[:, None, None, None]
        canvas = canvas.index_put((batch_idx, row_idx, col_idx), values * active, accumulate=True)
        count = count.index_put((batch_idx, row_idx, col_idx), active.expand(n, k, k, 1), accumulate=True)
    canvas, count = canvas.permute(0, 3, 1, 2), count.permute(0, 3, 1, 2)
    if not replace:
        return images + canvas
    covered = count > 0
    return torch.where(covered, canvas / count.clamp_min(1), images)


def blend_patterns(images: torch.Tensor, patterns: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """(1 - alpha) x + alpha p: a full-image pattern blended in, as a blended trigger is (Chen et al.
    2017); `patterns` in [-1, 1] (the generator's tanh) are mapped to pixel values in [0, 1], `alpha` is
    a float or one ratio per sample."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(images).view(-1, 1, 1, 1)
    return (1 - alpha) * images + alpha * ((patterns + 1) / 2).clamp(0.0, 1.0)
