"""Test-time Counterattacks (Xing, Zhao, Sebe, CVPR 2025, arXiv 2503.03613).

Adversarial images are "falsely stable": their embedding barely moves under random noise. For each
image x, with f the image encoder:

1. ``delta0 ~ U[-eps, eps]`` (kept inside [0, 1]); ``tau = ||f(x + delta0) - f(x)|| / ||f(x)||``.
2. Counterattack: ``steps`` signed-gradient steps of ``step_size`` from ``delta0`` that maximise
   ``||f(x + delta) - f(x)||^2``, projected onto the eps ball and the [0, 1] box; every delta_k kept.
3. If ``tau < tau_thres`` the image is judged attacked and ``delta = sum_k w_k delta_k`` with
   ``w = softmax(beta * [0, 1, ..., steps])``; otherwise ``delta = delta0``.
4. Classify ``x + delta``.

tau may come from another encoder (``tau_encoder``): on an adversarially fine-tuned CLIP the paper
measures tau with the original CLIP, while the counterattack and the classification use the
fine-tuned one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..attacks.loop import project, replay_steps, sign_gradient_steps, sign_step
from ..classifier import ImageEncoder, ZeroShotClassifier
from ..inputs import check_pixels
from ..precision import full_precision
from ..randomness import ImageRandomness
from .base import (
    PIXEL_UNIT, TTC_EPS, TTC_STEP_SIZE, TTC_STEPS, AttackView, DefenseOutput, Gate, describe_options,
    option, register_defense, runtime, softmax_weights, through_defense, weighted_mix,
)


@dataclass
class TTCResult:
    """Defended images and per-image diagnostics."""

    images: torch.Tensor
    tau: torch.Tensor
    counterattacked: torch.Tensor
    noisy_embeddings: torch.Tensor  # f(x + delta0), reused to classify images judged clean
    noise: torch.Tensor  # the uniform draw behind delta0
    signs: list[torch.Tensor]  # gradient signs of each step, for the counterattacked images only


def relative_shift(moved: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``||moved - anchor|| / ||anchor||`` per row: TTC's tau."""
    return (moved - anchor).norm(dim=-1) / anchor.norm(dim=-1)


