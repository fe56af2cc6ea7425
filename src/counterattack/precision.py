"""The precision policy of attacks and defenses.

``fp32`` (the default) computes everything in float32; ``tf32`` lets CUDA matrix products use
TensorFloat-32 (no effect on a CPU); ``bf16`` and ``fp16`` run the image encoder under
``torch.autocast``; ``paper`` follows each method's authors' code (here on any device): the attacks
and TTC, MAC, DOC (its runner) and the TTC code's baselines under fp16 autocast, CSR and R-TPT in
float32 (each defense's ``paper_precision``). Whatever the policy, three things stay exact:

- every gate score (TTC's tau and its successors' scores) comes from embeddings computed in float32
  (``full_precision``): a gate compares two nearby embeddings, and half precision moves tau by up
  to 25% on the tiny CLIP, flipping decisions near the threshold;
- the zero-shot head (normalisation, cosine similarity, logit scale) runs in float32 for every
  image (``ZeroShotClassifier.logits_from_embeddings``);
- under fp16, the signed-gradient loop scales its loss (``FP16_LOSS_SCALE``) before the backward
  pass, so that small gradients keep their sign instead of underflowing to zero. A sign is
  invariant to a positive scale, so nothing else changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import CounterattackError

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "paper": torch.float16,
}

FP16_LOSS_SCALE = 2.0**12


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise CounterattackError(f"Unknown precision {precision!r}. Available: {', '.join(PRECISIONS)}.")
    return precision


@contextlib.contextmanager
def precision_context(device: torch.device, precision: str) -> Iterator[None]:
    """Run the block under ``precision``: autocast for bf16/fp16/paper, TF32 matrix products for tf32."""
    dtype = PRECISIONS[check_precision(precision)]
    if precision == "tf32":
        previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
    elif dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def defense_precision(policy: str, defense: object) -> str:
    """A defense's precision under ``policy``: ``paper`` is each defense's authors' own (its ``paper_precision``)."""
    return getattr(defense, "paper_precision", "paper") if policy == "paper" else policy


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Leave any autocast region for the block: gates and the zero-shot head are computed in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def loss_scale(device: torch.device) -> float:
    """The factor the signed-gradient loop multiplies its loss by: ``FP16_LOSS_SCALE`` inside fp16 autocast, else 1."""
    if torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16:
        return FP16_LOSS_SCALE
    return 1.0
