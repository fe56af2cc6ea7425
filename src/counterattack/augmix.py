"""R-TPT's views (TPT's augmenter): a random resized crop and flip, then AugMix, as batched tensor operations.

Each image's parameters come from its own stream (``draw_views``), so a view does not depend on the batch; every
operation reproduces PIL's for the same parameters (``tests/test_rtpt.py`` compares them), and the views are
differentiable, the piecewise-constant colour operations passing their gradient straight through where asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .augment import (
    CROP_ATTEMPTS, REFERENCE_SIDE, apply_to_rows, autocontrast, blend, crop_and_resize, crop_boxes, equalize,
    pixel_affine_to_theta, posterize, solarize, straight_through, warp,
)
from .randomness import ImageRandomness

# AugMix's operations as the R-TPT code lists them (augmix_ops.augmentations), in that order.
AUGMIX_OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x",
              "translate_y")
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
ZERO_GRADIENT_OPS = ("equalize", "posterize")  # piecewise constant in the pixels
AUGMIX_CHAINS = 3
AUGMIX_MAX_DEPTH = 3  # each chain applies 1-3 operations

# --- the views -------------------------------------------------------------------------------------


@dataclass
class ViewDraws:
    """Each image's random parameters for its ``views - 1`` augmented views (uniforms in [0, 1) unless noted)."""

    crop: torch.Tensor  # (n, views-1, attempts, 4): area scale, log aspect ratio, top, left
    flip: torch.Tensor  # (n, views-1)
    mixing: torch.Tensor  # (n, views-1, chains + 1): chain weights (as exponentials), then the blend
    depth: torch.Tensor  # (n, views-1, chains)
    op: torch.Tensor  # (n, views-1, chains, max depth)
    level: torch.Tensor  # (n, views-1, chains, max depth), uniform in [0.1, severity) as AugMix samples it
    sign: torch.Tensor  # (n, views-1, chains, max depth)

    def __getitem__(self, images: slice) -> "ViewDraws":
        return ViewDraws(*(getattr(self, name)[images] for name in self.__dataclass_fields__))


def draw_views(rng: ImageRandomness, views: int, severity: float, device: torch.device) -> ViewDraws:
    """The next draws of every image's stream for its augmented views (seven draws, whatever the batch)."""
    extra = views - 1
    return ViewDraws(
        crop=rng.uniform(extra, CROP_ATTEMPTS, 4, device=device),
        flip=rng.uniform(extra, device=device),
        mixing=rng.uniform(extra, AUGMIX_CHAINS + 1, device=device),
        depth=rng.uniform(extra, AUGMIX_CHAINS, device=device),
        op=rng.uniform(extra, AUGMIX_CHAINS, AUGMIX_MAX_DEPTH, device=device),
        level=rng.uniform(extra, AUGMIX_CHAINS, AUGMIX_MAX_DEPTH, low=0.1, high=severity, device=device),
        sign=rng.uniform(extra, AUGMIX_CHAINS, AUGMIX_MAX_DEPTH, device=device),
    )


