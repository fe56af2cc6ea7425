"""Per-image randomness as a pure function, drawn on the images' device.

Element ``j`` of the ``k``-th draw for image ``i`` is a pure function of ``(seed, dataset, image
id, purpose, k, j)``: a counter-based generator, like JAX's keys or Philox, built here from a
32-bit integer hash. Each image's key comes from SHA-256 of its identity (once per image, on the
host: a few microseconds); every element is then computed with vectorised integer tensor
operations on the device where the images are, so no generator lives on the host and nothing is
copied per element. The same seed gives bit-identical uniforms on CPU and CUDA, and an image's
numbers do not depend on the batch size, on the order of the images or on how they are split
across processes.

``reference_uniform`` computes the same numbers in plain Python, for the tests.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters apart
_M1, _M2 = 0x7FEB352D, 0x846CA68B  # the multipliers of Wellons' "lowbias32" integer hash


def derive_seed(*parts: object) -> int:
    """A 63-bit integer from any printable parts; stable across processes and Python versions."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _signed(value: int) -> int:
    """A 32-bit pattern as the int32 that holds it."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int32 bit patterns (PyTorch's ``>>`` extends the sign)."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash with strong avalanche (Wellons' lowbias32), on int32 tensors.

    Products wrap modulo 2^32, as two's-complement int32 multiplication does on CPU and CUDA; the
    pure-Python ``reference_uniform`` checks the result bit for bit.
    """
    x = x ^ _shift_right(x, 16)
    x = x * _signed(_M1)
    x = x ^ _shift_right(x, 15)
    x = x * _signed(_M2)
    return x ^ _shift_right(x, 16)


def _bits(words: torch.Tensor, draw: int, count: int) -> torch.Tensor:
    """32 random bits per (image, element), as int32 of shape ``(len(words), count)``; ``words``
    holds each image's key as two int32 words."""
    low, high = words[:, 0], words[:, 1]
    per_image = _hash32(low ^ _hash32(high ^ _hash32(torch.full_like(low, _signed(draw & _MASK)))))
    # The counters' own hash is shared by every image; one keyed round per element then suffices.
    counters = _hash32(torch.arange(count, device=words.device, dtype=torch.int32) * _signed(_GOLDEN))
    return _hash32(counters[None, :] ^ per_image[:, None])


def _key(seed: int, dataset: str, image_id: int | str, purpose: str) -> int:
    return derive_seed(seed, dataset, image_id, purpose)


def key_words(seed: int, dataset: str, image_ids: Sequence[int | str], purpose: str) -> torch.Tensor:
    """The images' keys as an int32 tensor of shape ``(len(image_ids), 2)``: computed once per image on
    the host, then indexed per batch (``ImageRandomness(words[positions])``) with no loop over images."""
    keys = [_key(seed, dataset, i, purpose) for i in image_ids]
    return torch.tensor([[_signed(k & _MASK), _signed((k >> 32) & _MASK)] for k in keys], dtype=torch.int32).view(-1, 2)


class ImageRandomness:
    """Random streams for the images of a batch, one key per image.

    Each call to ``uniform_like`` is the next draw (k = 0, 1, ...) of every image's stream, so
    repeated draws (EOT samples, a defense's noise per attack step) differ, and an image's k-th
    draw is the same however the images are batched.
    """

    def __init__(self, words: torch.Tensor):
        self.words = words  # each image's key as two int32 words: see ``key_words``
        self.draws = 0

    @classmethod
    def for_images(cls, seed: int, dataset: str, image_ids: Sequence[int | str], purpose: str) -> "ImageRandomness":
        return cls(key_words(seed, dataset, image_ids, purpose))

    @classmethod
    def from_seed(cls, seed: int, batch_size: int, purpose: str = "") -> "ImageRandomness":
        """Streams for images numbered 0..batch_size-1, for API use outside a dataset."""
        return cls.for_images(seed, "", range(batch_size), purpose)

    def __len__(self) -> int:
        return len(self.words)

    def _next_bits(self, per_image: int, device: torch.device) -> torch.Tensor:
        bits = _bits(self.words.to(device, non_blocking=True), self.draws, per_image)
        self.draws += 1
        return bits

    def uniform_like(self, images: torch.Tensor, low: float, high: float) -> torch.Tensor:
        """Uniform noise in [low, high) with the shape, dtype and device of ``images``, computed there."""
        if len(images) != len(self.words):
            raise ValueError(f"{len(images)} images but {len(self.words)} random streams")
        # The top 24 bits of each word make a float32 in [0, 1) exactly, the same on every device.
        unit = self.uniform(*images.shape[1:], device=images.device)
        return (unit * (high - low) + low).to(images.dtype)

    def uniform(self, *shape: int, low: float = 0.0, high: float = 1.0,
                device: torch.device | str = "cpu") -> torch.Tensor:
        """The next draw as a float32 tensor of shape ``(len(self), *shape)`` in [low, high), computed on ``device``
        (per-image parameters: an augmentation's angle, a probability, a noise level)."""
        bits = self._next_bits(math.prod(shape), torch.device(device))
        unit = _shift_right(bits, 8).to(torch.float32) * (1.0 / (1 << 24))
        return (unit * (high - low) + low).view(len(self), *shape)

    def normal_like(self, images: torch.Tensor) -> torch.Tensor:
        """Standard normal noise with the shape, dtype and device of ``images`` (Box-Muller on two draws)."""
        first = self.uniform(*images.shape[1:], device=images.device)
        second = self.uniform(*images.shape[1:], device=images.device)
        radius = torch.sqrt(-2.0 * torch.log1p(-first))  # 1 - u lies in (0, 1]: the logarithm is finite
        return (radius * torch.cos(2 * math.pi * second)).to(images.dtype)

    def fork(self, label: str) -> ImageRandomness:
        """Other streams for the same images, independent of these (each image's key mixed with ``label``'s)."""
        salt = derive_seed("fork", label)
        mix = torch.tensor([_signed(salt & _MASK), _signed((salt >> 32) & _MASK)], dtype=torch.int32)
        return ImageRandomness(self.words ^ mix.to(self.words.device))

    def batch_seed(self) -> int:
        """One 31-bit seed for code that takes a single seed for a whole batch (AutoAttack): the next
        draw of the first image's stream. It depends on which image comes first."""
        return int(self._next_bits(1, torch.device("cpu"))[0, 0]) & 0x7FFFFFFF


def reference_uniform(seed: int, dataset: str, image_id: int | str, purpose: str, draw: int, count: int) -> list[float]:
    """The first ``count`` uniforms in [0, 1) of an image's ``draw``-th draw, in plain Python."""

    def hash32(x: int) -> int:
        x ^= x >> 16
        x = (x * _M1) & _MASK
        x ^= x >> 15
        x = (x * _M2) & _MASK
        return x ^ (x >> 16)

    key = _key(seed, dataset, image_id, purpose)
    low, high = key & _MASK, (key >> 32) & _MASK
    per_image = hash32(low ^ hash32(high ^ hash32(draw & _MASK)))
    return [(hash32(hash32((j * _GOLDEN) & _MASK) ^ per_image) >> 8) / (1 << 24) for j in range(count)]
