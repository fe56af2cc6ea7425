"""Directional Orthogonal Counterattack (DOC; Jiang, Dong, Shi, Gui, AAAI 2026, arXiv 2511.09064).

"Diversifying Counterattacks: Orthogonal Exploration for Robust CLIP Inference". TTC's counterattack
with two changes: the steps explore (orthogonal gradient augmentation with momentum, OGA), and a
soft gate scales the counterattack by how stable the embedding is under noise. For each image x,
with f the image encoder and e = f(x):

1. A stability score s, one of two (``score``):
   - ``tau`` (the default): TTC's tau, ``||f(x + delta0) - f(x)|| / ||f(x)||`` under the first
     uniform draw delta0 (below), on ``tau_encoder`` when one is given (as TTC). This is the score the
     only public DOC code (a third-party runner) gates with tau_thres 0.3 and gamma 20 on the original
     CLIP, so those values were set for this scale;
   - ``directional``: the paper's DSS (Eq. 10), ``1 - mean_m cos(f(x_m), f(x))`` over M noisy copies
     ``x_m = clip_[0,1](x + eta_m)``, on ``tau_encoder`` when one is given, as the runner does (it
     computes it only for fine-tuned models, on the original CLIP's encoder). It measures about
     1.7 tau^2 (1 - cos is about r^2/2, and sign noise has sqrt(3) times uniform noise's RMS), so
     0.3 gates where tau would be about 0.42: choose its threshold with ``counterattack calibrate``.
2. Soft gate (Eq. 11): ``w = sigmoid(gamma * (tau_thres - s))``. A low score ("falsely stable")
   gives the full counterattack (w -> 1), as in TTC.
3. ``delta0 ~ U[-eps, eps]``, kept inside [0, 1]; momentum ``m_0 = 0``.
4. For t = 1..T: ``g = grad ||f(x + delta) - e|| / ||grad||`` (L2 over the whole image);
   ``r ~ N(0, I)``, ``r_perp`` = r minus its component along g, normalised; ``d = g + lambda r_perp``;
   ``m_t = mu m_{t-1} + (1 - mu) d``; ``delta_t = project(delta_{t-1} + alpha sign(m_t))`` onto the
   eps ball and the [0, 1] box.
5. The perturbation (``final``): ``last`` (the default, the paper's Algorithm 1, line 17, explicit
   there) ``w delta_T + (1 - w) delta0``; or ``weighted`` (the runner's newer version, which says it
   matches the original DOC code) ``w sum_k softmax(beta k) delta_k + (1 - w) delta0``, TTC's
   average of the kept steps. Classify ``x + delta``.

Defaults: eps 4/255, step 3/255, 4 steps are the paper's (Implementation Details). The paper defers
five settings to its supplement, which was not available; M = 5, lambda = 0.05, mu = 0.75,
tau_thres = 0.3 and gamma = 20 are the runner's (shared/docs/successors.md, section 2), all
UNCERTAIN; tau_thres and gamma were set for ViT-B/32 and TTC's tau. Where the paper is explicit
(Algorithm 1's delta_T) it stands; where only the runner gives a value (tau_thres, gamma, and the
score they apply to), the runner does.

Other choices where the sources disagree:
- The directional score's noise: Eq. 10's ``eps * sign(N(0, I))`` (a fair +-eps coin per pixel), not
  Algorithm 1's uniform noise (``score_noise="uniform"``); the noisy copies are clamped to [0, 1].
- The gate follows Eq. 11 literally (low score -> counterattack), not the prose, which says the
  opposite.
- The gradient is taken of the squared norm: after normalisation it is the same direction, and it
  stays defined where f(x + delta) = e.
- Every image gets the T steps, whatever its w (Algorithm 1). Cost per image: with ``tau``, T + 2
  forwards (f(x), one per step, the first shared with tau, the classification) and T backwards, plus
  2 forwards on a separate tau encoder; with ``directional``, M + T + 2 forwards and T backwards, or
  with a separate tau encoder M + 1 on it (the score) and T + 2 on the defended one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..attacks.loop import project, replay_steps, sign_step
from ..classifier import ImageEncoder, ZeroShotClassifier
from ..inputs import check_pixels
from ..precision import full_precision, loss_scale
from ..randomness import ImageRandomness
from .base import (
    PIXEL_UNIT, TTC_EPS, AttackView, DefenseOutput, Gate, describe_options, option, register_defense,
    runtime, softmax_weights, through_defense, weighted_mix,
)
from .ttc import relative_shift

SCORE_NOISES = ("sign", "uniform")
SCORES = ("tau", "directional")
FINALS = ("last", "weighted")


@dataclass
class DOCResult:
    """Defended images and the per-image quantities behind them."""

    images: torch.Tensor
    score: torch.Tensor  # the gate's score s: tau, or the directional sensitivity
    weight: torch.Tensor  # the soft gate w
    delta0: torch.Tensor
    final_delta: torch.Tensor  # delta_T (or the steps' weighted average), before the mix with delta0


def unit_per_image(vectors: torch.Tensor) -> torch.Tensor:
    """Each image's tensor divided by its L2 norm over all its pixels (zero stays zero)."""
    norms = vectors.flatten(1).norm(dim=1).clamp_min(torch.finfo(vectors.dtype).tiny)
    return vectors / norms.view(-1, *([1] * (vectors.ndim - 1)))