def _op_theta(op: torch.Tensor, level: torch.Tensor, sign: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The affine map of AugMix's geometric operations (rotate, shear, translate) at ``level``."""
    one, zero = torch.ones_like(level), torch.zeros_like(level)
    # AugMix: int_parameter(level, 30) degrees, float_parameter(level, 0.3) shear, int_parameter(level, 224/3) px.
    angle = torch.deg2rad(torch.floor(level * 30 / 10)) * sign
    shear = level * 0.3 / 10 * sign
    shift = torch.floor(level * REFERENCE_SIDE / 3 / 10) * sign
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = width / 2, height / 2
    candidates = {  # (a, b, c, d, e, f) from output to input pixel coordinates
        "rotate": (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy),  # about the centre, as PIL
        "shear_x": (one, shear, zero, zero, one, zero),  # about the top-left corner, as PIL
        "shear_y": (one, zero, zero, shear, one, zero),
        "translate_x": (one, zero, shift * width / REFERENCE_SIDE, zero, one, zero),
        "translate_y": (one, zero, zero, zero, one, shift * height / REFERENCE_SIDE),
    }
    coefficients = [one, zero, zero, zero, one, zero]
    for name, values in candidates.items():
        chosen = op == AUGMIX_OPS.index(name)
        coefficients = [torch.where(chosen, v, current) for v, current in zip(values, coefficients, strict=True)]
    return pixel_affine_to_theta(*coefficients, height, width)


def _autocontrast(images: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    return autocontrast(images)  # AugMix ignores the level


def _equalize(images: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    return equalize(images)  # AugMix ignores the level


def _posterize(images: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """AugMix's posterize to ``4 - int_parameter(level, 4)`` bits."""
    return posterize(images, 4 - torch.floor(level * 4 / 10))


def _solarize(images: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """AugMix's solarize: levels at or above ``256 - int_parameter(level, 256)`` are inverted."""
    return solarize(images, 256 - torch.floor(level * 256 / 10))


# AugMix's colour operations as functions of the images and each image's level.
PIXEL_OPS = {"autocontrast": _autocontrast, "equalize": _equalize, "posterize": _posterize, "solarize": _solarize}


def _augmix_chains(chains: torch.Tensor, draws: ViewDraws, method: str | None) -> torch.Tensor:
    """Apply each chain's 1-3 random operations; ``chains`` is ``(n * (views-1) * chains, 3, H, W)``."""
    height, width = chains.shape[-2:]
    depth = 1 + torch.floor(draws.depth * AUGMIX_MAX_DEPTH).flatten()  # np.random.randint(1, 4)
    ops = torch.floor(draws.op * len(AUGMIX_OPS)).long().flatten(0, -2)  # np.random.choice(aug_list)
    levels = draws.level.flatten(0, -2)
    signs = torch.where(draws.sign > 0.5, -1.0, 1.0).flatten(0, -2)
    geometric = torch.tensor([name in GEOMETRIC_OPS for name in AUGMIX_OPS], device=chains.device)
    for step in range(AUGMIX_MAX_DEPTH):
        active = step < depth
        op, level, sign = ops[:, step], levels[:, step], signs[:, step]

        # The closures run within this step (apply_to_rows calls them at once), so binding this step's draws is exact.
        def geometric_op(x: torch.Tensor, rows: torch.Tensor, op=op, level=level, sign=sign) -> torch.Tensor:
            return warp(x, _op_theta(op[rows], level[rows], sign[rows], height, width))

        # Every chain takes one operation per step: the operations' rows are disjoint, so their order is moot.
        chains = apply_to_rows(chains, (active & geometric[op]).nonzero().flatten(), geometric_op)
        for name, apply in PIXEL_OPS.items():
            passed = method == "bpda" or (method == "exact" and name in ZERO_GRADIENT_OPS)

            def colour_op(x: torch.Tensor, rows: torch.Tensor, apply=apply, passed=passed, level=level) -> torch.Tensor:
                after = apply(x, level[rows])
                return straight_through(x, after) if passed else after

            chains = apply_to_rows(chains, (active & (op == AUGMIX_OPS.index(name))).nonzero().flatten(), colour_op)
    return chains


def render_views(images: torch.Tensor, draws: ViewDraws, augmentation: str = "augmix",
                 method: str | None = None) -> torch.Tensor:
    """``(n, views, 3, H, W)``: each image itself, then its augmented views (the image's own resolution).

    ``method`` ("exact", "bpda" or None) says which colour operations pass their gradient straight
    through (see the module's docstring); the geometry and the mixing are always differentiated.
    """
    n, channels, height, width = images.shape
    extra = draws.flip.shape[1]
    repeated = images.repeat_interleave(extra, dim=0)
    boxes = crop_boxes(draws.crop, height, width).flatten(0, 1)
    cropped = crop_and_resize(repeated, boxes, draws.flip.flatten() < 0.5)
    if augmentation == "crop-flip":
        views = cropped
    else:
        chains = _augmix_chains(cropped.repeat_interleave(AUGMIX_CHAINS, dim=0), draws, method)
        exponentials = -torch.log1p(-draws.mixing[..., :AUGMIX_CHAINS])  # Dirichlet(1, 1, 1) = normalised Exp(1)
        chain_weights = (exponentials / exponentials.sum(dim=-1, keepdim=True)).flatten(0, 1)
        mix = (chain_weights[:, :, None, None, None]
               * chains.view(n * extra, AUGMIX_CHAINS, channels, height, width)).sum(1)
        views = blend(cropped, mix, draws.mixing[..., AUGMIX_CHAINS].flatten(), clamp=False)  # Beta(1, 1) = uniform
    return torch.cat([images[:, None], views.view(n, extra, channels, height, width)], dim=1)
