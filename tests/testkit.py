"""Helpers the test modules share (importable under any pytest import mode: ``pythonpath`` holds tests/)."""

from __future__ import annotations

import torch

# A gate threshold must sit this far (relative to the scores' scale) from every score, so that a score
# recomputed another way (alone instead of in a batch, another BLAS, another machine) stays on its side.
GATE_MARGIN = 1e-4


def threshold_between(scores: torch.Tensor, below: int | None = None) -> float:
    """A gate threshold halfway across a gap of the sorted ``scores``, never on a score.

    ``below``: how many scores lie under it; None picks the widest gap that leaves scores on both
    sides. A threshold equal to one image's score would compare that score with a recomputation of
    itself, and a last-bit difference between two code paths would flip its gate.
    """
    values = scores.detach().double().flatten().sort().values
    gaps = values[1:] - values[:-1]
    if below is None:
        below = int(gaps.argmax()) + 1
    if not 0 < below < len(values):
        raise ValueError(f"cannot put {below} of {len(values)} scores below a threshold between two of them")
    gap = float(gaps[below - 1])
    scale = float(values.abs().max())
    assert gap > 2 * GATE_MARGIN * scale, (
        f"the scores {values.tolist()} leave no clear gap after the {below} lowest: pick other test images")
    return float(values[below - 1] + gap / 2)


def assert_equal_up_to_sign_flips(first: torch.Tensor, second: torch.Tensor, share: float = 0.01) -> None:
    """Defended images computed two ways (alone and in a batch) agree, except where a sign step met a
    gradient element so near zero that the batch's rounding flipped it: at most ``share`` of the pixels.
    (A draw that depended on the batch would move nearly every pixel.)"""
    moved = (first - second).abs() > 1e-6
    assert moved.float().mean() <= share, f"{int(moved.sum())} of {moved.numel()} pixels differ"
