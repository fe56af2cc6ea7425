"""Several processes (``torchrun``) on PyTorch's own distributed engine.

``torchrun --nproc-per-node K -m counterattack eval ...`` (and multi-node torchrun) starts K
processes; each evaluates every K-th remaining image and writes its own results file; rank 0
merges them. NCCL on GPUs, gloo on CPUs.

Work that must happen once (downloads, writing the configuration) runs on rank 0 first, the
others waiting. At each synchronisation point every process reports whether it failed, so one
process's error (a missing file, a bad image) ends every process with that error rather than
leaving the others waiting; collectives time out after ``timeout``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from .errors import CounterattackError

T = TypeVar("T")


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def together(self, work: Callable[[], T]) -> T:
        """Run ``work`` here, then learn whether it failed anywhere; a failure elsewhere raises here too."""
        try:
            result = work()
        except Exception as exc:
            self._agree(f"{type(exc).__name__}: {exc}" if not isinstance(exc, CounterattackError) else str(exc))
            raise
        self._agree(None)
        return result

    def first_on_main(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0, then on the others (which may then reuse what rank 0 fetched or wrote)."""
        if self.is_main:
            result = self.together(work)
            self.together(lambda: None)
        else:
            self.together(lambda: None)
            result = self.together(work)
        return result

    def share(self, value: T) -> T:
        """The main process's ``value``, on every process (what the others pass is ignored)."""
        if self.world_size <= 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _agree(self, failure: str | None) -> None:
        if self.world_size <= 1:
            return
        failures: list[str | None] = [None] * self.world_size
        dist.all_gather_object(failures, failure)
        for rank, message in enumerate(failures):
            if message is not None and rank != self.rank:
                raise CounterattackError(f"process {rank} of {self.world_size} failed: {message}")

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def start(device: torch.device, timeout: timedelta = timedelta(minutes=60)) -> tuple[ProcessGroup, torch.device]:
    """Join the process group torchrun describes (if any); each process gets its own GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return ProcessGroup(dist.get_rank(), world_size, local_rank), device
