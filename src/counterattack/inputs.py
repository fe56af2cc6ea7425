"""The one check of what a caller hands the library: images, labels and randomness.

Every public entry point runs it: ``ZeroShotClassifier.logits`` and ``encode_image``, every registered
attack and defense (the registries wrap their ``__call__``, ``attack_view`` and ``counterattack`` at
registration, so an extension is checked too), ``defended``. An image in 0-255, a normalised image, a NaN
pixel, a bool tensor, an empty batch, a label out of range, missing randomness or a model where a
classifier belongs would otherwise give numbers that look plausible and mean nothing, or a raw torch
error. Each kind of mistake has its own error class, all ``InputError`` (a ``ValueError`` and a
``CounterattackError``, so the command line prints one line).

The same wrapper makes two caller habits work rather than fail: labels of any integer dtype (cross-entropy
wants int64: they are converted), and a call under ``torch.inference_mode()`` (attacks and counterattacks
differentiate, so the entry point runs with inference mode off, on normal copies of inference tensors).

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


class ArgumentKindError(InputError, TypeError):
    """An object of the wrong kind: a model or a name where a ``ZeroShotClassifier`` belongs, a non-defense where a
    defense belongs, a string where a list of names belongs."""


def kind_of(value: Any) -> str:
    """How an error message names what it was given: ``the string 'cat'``, ``the class TTC``, ``a CLIP (open_clip)``,
    ``an int``."""
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, type):
        return f"the class {value.__name__} (an instance is needed: {value.__name__}(...))"
    cls = type(value)
    package = cls.__module__.split(".")[0]
    article = "an" if cls.__qualname__[0].lower() in "aeiou" else "a"
    return f"{article} {cls.__qualname__}" + ("" if package in ("builtins", "counterattack") else f" ({package})")


# What attacks and defenses use of a classifier: ``ZeroShotClassifier`` has it (classifier.py imports this module, so
# the check is by what an object offers, not by its class).
CLASSIFIER_INTERFACE = ("encoder", "encode_image", "logits", "logits_from_embeddings", "num_classes", "class_names")


def check_classifier(classifier: Any) -> Any:
    """``classifier`` itself if it is a ``ZeroShotClassifier`` (or offers all it does); anything else would fail deep
    inside an attack."""
    if all(hasattr(classifier, name) for name in CLASSIFIER_INTERFACE):
        return classifier
    hint = ""
    if type(classifier).__name__ == "DefendedModel":
        hint = ("; to attack through a defense use AdaptiveAttack(defense, attack), or hand the DefendedModel to "
                "torchattacks")
    elif type(classifier).__name__ == "LoadedCLIP":
        hint = "; build one from it with ZeroShotClassifier.from_clip(clip, class_names)"
    raise ArgumentKindError(f"expected a ZeroShotClassifier as the classifier (ZeroShotClassifier.from_clip("
                            f"load_clip(name), class_names)), got {kind_of(classifier)}{hint}")


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
    """``labels`` as int64 (itself if it is already) if it holds ``count`` integer class indices below
    ``num_classes``: int32 or uint8 labels are labels too, and cross-entropy takes only int64."""
    if not isinstance(labels, torch.Tensor):
        raise LabelError(f"expected labels as an integer tensor, got {type(labels).__name__}")
    if labels.dtype in (torch.bool, *IMAGE_DTYPES) or labels.is_complex():
        raise DtypeError(f"expected integer class labels, got a {labels.dtype} tensor")
    if labels.ndim != 1 or len(labels) != count:
        raise ShapeError(f"expected one label per image ({count}), got labels of shape {tuple(labels.shape)}")
    labels = labels.long()  # before the range check: uint64 labels past int64's range turn negative and are refused
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


def _normal(value: Any) -> Any:
    """A tensor made under inference mode, cloned into a normal one (with inference mode off): autograd may not
    save an inference tensor for backward."""
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


def _guarded(method: Callable, labelled: bool) -> Callable:
    """``method(self, classifier, images, [labels,] rng, ...)`` with its inputs checked first (unless trusted), labels
    as int64, and inference mode off inside."""
    if getattr(method, "_checks_inputs", False):
        return method

    @functools.wraps(method)
    def checked(self, classifier, images, *args, **kwargs):
        if torch.is_inference_mode_enabled():
            # Attacks and counterattacks take gradients, which inference mode forbids; off, the computation is the
            # same, and its outputs are normal tensors the caller can use inside inference mode too.
            with torch.inference_mode(False):
                return checked(self, classifier, _normal(images), *map(_normal, args),
                               **{k: _normal(v) for k, v in kwargs.items()})
        if not inputs_checked():
            check_classifier(classifier)
            check_pixels(images)
            if labelled:
                labels = check_labels(args[0] if args else kwargs.get("labels"), len(images), classifier.num_classes)
                if args:
                    args = (labels, *args[1:])
                else:
                    kwargs["labels"] = labels
            rng = args[1 if labelled else 0] if len(args) > (1 if labelled else 0) else kwargs.get("rng")
            check_randomness(rng, len(images))
        with checked_inputs():
            return method(self, classifier, images, *args, **kwargs)

    checked._checks_inputs = True
    return checked


# A defense's entry points; ``counterattack`` (TTC's, DOC's, MAC's: the defended images and the gate's diagnostics) is
# public too, and called by users directly (TTC's example).
DEFENSE_ENTRY_POINTS = ("__call__", "attack_view", "counterattack")


def guard_defense(cls: type) -> None:
    """Check the inputs of a registered defense's entry points (``DEFENSE_ENTRY_POINTS``, those it has)."""
    for name in DEFENSE_ENTRY_POINTS:
        if callable(getattr(cls, name, None)):
            setattr(cls, name, _guarded(getattr(cls, name), labelled=False))


def guard_attack(cls: type) -> None:
    """Check the inputs of a registered attack's ``__call__``: images, labels and randomness."""
    cls.__call__ = _guarded(cls.__call__, labelled=True)
