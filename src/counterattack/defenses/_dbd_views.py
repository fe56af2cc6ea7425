"""DBD's 31 transformed views (``dataset/transform_lib.py``, ``Augmenter.__call__``) as batched tensor operations.

Private to ``dbd.py`` (the leading underscore keeps the registry from importing it as a defense). Each view
family reproduces the library call the authors' code makes, to the details noted on it; ``tests/test_dbd.py``
compares each with a reference (torchvision and PIL, scipy.ndimage, PIL's JPEG codec, the bit-depth formula).

The authors' views start from an 8-bit PIL image. Here the input is float [0, 1] pixels; the three families
whose definition is 8-bit arithmetic (bit-depth reduction, JPEG, the noise view's truncation back to uint8)
read the image's 8-bit levels ``round(255 x)``, which are the image itself when it is 8-bit, as every image
the authors' code saw was. The crops and the three filters work on the pixels as given and are not rounded to
8 bits afterwards (PIL and OpenCV round their uint8 output: at most 0.5/255 per pixel).

Every view is computed twice over in one expression: a differentiable path on the float input and, where an
operation is not differentiable (a codec, a quantiser), its exact value joined by ``straight_through``, so an
adaptive attack's gradient passes those operations as the identity.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..augment import CROP_ATTEMPTS, crop_boxes, sample_bilinear, straight_through
from ..randomness import ImageRandomness

# The Augmenter's fixed settings (transform_lib.py).
CROPS = 16  # random_crop_resize_flip: RandomResizedCrop + RandomHorizontalFlip, 16 independent draws
CROP_SCALE = (0.5, 1.0)  # torchvision's ratio range and its 10 attempts (augment.py)
FLIP_PROBABILITY = 0.5
BIT_DEPTH = 3
BIT_DEPTH_ROUNDINGS = ("floor", "round", "ceil")
JPEG_QUALITIES = (50, 60, 75)
NOISE_VIEWS = 6
NOISE_SIGMA = 0.1
FILTER_SIDE = 5
# cv2.GaussianBlur(img, (5, 5), 0): with sigma 0 and an odd side up to 7 OpenCV takes a fixed binomial kernel
# (getGaussianKernel's small_gaussian_tab), not the sampled Gaussian of sigma 1.1 its formula would give.
BINOMIAL_5 = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)

# The order of the views in the authors' batch: the image, 16 crops, 3 bit depths, 3 JPEGs, 6 noisy, 3 filtered.
PIXEL_VIEWS = len(BIT_DEPTH_ROUNDINGS) + len(JPEG_QUALITIES) + NOISE_VIEWS + 3
VIEWS = 1 + CROPS + PIXEL_VIEWS


def eight_bit_levels(images: torch.Tensor) -> torch.Tensor:
    """The 8-bit levels 0..255 (as floats) nearest to [0, 1] pixels: ``ToTensor``'s inverse on an 8-bit image."""
    return torch.round(images.detach() * 255).clamp(0, 255)


# --- pixel views on 8-bit levels --------------------------------------------------------------------------


def bit_depth_levels(levels: torch.Tensor, rounding: str, bits: int = BIT_DEPTH) -> torch.Tensor:
    """``bit_depth_reduction``: ``rounding(L / 2^(8-bits)) * 2^(8-bits)`` cast to uint8.

    numpy's ``round`` is half to even, as ``torch.round``. The code's cast of 256 (``round`` from level 240 up,
    ``ceil`` above 224) to uint8 wraps to 0 on the x86 machines it ran on: those brightest pixels turn black.
    Reproduced, as the quirk is part of the views the authors' numbers come from.
    """
    interval = 2 ** (8 - bits)
    quantise = {"floor": torch.floor, "round": torch.round, "ceil": torch.ceil}[rounding]
    return torch.remainder(quantise(levels / interval) * interval, 256)


def jpeg_levels(levels: torch.Tensor, quality: int) -> torch.Tensor:
    """``jpeg_compression``: PIL's JPEG encoder at ``quality`` with its defaults (4:2:0 chroma), decoded again.
    On the host, one image at a time, as PIL works."""
    pixels = levels.to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()
    decoded = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).to(levels.device, levels.dtype)


def noisy_pixels(pixels: torch.Tensor, noise: torch.Tensor, sigma: float = NOISE_SIGMA) -> torch.Tensor:
    """``add_random_noise`` before its cast: ``clip(x + sigma * n, 0, 1)`` (``noise`` standard normal)."""
    return (pixels + sigma * noise).clamp(0, 1)


def truncated_levels(noisy: torch.Tensor) -> torch.Tensor:
    """``(x * 255).astype(np.uint8)`` on [0, 1] values: truncation, not rounding (0.5/255 darker on average)."""
    return torch.floor(noisy * 255)


# --- OpenCV's 5x5 filters ---------------------------------------------------------------------------------


def _per_channel(images: torch.Tensor, pad: int, mode: str) -> torch.Tensor:
    n, channels, height, width = images.shape
    return F.pad(images.reshape(n * channels, 1, height, width), (pad, pad, pad, pad), mode=mode)


