"""Optional mixed precision for the defenses' encoder passes (attacks always run in float32)."""

from __future__ import annotations

import contextlib

import torch

from .errors import CounterattackError

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``bf16``/``fp16``; nothing for ``fp32``."""
    if precision not in PRECISIONS:
        raise CounterattackError(f"Unknown precision {precision!r}. Available: {', '.join(PRECISIONS)}.")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