@register_defense
@dataclass(frozen=True)
class TTC:
    """Test-time Counterattacks with the paper's defaults (eps 4/255, 2 steps of 1/255, tau_thres 0.2, beta 2).

    Example::

        ttc = TTC()
        result = ttc.counterattack(classifier, images, ImageRandomness.from_seed(0, len(images)))
        predictions = classifier.logits(result.images).argmax(-1)
    """

    gate: ClassVar[Gate] = Gate("tau")  # ||f(x + delta0) - f(x)|| / ||f(x)||: a small tau flags the image
    eps: float = option(TTC_EPS, "counterattack budget (and delta0's range)", unit=PIXEL_UNIT)
    steps: int = option(TTC_STEPS, "counterattack steps")
    step_size: float = option(TTC_STEP_SIZE, "size of each step", unit=PIXEL_UNIT)
    tau_thres: float = option(0.2, "an image with tau below this is judged attacked", aliases=("--tau-thres",))
    beta: float = option(2.0, "weights of the kept deltas: softmax(beta * k)", low=None, aliases=("--beta",))
    tau_encoder: ImageEncoder | None = runtime()  # None: the defended encoder measures tau

    def step_weights(self) -> torch.Tensor:
        """``w_k = exp(beta k) / sum_j exp(beta j)`` for k = 0..steps."""
        return softmax_weights(self.beta, self.steps + 1)

    @torch.no_grad()
    def counterattack(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> TTCResult:
        """The defended images and the gate's diagnostics. Under a mixed-precision policy
        (``precision_context``) the gate's two passes stay in float32 and the steps use the policy."""
        encoder = classifier.encoder
        x = check_pixels(images).detach().float()
        n = len(x)
        noise = rng.uniform_like(x, -self.eps, self.eps)
        delta0 = project(x, noise, self.eps)
        may_attack = self.steps > 0 and self.tau_thres > 0
        with full_precision(x.device):  # the gate compares two nearby embeddings: float32 only
            anchor = encoder(x).float()  # f(x): computed once, shared by tau and the counterattack's loss
            # f(x + delta0) is tau's numerator, the embedding of every image judged clean, and the first
            # forward of the counterattack: one pass, its graph kept while the gate may open.
            with torch.set_grad_enabled(may_attack):
                start = delta0.clone().requires_grad_(may_attack)
                noisy = encoder(x + start)
            if self.tau_encoder is None:
                tau = relative_shift(noisy.detach().float(), anchor)
            else:
                tau = relative_shift(self.tau_encoder(x + delta0).float(), self.tau_encoder(x).float())
        counterattacked = self.gate.flags(self, tau)
        chosen = counterattacked.nonzero().flatten()
        delta = delta0.clone()
        signs: list[torch.Tensor] = []
        if len(chosen):
            # A backward costs about two forwards: once the chosen images are two thirds of the batch,
            # backpropagating through the gate's full-batch graph beats a fresh forward of the chosen.
            reuse = self.steps > 0 and 3 * len(chosen) >= 2 * n
            if not reuse:
                noisy = noisy.detach()  # free the full-batch graph before the steps build their own
            delta[chosen] = self._counterattack_chosen(encoder, x, delta0, anchor, noisy, start, chosen, reuse, signs)
        return TTCResult(x + delta, tau, counterattacked, noisy.detach(), noise, signs)

    def _counterattack_chosen(self, encoder, x, delta0, anchor, noisy, start, chosen, reuse_gate_forward: bool,
                              signs) -> torch.Tensor:
        """``sum_k w_k delta_k`` for the chosen images; the first step from the gate's graph if asked."""
        x_chosen, target = x[chosen], anchor[chosen]

        def embedding_shift(moved: torch.Tensor) -> torch.Tensor:
            return (encoder(moved).float() - target).pow(2).sum()

        weights = self.step_weights()
        kept = [delta0[chosen]]
        first, remaining = delta0[chosen], self.steps
        if reuse_gate_forward:
            with torch.enable_grad():
                (grad,) = torch.autograd.grad((noisy[chosen].float() - target).pow(2).sum(), start)
            signs.append(grad[chosen].sign())
            first = sign_step(x_chosen, first, grad[chosen], self.step_size, self.eps)
            kept.append(first)
            remaining -= 1
        kept += sign_gradient_steps(embedding_shift, x_chosen, first, self.eps, self.step_size, remaining, signs)
        return weighted_mix(kept, weights)

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        result = self.counterattack(classifier, images, rng)
        logits = classifier.logits_from_embeddings(result.noisy_embeddings)
        chosen = result.counterattacked.nonzero().flatten()
        if len(chosen):
            logits[chosen] = classifier.logits(result.images[chosen])
        return DefenseOutput(logits, result.tau, result.counterattacked, result.images)

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str,
        with_score: bool = False
    ) -> AttackView:
        """TTC as a function of its input: the gate and the step signs of this draw are held fixed,
        the projections are differentiated (exact) or the whole perturbation is (bpda)."""
        result = self.counterattack(classifier, images.detach(), rng)
        delta0 = project(images, result.noise, self.eps)
        delta = delta0
        chosen = result.counterattacked.nonzero().flatten()
        if len(chosen):
            kept = [delta0[chosen],
                    *replay_steps(images[chosen], delta0[chosen], result.signs, self.step_size, self.eps)]
            delta = delta0.index_put((chosen,), weighted_mix(kept, self.step_weights()))
        tau = None
        if with_score:
            tau_encoder = self.tau_encoder or classifier.encoder
            with full_precision(images.device):
                tau = relative_shift(tau_encoder(images + delta0).float(), tau_encoder(images).float())
        return AttackView(classifier.logits(through_defense(images, delta, method)), tau)

    def with_score_encoder(self, encoder: ImageEncoder) -> TTC:
        return replace(self, tau_encoder=encoder)

    def describe(self) -> dict:
        return {**describe_options(self), "separate_tau_encoder": self.tau_encoder is not None}
