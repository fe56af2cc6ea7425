"""The one check of what a caller hands the library: images, labels and randomness.

Every public entry point runs it: ``ZeroShotClassifier.logits`` and ``encode_image``, every registered
attack and defense (the registries wrap their ``__call__`` and ``attack_view`` at registration, so an
extension is checked too), ``defended``. An image in 0-255, a normalised image, a NaN pixel, a bool
tensor, an empty batch, a label out of range or missing randomness would otherwise give numbers that
look plausible and mean nothing, or a raw torch error. Each kind of mistake has its own error class,
all ``InputError`` (a ``ValueError`` and a ``CounterattackError``, so the command line prints one line).

Inside the library's own loops, whose images come from a dataset loader and stay in the box by
construction, ``checked_inputs()`` marks the inputs as checked so that an attack's every step does
not pay for the check again (on a GPU, a check waits for the device).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch

from .errors import CounterattackError

# Pixels a projection put at x + (1 - x) may round a hair past 1; anything further is a mistake.
PIXEL_TOLERANCE = 1e-5
IMAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class InputError(CounterattackError, ValueError):
    """Something handed to the library that it cannot compute on meaningfully."""


class PixelRangeError(InputError):
    """Images that are not finite [0, 1] pixels (normalised images, 0-255 values, NaN)."""


class ShapeError(InputError):
    """Images that are not a non-empty (N, 3, H, W) batch, or labels and randomness of another length."""


class DtypeError(InputError):
    """Images that are not floating point (uint8, bool, integers), labels that are not integers."""


class LabelError(InputError):
    """Labels outside the classifier's classes."""


class RandomnessError(InputError):
    """No per-image randomness where a randomised attack or defense needs it."""


_CHECKED: ContextVar[bool] = ContextVar("counterattack_inputs_checked", default=False)


@contextlib.contextmanager
def checked_inputs() -> Iterator[None]:
    """Inside the block, entry points trust their inputs (the library's own loops, after one check)."""
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def inputs_checked() -> bool:
    return _CHECKED.get()


def check_pixels(images: Any) -> torch.Tensor:
    """``images`` itself if it is a non-empty floating-point batch of finite [0, 1] RGB pixels."""
    if not isinstance(images, torch.Tensor):
        raise ShapeError(f"expected images as a tensor of shape (N, 3, H, W), got {type(images).__name__}")
    if images.dtype not in IMAGE_DTYPES:
        hint = " (for 0-255 images: images.float() / 255)" if images.dtype == torch.uint8 else ""
        raise DtypeError(f"expected floating-point [0, 1] pixels, got a {images.dtype} tensor{hint}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ShapeError(f"expected RGB images as a tensor of shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ShapeError(f"expected a non-empty batch of images, got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise PixelRangeError("images hold NaN or infinite pixels")
    low, high = (float(v) for v in images.detach().aminmax())
    if low < -PIXEL_TOLERANCE or high > 1 + PIXEL_TOLERANCE:
        raise PixelRangeError(
            f"pixels must lie in [0, 1], found values in [{low:.4g}, {high:.4g}]: pass images before "
            "normalisation (the classifier normalises with the model's own mean and std)"
        )
    return images


def check_labels(labels: Any, count: int, num_classes: int) -> torch.Tensor:
    """``labels`` itself if it holds ``count`` integer class indices below ``num_classes``."""
    if not isinstance(labels, torch.Tensor):
        raise LabelError(f"expected labels as an integer tensor, got {type(labels).__name__}")
    if labels.dtype in (torch.bool, *IMAGE_DTYPES) or labels.is_complex():
        raise DtypeError(f"expected integer class labels, got a {labels.dtype} tensor")
    if labels.ndim != 1 or len(labels) != count:
        raise ShapeError(f"expected one label per image ({count}), got labels of shape {tuple(labels.shape)}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise LabelError(f"labels must lie in [0, {num_classes - 1}] (the classifier's classes), found [{low}, {high}]")
    return labels


def check_randomness(rng: Any, count: int) -> Any:
    """``rng`` itself if it holds one random stream per image."""
    if rng is None:
        raise RandomnessError("no randomness given: pass ImageRandomness.from_seed(seed, len(images)) (or "
                              "ImageRandomness.for_images(seed, dataset, image_ids, purpose)) for per-image draws")
    if not hasattr(rng, "uniform_like") or not hasattr(rng, "__len__"):
        raise RandomnessError(f"expected an ImageRandomness, got {type(rng).__name__}")
    if len(rng) != count:
        raise ShapeError(f"{count} images but {len(rng)} random streams")
    return rng


def _guarded(method: Callable, labelled: bool) -> Callable:
    """``method(self, classifier, images, [labels,] rng, ...)`` with its inputs checked first (unless trusted)."""
    if getattr(method, "_checks_inputs", False):
        return method

    @functools.wraps(method)
    def checked(self, classifier, images, *args, **kwargs):
        if not inputs_checked():
            check_pixels(images)
            if labelled:
                check_labels(args[0] if args else kwargs.get("labels"), len(images), classifier.num_classes)
            rng = args[1 if labelled else 0] if len(args) > (1 if labelled else 0) else kwargs.get("rng")
            check_randomness(rng, len(images))
        with checked_inputs():
            return method(self, classifier, images, *args, **kwargs)

    checked._checks_inputs = True
    return checked


def guard_defense(cls: type) -> None:
    """Check the inputs of a registered defense's entry points: ``__call__`` and ``attack_view``."""
    for name in ("__call__", "attack_view"):
        setattr(cls, name, _guarded(getattr(cls, name), labelled=False))


def guard_attack(cls: type) -> None:
    """Check the inputs of a registered attack's ``__call__``: images, labels and randomness."""
    cls.__call__ = _guarded(cls.__call__, labelled=True)
