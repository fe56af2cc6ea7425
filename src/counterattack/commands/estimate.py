"""A long run's estimate, said early: after a first batch of a few images, and again after the first full one."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..stats import duration

if TYPE_CHECKING:
    from .context import RunContext


class Estimate:
    """Early in a long run (a minute or more), the time it projects for the rest (main process): after the first batch,
    which holds only ``PROBE_IMAGES`` images where the results do not depend on batching, and again, refined, after
    the first full batch."""

    WORTH_SAYING = 60.0  # seconds

    def __init__(self, context: RunContext, done: Mapping[str, set], probe: int):
        expected = context.expected()
        self.remaining = sum(len(ids) - len(done.get(name, set()) & set(ids)) for name, ids in expected.items())
        attack = context.config.attack  # under adaptive attacks, the masking verdict's doubled attacks come after
        self.checked = sum(min(attack.convergence_images, len(ids)) for ids in expected.values()) \
            if attack.threat == "adaptive" else 0
        self.context, self.start, self.probe = context, time.perf_counter(), probe
        self.batches, self.images, self.silent = 0, 0, not context.group.is_main

    def after(self, images: int) -> None:
        self.batches += 1
        self.images += images
        if self.silent or self.batches > (2 if self.probe else 1):
            return
        left = self.remaining / self.context.group.world_size - self.images  # this process's share, less what is done
        per_image = (time.perf_counter() - self.start) / self.images
        if left <= 0 or per_image * left < self.WORTH_SAYING:
            return
        first = f"the first {self.images} images" if self.batches == 1 else f"{self.images} images (refined)"
        checks = (f", then up to about {duration(2 * per_image * self.checked)} for the masking checks (twice the "
                  f"steps and EOT draws on {self.checked} images, --convergence-images)" if self.checked else "")
        print(f"estimate from {first}: {per_image:.3g} s per image on {self.context.device}, about "
              f"{duration(per_image * left)} for the {self.remaining - self.images} images left{checks} (the same "
              "command again resumes where it stops)", file=sys.stderr)