def orthogonal_direction(noise: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """The unit part of ``noise`` orthogonal to the unit ``direction``, per image (Eq. 6)."""
    along = (noise * direction).flatten(1).sum(dim=1).view(-1, *([1] * (noise.ndim - 1)))
    return unit_per_image(noise - along * direction)


@register_defense
@dataclass(frozen=True)
class DOC:
    """DOC, Jiang et al., AAAI 2026: TTC with orthogonal, momentum steps and a soft noise-stability gate.

    Cost per image at the defaults: T + 2 = 6 forwards and T = 4 backwards (``score="directional"``:
    M + T + 2 = 11 forwards). Five defaults are uncertain (the paper's supplement was not available):
    noise_copies 5, orthogonal_weight 0.05, momentum 0.75, tau_thres 0.3 and gamma 20 are the public
    runner's, which gates TTC's tau with them.
    """

    eps: float = option(TTC_EPS, "counterattack budget (and delta0's range, and the DSS noise's)", unit=PIXEL_UNIT)
    steps: int = option(4, "orthogonal-gradient steps (T)")
    step_size: float = option(3 / 255, "size of each step (alpha)", unit=PIXEL_UNIT)
    noise_copies: int = option(5, "noisy copies behind the sensitivity score (M; uncertain)", low=1)
    orthogonal_weight: float = option(0.05, "weight of the orthogonal noise in each direction (lambda; uncertain)")
    momentum: float = option(0.75, "momentum of the directions (mu; uncertain)", high=1)
    tau_thres: float = option(0.3, "the gate's threshold on its score (uncertain; set for ViT-B/32 and tau: with "
                                   "--doc-score directional, choose it with `counterattack calibrate`)")
    gamma: float = option(20.0, "sharpness of the soft gate (uncertain)")
    score: str = option("tau", "the gate's score: tau (TTC's, under delta0; the public runner's, for which 0.3 was "
                        "set) or directional (the paper's 1 - mean cos over noise_copies copies)", choices=SCORES)
    score_noise: str = option("sign",
                              "directional score: noise of the copies: sign (Eq. 10, +-eps) or uniform (Alg. 1)",
                              choices=SCORE_NOISES)
    final: str = option("last", "the perturbation: last (Algorithm 1: w delta_T + (1 - w) delta0) or weighted (the "
                        "runner's: w times TTC's softmax(beta k) average of the steps, + (1 - w) delta0)",
                        choices=FINALS)
    beta: float = option(2.0, "weighted: the steps' weights softmax(beta k), as TTC's", low=None)
    tau_encoder: ImageEncoder | None = runtime()  # score tau: measured on this encoder (None: the defended one)

    @property
    def gate(self) -> Gate:
        """A low score flags the image: "falsely stable"."""
        return Gate("tau" if self.score == "tau" else "directional sensitivity")

    # -- the pieces ------------------------------------------------------------------------------

    def sensitivity_noise(self, images: torch.Tensor, rng: ImageRandomness) -> torch.Tensor:
        """The M noises of the score, shape ``(N, M, C, H, W)``: one draw of every image's stream."""
        unit = rng.uniform(self.noise_copies, *images.shape[1:], device=images.device).to(images.dtype)
        if self.score_noise == "sign":
            # sign(N(0, 1)) is a fair coin; a uniform below 1/2 is the same coin, from one draw.
            return torch.where(unit < 0.5, -self.eps, self.eps).to(images.dtype)
        return (2 * unit - 1) * self.eps

    @staticmethod
    def sensitivity_score(
        encoder: ImageEncoder, images: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 - mean_m cos(f(clip(x + eta_m)), f(x)), f(x))``: the M copies go through the encoder as one batch."""
        copies = (images.unsqueeze(1) + noise).clamp(0, 1)
        with full_precision(images.device):  # a score of nearby embeddings: half precision would move it
            anchor = encoder(images).float()
            moved = encoder(copies.flatten(0, 1)).float().view(*noise.shape[:2], -1)
        # 1 - cos(a, b) = ||a/|a| - b/|b|||^2 / 2, without the cancellation of 1 - cos near cos = 1:
        # scores are ~1e-4 on small encoders, where float32's 1 - cos keeps two or three digits.
        apart = F.normalize(moved, dim=-1) - F.normalize(anchor, dim=-1).unsqueeze(1)
        return apart.pow(2).sum(dim=-1).mean(dim=1) / 2, anchor

    def soft_gate(self, score: torch.Tensor) -> torch.Tensor:
        """``w = sigmoid(gamma * (tau_thres - score))`` (Eq. 11)."""
        if self.gamma == 0:  # w = 1/2 everywhere; spelled out because 0 * inf (tau_thres = inf) is NaN
            return torch.full_like(score, 0.5)
        return torch.sigmoid(self.gamma * (self.tau_thres - score))

    def orthogonal_steps(
        self, encoder: ImageEncoder, images: torch.Tensor, anchor: torch.Tensor, delta0: torch.Tensor,
        rng: ImageRandomness, signs: list[torch.Tensor] | None = None,
        first: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """delta_0 .. delta_T of T orthogonal-gradient momentum steps from delta0 (Eqs. 5-9).

        ``first``: ``(f(x + delta0), delta0 as the leaf it was computed from)``, whose graph gives the first
        step's gradient instead of a fresh forward (the tau score's own pass). The update directions
        sign(m_t) are appended to ``signs`` if given, for ``replay_steps``.
        """
        x, target = images.detach(), anchor.detach()
        delta = delta0.detach()
        kept = [delta]
        velocity = torch.zeros_like(x)
        for step in range(self.steps):
            with torch.enable_grad():
                if step == 0 and first is not None:
                    moved, leaf = first
                else:
                    leaf = delta.requires_grad_(True)
                    moved = encoder(x + leaf)
                # Scaled under fp16 so small gradients keep their direction; normalised away below.
                loss = loss_scale(x.device) * (moved.float() - target).pow(2).sum()
                (grad,) = torch.autograd.grad(loss, leaf)
            direction = unit_per_image(grad.float())
            explore = orthogonal_direction(rng.normal_like(x), direction)
            velocity = self.momentum * velocity + (1 - self.momentum) * (direction + self.orthogonal_weight * explore)
            if signs is not None:
                signs.append(velocity.sign())
            delta = sign_step(x, delta.detach(), velocity, self.step_size, self.eps)
            kept.append(delta)
        return kept

    def final_delta(self, kept: list[torch.Tensor]) -> torch.Tensor:
        """What the gate mixes with delta0: delta_T (``last``) or TTC's softmax(beta k) average of them all."""
        if self.final == "last":
            return kept[-1]
        return weighted_mix(kept, softmax_weights(self.beta, len(kept)))

    def mix(self, weight: torch.Tensor, final_delta: torch.Tensor, delta0: torch.Tensor) -> torch.Tensor:
        """``w final + (1 - w) delta0`` per image (Algorithm 1, line 17)."""
        w = weight.to(final_delta.dtype).view(-1, *([1] * (final_delta.ndim - 1)))
        return w * final_delta + (1 - w) * delta0

    def _score_and_start(
        self, encoder: ImageEncoder, x: torch.Tensor, rng: ImageRandomness, keep_graph: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``(score, f(x), delta0, first)`` with this order of draws: tau: delta0 (TTC's first draw, so tau is
        TTC's own); directional: the M copies' noise, then delta0. ``first`` is the tau pass to reuse as the
        first step's forward (None if there is none). ``keep_graph``: the score stays differentiable in x."""
        with torch.set_grad_enabled(keep_graph):
            if self.score == "directional":
                score_encoder = self.tau_encoder if self.tau_encoder is not None else encoder
                score, anchor = self.sensitivity_score(score_encoder, x, self.sensitivity_noise(x.detach(), rng))
                if self.tau_encoder is not None:  # the steps move away from the defended encoder's f(x)
                    with full_precision(x.device):
                        anchor = encoder(x).float()
                return score, anchor, project(x, rng.uniform_like(x, -self.eps, self.eps), self.eps), None
            delta0 = project(x, rng.uniform_like(x, -self.eps, self.eps), self.eps)
            with full_precision(x.device):  # a score of two nearby embeddings: float32 only
                anchor = encoder(x).float()
                if self.tau_encoder is not None:
                    score = relative_shift(self.tau_encoder(x + delta0).float(), self.tau_encoder(x).float())
                    return score, anchor, delta0, None
                if keep_graph:  # differentiable in x, delta0's projection included
                    return relative_shift(encoder(x + delta0).float(), anchor), anchor, delta0, None
                with torch.enable_grad():
                    leaf = delta0.detach().clone().requires_grad_(True)
                    moved = encoder(x + leaf)
                score = relative_shift(moved.detach().float(), anchor)
        return score, anchor, delta0, (moved, leaf)

    # -- the defense ---------------------------------------------------------------------------------

    @torch.no_grad()
    def counterattack(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DOCResult:
        """The defended images; the draws: the score's (see ``_score_and_start``), then one normal per step."""
        x = check_pixels(images).detach().float()
        encoder = classifier.encoder
        score, anchor, delta0, first = self._score_and_start(encoder, x, rng, keep_graph=False)
        final = self.final_delta(self.orthogonal_steps(encoder, x, anchor, delta0, rng, first=first))
        weight = self.soft_gate(score)
        return DOCResult(x + self.mix(weight, final, delta0), score, weight, delta0, final)

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        result = self.counterattack(classifier, images, rng)
        # "Counterattacked": the score is on the gate's flagged side, where the soft gate leans towards the
        # counterattack (w > 1/2).
        return DefenseOutput(classifier.logits(result.images), result.score, self.gate.flags(self, result.score),
                             result.images)

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str,
        with_score: bool = False
    ) -> AttackView:
        """DOC as a function of its input, with this call's draws held fixed (a new call draws anew: EOT).

        exact: the steps are replayed with their recorded update directions sign(m_t). A sign has
        zero derivative, so this is the unrolled loop's own derivative (almost everywhere): images
        enter through delta0's and every step's projection onto the [0, 1] box, and through the
        soft gate w, whose score is differentiated (through f(x) and f(x + delta0), or the M copies).
        bpda: the mixed perturbation is a constant. with_score: the score and its threshold; a higher
        score means a weaker counterattack, as TTC's tau.
        """
        check_pixels(images)
        encoder = classifier.encoder
        keep_graph = torch.is_grad_enabled() and (method == "exact" or with_score)
        score, anchor, delta0, _ = self._score_and_start(encoder, images, rng, keep_graph)
        signs: list[torch.Tensor] = []
        with torch.no_grad():
            self.orthogonal_steps(encoder, images.detach(), anchor.detach(), delta0.detach(), rng, signs)
        kept = [delta0, *replay_steps(images, delta0, signs, self.step_size, self.eps)]
        delta = self.mix(self.soft_gate(score), self.final_delta(kept), delta0)
        logits = classifier.logits(through_defense(images, delta, method))
        return AttackView(logits, score if with_score else None)

    def with_score_encoder(self, encoder: ImageEncoder) -> DOC:
        return replace(self, tau_encoder=encoder)

    def describe(self) -> dict:
        separate = self.tau_encoder is not None
        # Which encoder the score ran on: the directional score moved to the tau encoder in 0.2 (a new run).
        return {**describe_options(self), "separate_tau_encoder": separate,
                "score_encoder": "tau encoder" if separate else "defended"}
