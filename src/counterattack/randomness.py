"""Per-image random streams.

Every random draw for image ``i`` (an attack's random start, TTC's ``delta0``) comes from a
generator seeded by ``(seed, dataset, i, purpose)``, where ``i`` is the image's stable id (an index
or a file's relative path). An image's result therefore does not depend on
the batch size, on the order of the images or on how they are split across processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts; stable across processes and Python versions."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ImageRandomness:
    """One ``torch.Generator`` per image of a batch.

    Draws are made on the CPU, so a seed gives the same numbers on every device.
    """

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    @classmethod
    def for_images(cls, seed: int, dataset: str, image_ids: Sequence[int | str], purpose: str) -> "ImageRandomness":
        return cls(
            torch.Generator().manual_seed(derive_seed(seed, dataset, i, purpose)) for i in image_ids
        )

    @classmethod
    def from_seed(cls, seed: int, batch_size: int, purpose: str = "") -> "ImageRandomness":
        """Streams for images numbered 0..batch_size-1, for API use outside a dataset."""
        return cls.for_images(seed, "", range(batch_size), purpose)

    def __len__(self) -> int:
        return len(self.generators)

    def uniform_like(self, images: torch.Tensor, low: float, high: float) -> torch.Tensor:
        """Uniform noise in [low, high) with the shape, dtype and device of ``images``."""
        if len(images) != len(self.generators):
            raise ValueError(f"{len(images)} images but {len(self.generators)} random streams")
        shape = images.shape[1:]
        noise = torch.stack([torch.rand(shape, generator=g, dtype=torch.float32) for g in self.generators])
        return (noise * (high - low) + low).to(device=images.device, dtype=images.dtype)
