"""Differentiable image augmentations on batched [0, 1] tensors, shared by the defenses that draw views (MAC, R-TPT).

Every operation takes its parameters per image (one row each): a defense draws them from each image's own
stream (``ImageRandomness``), so results never depend on batching, where torchvision's random transforms
draw from the global generator. Every operation is a tensor operation, so an adaptive attack differentiates
through the views. Each reproduces torchvision's or PIL's operation for the same parameters, to the
details noted on it; the tests compare them. The defenses keep their own draws, the ranges those map to
and the order in which they apply the operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

# The input side the successors' pixel-unit settings were chosen at (CSR's radius, MAC's blur, R-TPT's crops and
# AugMix amounts): on another side they scale with side / REFERENCE_SIDE.
REFERENCE_SIDE = 224

# torchvision's rgb_to_grayscale weights, which its contrast and saturation adjustments blend towards.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


# --- rows ------------------------------------------------------------------------------------------------


def per_image(values: torch.Tensor) -> torch.Tensor:
    """``(n,)`` values as ``(n, 1, 1, 1)``, so each image's own parameter broadcasts over its pixels."""
    return values.view(-1, 1, 1, 1)


def apply_to_rows(images: torch.Tensor, chosen: torch.Tensor,
                  transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``transform(images[chosen], chosen)`` in the chosen rows (an index tensor), the others unchanged.

    Out of place, so the result stays differentiable in every row, and an operation drawn for only
    some images costs nothing for the rest.
    """
    if len(chosen) == 0:
        return images
    return images.index_put((chosen,), transform(images[chosen], chosen))


def straight_through(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``after`` in the forward pass, the identity in the backward pass: a gradient through an operation
    whose own derivative is zero almost everywhere (equalize, posterize), or which BPDA approximates."""
    return before + (after - before).detach()


# --- geometry ----------------------------------------------------------------------------------------------


def sample_bilinear(images: torch.Tensor, grid: torch.Tensor, padding: str = "zeros",
                    coverage: bool = False) -> torch.Tensor:
    """``grid_sample`` at ``grid`` (normalised, ``align_corners=False``), the one sampler of every warp here.

    ``coverage`` also samples a mask that is 1 inside the input and multiplies by it: torchvision's fill
    on tensors does so, which fades the border pixels towards 0 rather than cutting them off.
    """
    if not coverage:
        return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    n, _, height, width = images.shape
    with_mask = torch.cat((images, images.new_ones(n, 1, height, width)), dim=1)
    sampled = F.grid_sample(with_mask, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return sampled[:, :-1] * sampled[:, -1:]


def pixel_affine_to_theta(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, e: torch.Tensor,
                          f: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``affine_grid``'s matrix for the pixel-coordinate map ``(x, y) -> (a x + b y + c, d x + e y + f)``
    from output to input (continuous coordinates, pixel centres at +0.5, as PIL's affine transform)."""
    ratio = height / width
    row_x = torch.stack([a, b * ratio, a + b * ratio + 2 * c / width - 1], dim=-1)
    row_y = torch.stack([d / ratio, e, d / ratio + e + 2 * f / height - 1], dim=-1)
    return torch.stack([row_x, row_y], dim=-2)


def warp(images: torch.Tensor, theta: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Each image through its own ``affine_grid`` matrix ``theta`` ``(n, 2, 3)``, bilinear, 0 beyond the edges:
    with ``pixel_affine_to_theta``, PIL's affine transform for a map given in pixels."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return sample_bilinear(images, grid, padding)


def affine(images: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rotate by ``angle`` degrees (clockwise on screen), scale and shift by ``shift`` = (dx, dy) pixels
    about the image centre; bilinear, fill 0, as torchvision's ``affine`` on a tensor with ``fill=0``.

    Each output pixel samples the input at the inverse map of its centre. torchvision also samples
    a coverage mask (1 inside the input) and multiplies by it; so does this, to give its numbers.
    """
    # Not through pixel_affine_to_theta and warp: the same map, but rounded otherwise (7e-5 apart at 224 px).
    n, _, height, width = images.shape
    radians = torch.deg2rad(angle).view(n, 1, 1)
    cos, sin = torch.cos(radians), torch.sin(radians)
    xs = torch.arange(width, device=images.device, dtype=images.dtype) - (width - 1) / 2
    ys = torch.arange(height, device=images.device, dtype=images.dtype) - (height - 1) / 2
    x = xs.view(1, 1, width) - shift[:, 0].view(n, 1, 1)
    y = ys.view(1, height, 1) - shift[:, 1].view(n, 1, 1)
    scale = scale.view(n, 1, 1)
    source_x = (cos * x + sin * y) / scale
    source_y = (cos * y - sin * x) / scale
    grid = torch.stack((source_x / (width / 2), source_y / (height / 2)), dim=-1)
    return sample_bilinear(images, grid, "zeros", coverage=True)


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Each image's crop ``(top, left, h, w)`` resized (bilinear) to the image's size, mirrored where ``flip``:
    RandomResizedCrop then RandomHorizontalFlip. Sampling stays inside the crop, as cropping first would."""
    height, width = images.shape[-2:]
    top, left, h, w = boxes.unbind(-1)
    zero = torch.zeros_like(top)
    scale_x = torch.where(flip, -w / width, w / width)
    shift_x = torch.where(flip, left + w, left)
    theta = pixel_affine_to_theta(scale_x, zero, shift_x, zero, h / height, top, height, width)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    # Normalised coordinates of the crop's first and last pixel centres: bilinear sampling clamps there.
    low = torch.stack([2 * (left + 0.5) / width, 2 * (top + 0.5) / height], dim=-1) - 1
    high = torch.stack([2 * (left + w - 0.5) / width, 2 * (top + h - 0.5) / height], dim=-1) - 1
    grid = torch.max(torch.min(grid, high[:, None, None].to(grid.dtype)), low[:, None, None].to(grid.dtype))
    return sample_bilinear(images, grid, "border")


# torchvision's RandomResizedCrop defaults (R-TPT's and COLA's views; DBD narrows the scale).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10  # get_params tries 10 boxes before its fallback


def crop_boxes(crop: torch.Tensor, height: int, width: int, scale: tuple[float, float] = CROP_SCALE,
               ratio: tuple[float, float] = CROP_RATIO, positions: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop.get_params``, vectorised: ``(top, left, h, w)`` per row of ``crop``
    (``(..., attempts, 4)`` uniforms: area, log aspect ratio, top, left), the first valid attempt or, failing all,
    the centre. ``scale`` and ``ratio`` are the transform's (torchvision's defaults by default). Given
    ``positions`` (``(..., 2)``: top, left), ``crop`` holds only the first two uniforms of each attempt and the
    chosen box is placed by ``positions``, one draw after the attempts as ``get_params`` makes it. Computed in
    ``crop``'s dtype (float64 is Python's floats, as torchvision computes)."""
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * crop[..., 0])
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(low + (high - low) * crop[..., 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.int8).argmax(dim=-1, keepdim=True)  # the first valid attempt, 0 if none
    found = valid.any(dim=-1)
    h, w = (t.gather(-1, first).squeeze(-1) for t in (h, w))
    if positions is None:
        positions = crop[..., 2:4].gather(-2, first[..., None].expand(*first.shape, 2)).squeeze(-2)
    top = torch.minimum(torch.floor(positions[..., 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(positions[..., 1] * (width - w + 1)), width - w)
    # torchvision's fallback: the central crop, its aspect ratio clamped to ``ratio``.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    fallback = torch.tensor([(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w],
                            dtype=crop.dtype, device=crop.device)
    return torch.where(found[..., None], torch.stack((top, left, h, w), dim=-1), fallback)


# --- colour, as torchvision's ColorJitter ------------------------------------------------------------------


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """``(n, 1, H, W)`` luma with torchvision's weights: the target its contrast and saturation blend towards."""
    weights = images.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def blend(images: torch.Tensor, towards: torch.Tensor, factor: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """``factor * images + (1 - factor) * towards``, clamped to [0, 1] (torchvision's ``_blend``).

    ``clamp=False`` for a convex mix of images already in the box (AugMix's), which its code leaves unclamped.
    """
    factor = per_image(factor)
    mixed = factor * images + (1 - factor) * towards
    return mixed.clamp(0, 1) if clamp else mixed


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's brightness: a blend towards black, so ``factor`` scales every pixel."""
    return blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's contrast: a blend towards the image's mean gray level, one per image."""
    return blend(images, grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's saturation: a blend towards each pixel's own gray."""
    return blend(images, grayscale(images), factor)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` turns, keeping saturation and value.

    Through the chroma ``c = max - min`` rather than HSV's saturation, so no division by the
    value is needed; a gray pixel (c = 0) has no hue and is left as it is.
    """
    red, green, blue = images.unbind(dim=1)
    value = images.amax(dim=1)
    chroma = value - images.amin(dim=1)
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    sextant = torch.where(
        value == red, ((green - blue) / safe_chroma).remainder(6),
        torch.where(value == green, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4),
    )
    sextant = (sextant + 6 * shift.view(-1, 1, 1)).remainder(6)

    def channel(offset: int) -> torch.Tensor:
        k = (sextant + offset).remainder(6)
        return value - chroma * torch.minimum(k, 4 - k).clamp(0, 1)

    return torch.stack((channel(5), channel(3), channel(1)), dim=1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """A ``kernel_size`` square Gaussian blur with each image's own sigma, reflect-padded (torchvision's)."""
    n, channels, height, width = images.shape
    offsets = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - (kernel_size - 1) / 2
    profile = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1)) ** 2)
    profile = profile / profile.sum(dim=1, keepdim=True)
    kernels = profile[:, :, None] * profile[:, None, :]  # (n, k, k)
    kernels = kernels.repeat_interleave(channels, dim=0).unsqueeze(1)  # one per (image, channel)
    pad = kernel_size // 2
    padded = F.pad(images.reshape(1, n * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(padded, kernels, groups=n * channels).view(n, channels, height, width)


# --- PIL's ImageOps, as AugMix uses them --------------------------------------------------------------------


def _levels(images: torch.Tensor) -> torch.Tensor:
    """8-bit levels 0..255 of [0, 1] pixels."""
    return torch.round(images * 255).clamp(0, 255)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """PIL's ``autocontrast``: each channel stretched so its darkest pixel is 0 and its brightest 1."""
    low = images.amin(dim=(-2, -1), keepdim=True)
    high = images.amax(dim=(-2, -1), keepdim=True)
    spread = high - low
    flat = spread < 0.5 / 255  # one 8-bit level: PIL leaves such a channel alone
    return torch.where(flat, images, (images - low) / torch.where(flat, torch.ones_like(spread), spread))


def equalize(images: torch.Tensor) -> torch.Tensor:
    """PIL's ``equalize`` on 8-bit levels, per channel (its look-up table, written with tensors)."""
    m, channels, height, width = images.shape
    levels = _levels(images).long().view(m, channels, -1)
    counts = torch.zeros(m, channels, 256, dtype=torch.long, device=images.device).scatter_add_(
        2, levels, torch.ones_like(levels))
    present = counts > 0
    brightest = (present * torch.arange(256, device=images.device)).argmax(dim=-1, keepdim=True)
    step = (height * width - counts.gather(2, brightest)) // 255
    before = counts.cumsum(dim=-1) - counts
    table = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)
    keep = (present.sum(dim=-1, keepdim=True) <= 1) | (step == 0)
    table = torch.where(keep, torch.arange(256, device=images.device), table)
    return (table.gather(2, levels).to(images.dtype) / 255).view_as(images)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """PIL's ``posterize``: each image's 8-bit levels kept to its own number of high ``bits``."""
    bucket = per_image(torch.pow(2.0, 8 - bits))
    return torch.floor(_levels(images) / bucket) * bucket / 255


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """PIL's ``solarize``: pixels whose 8-bit level is at or above each image's ``threshold`` are inverted."""
    return torch.where(_levels(images) < per_image(threshold), images, 1 - images)