def median_filter(images: torch.Tensor, side: int = FILTER_SIDE) -> torch.Tensor:
    """``cv2.medianBlur``: the median of each ``side`` x ``side`` window, per channel. Its borders replicate the
    edge pixel (OpenCV's median filter always does, whatever its other filters' default; checked against
    OpenCV 4.10 and 5.1). Differentiable as computed: the gradient reaches the pixel each median selects."""
    n, channels, height, width = images.shape
    windows = F.unfold(_per_channel(images, side // 2, "replicate"), side)  # (n * channels, side^2, H * W)
    return windows.median(dim=1).values.view(n, channels, height, width)


def _separable(images: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Correlation with ``taps`` along both axes, BORDER_REFLECT_101 (``F.pad``'s ``reflect``: d c b | a b c d),
    OpenCV's default border for ``cv2.blur`` and ``cv2.GaussianBlur``."""
    n, channels, height, width = images.shape
    padded = _per_channel(images, len(taps) // 2, "reflect")
    kernel = taps.to(images.dtype)
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1)).view(n, channels, height, width)


def box_filter(images: torch.Tensor, side: int = FILTER_SIDE) -> torch.Tensor:
    """``cv2.blur`` with a ``side`` x ``side`` window: the window's mean."""
    return _separable(images, torch.full((side,), 1 / side, device=images.device))


def gaussian_filter(images: torch.Tensor) -> torch.Tensor:
    """``cv2.GaussianBlur(img, (5, 5), 0)``: the binomial kernel (1, 4, 6, 4, 1) / 16 along each axis."""
    return _separable(images, torch.tensor(BINOMIAL_5, device=images.device))


# --- RandomResizedCrop + RandomHorizontalFlip ---------------------------------------------------------------


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, side: tuple[int, int]
                  ) -> torch.Tensor:
    """Each image's box ``(top, left, h, w)`` resized bilinearly to ``side`` (the code's ``size=224``, the model's
    input side), mirrored where ``flips``: torchvision's ``resized_crop`` (crop first, so sampling stays inside the
    crop) then ``hflip``. Output pixel centres map to ``left + (i + 0.5) w / W - 0.5`` in the input, clamped to the
    crop's first and last pixel centres: PIL's and torchvision's bilinear resize whenever it enlarges (every crop of
    an input no larger than the model's side). A crop larger than ``side`` is not antialiased, where PIL's is."""
    out_h, out_w = side
    n = len(images)
    height, width = images.shape[-2:]
    top, left, h, w = (b.to(images.dtype).view(n, 1, 1) for b in boxes.unbind(-1))
    rows = torch.arange(out_h, device=images.device, dtype=images.dtype).view(1, -1, 1)
    columns = torch.arange(out_w, device=images.device, dtype=images.dtype).view(1, 1, -1)
    columns = torch.where(flips.view(n, 1, 1), out_w - 1 - columns, columns)
    y = torch.minimum(torch.maximum(top + (rows + 0.5) * h / out_h - 0.5, top), top + h - 1)
    x = torch.minimum(torch.maximum(left + (columns + 0.5) * w / out_w - 0.5, left), left + w - 1)
    x, y = torch.broadcast_tensors(x, y)
    grid = torch.stack((2 * (x + 0.5) / width - 1, 2 * (y + 0.5) / height - 1), dim=-1)
    return sample_bilinear(images, grid, "border")


# --- the draws and the views --------------------------------------------------------------------------------


@dataclass
class ViewDraw:
    """One image's random choices for its 31 views, drawn from its own stream, in this order: the crops' attempt
    uniforms, their positions, the flips, the noise fields."""

    boxes: torch.Tensor  # (n, CROPS, 4) float64: top, left, h, w in input pixels
    flips: torch.Tensor  # (n, CROPS) bool
    noise: torch.Tensor  # (n, NOISE_VIEWS, 3, H, W) standard normal


def draw_views(rng: ImageRandomness, images: torch.Tensor) -> ViewDraw:
    """Four draws of each image's stream; ``torch.rand(1) < 0.5`` flips, as ``RandomHorizontalFlip``."""
    n, _, height, width = images.shape
    attempts = rng.uniform(CROPS, CROP_ATTEMPTS, 2, device=images.device)
    positions = rng.uniform(CROPS, 2, device=images.device)
    flips = rng.uniform(CROPS, device=images.device) < FLIP_PROBABILITY
    noise = rng.normal_like(images.new_empty(n, NOISE_VIEWS, *images.shape[1:]))
    boxes = crop_boxes(attempts.double(), height, width, CROP_SCALE, positions=positions.double())
    return ViewDraw(boxes, flips, noise)


def crop_views(images: torch.Tensor, draw: ViewDraw, side: tuple[int, int]) -> torch.Tensor:
    """The 16 crop-and-flip views ``(n, CROPS, 3, *side)``, differentiable."""
    n = len(images)
    repeated = images.repeat_interleave(CROPS, dim=0)
    crops = resized_crops(repeated, draw.boxes.flatten(0, 1), draw.flips.flatten(), side)
    return crops.view(n, CROPS, 3, *side)


def pixel_views(images: torch.Tensor, draw: ViewDraw) -> torch.Tensor:
    """The 15 views made at the input's resolution ``(n, 15, 3, H, W)``: bit depth floor/round/ceil, JPEG 50/60/75,
    6 noisy, median, box, Gaussian. The 8-bit ones take their exact values (from the 8-bit levels) forward and
    pass the gradient of their differentiable part (the image itself, or ``clip(x + sigma n)``) backward."""
    levels = eight_bit_levels(images)
    views = [straight_through(images, bit_depth_levels(levels, r) / 255) for r in BIT_DEPTH_ROUNDINGS]
    views += [straight_through(images, jpeg_levels(levels, q) / 255) for q in JPEG_QUALITIES]
    for k in range(NOISE_VIEWS):
        noise = draw.noise[:, k]
        exact = truncated_levels(noisy_pixels(levels / 255, noise)) / 255
        views.append(straight_through(noisy_pixels(images, noise), exact))
    views += [median_filter(images), box_filter(images), gaussian_filter(images)]
    return torch.stack(views, dim=1)
