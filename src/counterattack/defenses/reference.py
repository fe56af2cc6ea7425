"""TTC written plainly, as the paper describes it: every image through every step.

The fast path in ``ttc.py`` must give the same deltas and predictions; tests compare the two and
``benchmarks/bench_ttc.py`` times them. Nothing else should call this.
"""

from __future__ import annotations

import torch

from ..attacks.loop import project
from ..classifier import ZeroShotClassifier
from ..randomness import ImageRandomness
from .base import DefenseOutput, weighted_mix
from .ttc import TTC, relative_shift


def reference_ttc(ttc: TTC, classifier: ZeroShotClassifier, images: torch.Tensor,
                  rng: ImageRandomness) -> tuple[torch.Tensor, DefenseOutput]:
    """(defended images, output) of the straightforward loop; the anchor is recomputed for the counterattack."""
    encoder = classifier.encoder
    tau_encoder = ttc.tau_encoder or encoder
    x = images.detach().float()
    delta0 = project(x, rng.uniform_like(x, -ttc.eps, ttc.eps), ttc.eps)
    with torch.no_grad():
        tau = relative_shift(tau_encoder(x + delta0), tau_encoder(x))
        anchor = encoder(x)
    deltas = [delta0]
    delta = delta0
    for _ in range(ttc.steps):
        delta = delta.detach().requires_grad_(True)
        loss = (encoder(x + delta) - anchor).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        delta = project(x, delta.detach() + ttc.step_size * grad.sign(), ttc.eps)
        deltas.append(delta)
    combined = weighted_mix(deltas, ttc.step_weights())
    counterattacked = tau < ttc.tau_thres
    defended = x + torch.where(counterattacked.view(-1, 1, 1, 1), combined, delta0)
    with torch.no_grad():
        logits = classifier.logits(defended)
    return defended, DefenseOutput(logits, tau, counterattacked)
