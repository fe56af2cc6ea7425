"""Contrastive Spectral Rectification (CSR; Nie, Zhang, Wang, Shan, Chen; ICML 2026, arXiv 2601.19210).

Adversarial perturbations live mostly at high spatial frequencies, so a low-pass filter moves an
attacked image's embedding far more than a clean one's. With f the image encoder and
phi(z) = f(z) / ||f(z)||, for each image x (the reference class ``CSRDefense``, not ``FastCSRDefense``):

1. Low-pass filter: x_low = clip_[0,1](IFFT(H . FFT(x))), per channel, with the Gaussian mask
   ``H(u, v) = exp(-(u^2 + v^2) / (2 r^2))`` over signed DFT frequencies (Butterworth of order n,
   ``1 / (1 + (D / r)^(2n))``, and the ideal mask ``D <= r`` are the reference's other options).
2. Spectral consistency gate: ``C(x) = <phi(x), phi(x_low)>``. ``C >= tau_thres`` (0.85): benign,
   classified as is. ``C < tau_thres``: flagged.
3. Contrastive rectification, flagged images only: a = phi(x_low), b = phi(x), both constants;
   ``S(x') = <phi(x'), a> - lambda <phi(x'), b>``. From x' = x (no random start), ``steps`` (3)
   signed-gradient ascent steps of ``step_size`` (2/255) on S within ``eps`` (4/255) and [0, 1].
4. Greedy selection: of the candidates x = x_0, x_1, ..., x_N, the one with the highest S (the
   earliest on a tie, as the reference's strict ``>``), is classified.

Defaults: the repository's ``CSRConfig`` (Gaussian, r 40, threshold 0.85, 3 steps, eps 4/255,
step 2/255; lambda = 1 is hard-coded there). Whether the paper used them for every backbone is
UNCERTAIN, as is the paper's lambda; the specification (docs/successors.md, section 3) recommends
these values. The threshold was set for OpenAI CLIP at 224 px: recalibrate it for another encoder.
It does not transfer to the 32-px tiny CLIP of the tests: there 0.85 flags about 30% of clean
CIFAR-10 images (and rectifying a clean image costs it its class most of the time), while about
0.65 flags 5%.

Where the filter is applied, and its radius. r = 40 is in DFT bins of the 224 x 224 tensor the
reference model sees (40 / 112 of its Nyquist band). Here images come at any size and the
classifier resizes them, so the filter runs on the model's input grid: x is resized exactly as the
encoder resizes it (bicubic, antialiased) and filtered there with ``r * side / 224`` bins per axis
(5.7 bins for a 32-px model), i.e. the same fraction of the band the encoder can see. Reasons:
the reference filters the resized tensor, not the file's pixels; the encoder then sees x_low as
filtered and clamped, with no second resampling; the mask depends on the model alone, and the FFT
costs the same whatever the images' size. Only the filtered *target* lives on the model grid: the
rectification perturbs x at its own size, in its own pixels.

Cost per image at the defaults, as measured by ``count_encoder_passes``: benign 2 forwards,
0 backwards; flagged 6 forwards, 3 backwards. The reference codes 3 / 0 and 8 / 3: it runs f(x)
again to classify a benign image, and again as the repulsion target, and classifies x* with one
more forward. Those recompute embeddings already in hand (the same numbers), so they are reused;
6 / 3 is the minimum the specification names. Nothing is random: ``rng`` is not drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..attacks.loop import replay_steps, run_steps
from ..classifier import ImageEncoder, ZeroShotClassifier
from ..inputs import check_pixels
from ..errors import CounterattackError
from ..precision import full_precision
from ..randomness import ImageRandomness
from .base import (
    PIXEL_UNIT, REFERENCE_SIDE, AttackView, DefenseOutput, Gate, describe_options, option,
    register_defense, through_defense,
)

FILTERS = ("gaussian", "butterworth", "ideal")


def low_pass_mask(
    height: int, width: int, radius_y: float, radius_x: float, kind: str = "gaussian", order: int = 2,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The mask over ``rfft2``'s half spectrum, shape ``(height, width // 2 + 1)``, 1 at DC.

    Frequencies are signed DFT indices (cycles per image), the distances the reference measures from
    the centre of its shifted spectrum; a radius per axis keeps a non-square grid's band fraction.
    """
    fy = torch.fft.fftfreq(height, d=1.0 / height, device=device, dtype=torch.float64)
    fx = torch.fft.rfftfreq(width, d=1.0 / width, device=device, dtype=torch.float64)
    relative_sq = (fy[:, None] / radius_y) ** 2 + (fx[None, :] / radius_x) ** 2  # (D / r)^2
    if kind == "gaussian":
        mask = torch.exp(-relative_sq / 2)
    elif kind == "butterworth":
        mask = 1 / (1 + relative_sq**order)
    elif kind == "ideal":
        mask = (relative_sq <= 1).to(torch.float64)
    else:
        raise CounterattackError(f"Unknown low-pass filter {kind!r}. Available: {', '.join(FILTERS)}.")
    return mask.float()


def apply_mask(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Filter every channel with a symmetric half-spectrum mask; linear and differentiable (before any clamp)."""
    spectrum = torch.fft.rfft2(images.float(), norm="ortho")
    return torch.fft.irfft2(spectrum * mask, s=images.shape[-2:], norm="ortho")


def to_model_grid(encoder: ImageEncoder, images: torch.Tensor) -> torch.Tensor:
    """``images`` resized as the encoder resizes them (unchanged at its input size)."""
    if tuple(images.shape[-2:]) == tuple(encoder.image_size):
        return images
    return F.interpolate(images, size=encoder.image_size, mode="bicubic", align_corners=False, antialias=True)


@dataclass
class CSRResult:
    """The classified images and the per-image quantities behind them."""

    images: torch.Tensor  # x*: the selected candidate, x itself for a benign image
    consistency: torch.Tensor  # C(x), the gate's score
    flagged: torch.Tensor  # C(x) < tau_thres
    embeddings: torch.Tensor  # f(x*), so classifying needs no further pass
    signs: list[torch.Tensor]  # each step's gradient signs, flagged images only (for replay_steps)
    selected: torch.Tensor  # per flagged image, k of the chosen candidate x_k (0: x itself)
    scores: torch.Tensor  # per flagged image, S(x_0), ..., S(x_N): shape (flagged, steps + 1)


@register_defense
@dataclass(frozen=True)
class CSR:
    """CSR, Nie et al., ICML 2026: a low-pass consistency gate, then contrastive rectification of flagged images.

    Cost per image at the defaults: 2 forwards if judged benign; 6 forwards and 3 backwards if flagged.
    Example::

        csr = CSR()
        output = csr(classifier, images, ImageRandomness.from_seed(0, len(images)))
        output.score, output.counterattacked  # C(x) and C(x) < 0.85
    """

    paper_precision: ClassVar[str] = "fp32"  # its authors' code runs in float32
    gate: ClassVar[Gate] = Gate("spectral consistency")  # cos(f(x), f(LPF x)): a low one flags the image
    lpf_radius: float = option(40.0, "low-pass radius in DFT bins of a 224-px input; scaled to the model's input side")
    filter_type: str = option("gaussian", "low-pass mask", choices=FILTERS)
    butterworth_order: int = option(2, "order of the Butterworth mask", low=1)
    tau_thres: float = option(0.85, "an image whose spectral consistency cos(f(x), f(LPF x)) is below this is "
                                    "rectified (set for ViT at 224 px)", low=None, aliases=("--csr-detect-thresh",))
    eps: float = option(4 / 255, "rectification budget", unit=PIXEL_UNIT)
    steps: int = option(3, "rectification steps (candidates: x and each step's result)")
    step_size: float = option(2 / 255, "size of each step", unit=PIXEL_UNIT)
    repulsion: float = option(1.0, "lambda: weight of the repulsion from phi(x) in the score (uncertain; the code's 1)",
                              low=None)

    def __post_init__(self) -> None:
        if not self.lpf_radius > 0:
            raise CounterattackError(f"csr: lpf_radius must be > 0, got {self.lpf_radius:g}.")

    # -- the pieces ------------------------------------------------------------------------------

    def model_radius(self, encoder: ImageEncoder) -> tuple[float, float]:
        """The mask's radius in bins of the model's input grid, per axis (y, x)."""
        height, width = encoder.image_size
        return self.lpf_radius * height / REFERENCE_SIDE, self.lpf_radius * width / REFERENCE_SIDE

    def low_pass(self, encoder: ImageEncoder, images: torch.Tensor) -> torch.Tensor:
        """x_low on the model's input grid, in [0, 1]; differentiable."""
        resized = to_model_grid(encoder, images)
        mask = low_pass_mask(*resized.shape[-2:], *self.model_radius(encoder), self.filter_type, self.butterworth_order,
                             resized.device)
        return apply_mask(resized, mask).clamp(0, 1)

    def consistency(self, encoder: ImageEncoder,
                    images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(C(x), f(x), f(x_low))``, in float32 whatever the precision policy: the gate compares nearby
        embeddings."""
        with full_precision(images.device):
            plain = encoder(images).float()
            low = encoder(self.low_pass(encoder, images)).float()
        return F.cosine_similarity(plain, low, dim=-1), plain, low

    def rectify(
        self, encoder: ImageEncoder, images: torch.Tensor, attraction: torch.Tensor, repulsion: torch.Tensor,
        signs: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ascend S from x and pick the best candidate: ``(x*, f(x*), k*, scores)``; signs appended to ``signs``.

        ``attraction`` and ``repulsion`` are unit rows (phi(x_low), phi(x)). Every evaluation of S is
        a candidate: the loop's forwards at x_0..x_{N-1}, then one more at x_N.
        """
        direction = attraction - self.repulsion * repulsion  # S(x') = <phi(x'), a - lambda b>
        candidates: list[torch.Tensor] = []
        scores: list[torch.Tensor] = []
        embeddings: list[torch.Tensor] = []

        def score(moved: torch.Tensor) -> torch.Tensor:
            features = encoder(moved).float()
            per_image = (F.normalize(features, dim=-1) * direction).sum(-1)
            candidates.append(moved.detach())
            scores.append(per_image.detach())
            embeddings.append(features.detach())
            return per_image.sum()

        final = run_steps(score, images, torch.zeros_like(images), self.eps, self.step_size, self.steps, signs)
        score(images + final)
        all_scores = torch.stack(scores, dim=1)  # (n, steps + 1)
        best = all_scores.argmax(dim=1)  # the first maximum: a later candidate must score strictly higher
        rows = torch.arange(len(images), device=images.device)
        return torch.stack(candidates)[best, rows], torch.stack(embeddings)[best, rows], best, all_scores

    # -- the defense ---------------------------------------------------------------------------------

    @torch.no_grad()
    def purify(self, classifier: ZeroShotClassifier, images: torch.Tensor) -> CSRResult:
        """The classified images and the gate's diagnostics (the gate in float32, the steps under the precision
        policy)."""
        encoder = classifier.encoder
        x = check_pixels(images).detach().float()
        consistency, plain, low = self.consistency(encoder, x)
        flagged = self.gate.flags(self, consistency)
        chosen = flagged.nonzero().flatten()
        defended, embeddings = x.clone(), plain.clone()
        signs: list[torch.Tensor] = []
        selected = torch.zeros(len(chosen), dtype=torch.long, device=x.device)
        scores = x.new_zeros(len(chosen), self.steps + 1)
        if len(chosen):
            attraction, repulsion = F.normalize(low[chosen], dim=-1), F.normalize(plain[chosen], dim=-1)
            best_images, best_embeddings, selected, scores = self.rectify(encoder, x[chosen], attraction, repulsion,
                                                                          signs)
            defended[chosen] = best_images
            embeddings[chosen] = best_embeddings.to(embeddings.dtype)
        return CSRResult(defended, consistency, flagged, embeddings, signs, selected, scores)

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        result = self.purify(classifier, images)
        logits = classifier.logits_from_embeddings(result.embeddings)
        return DefenseOutput(logits, result.consistency, result.flagged, result.images)

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str,
        with_score: bool = False
    ) -> AttackView:
        """CSR as a function of its input; nothing is random, so EOT adds nothing.

        exact: the gate, the step signs and the greedy choice of this input are held; the chosen
        step is replayed, so the images enter through every step's projection onto the [0, 1] box
        (a = phi(x_low) and b = phi(x) steer only the signs and the choice, both held). bpda: the
        chosen perturbation is a constant. with_score: C(x) itself, differentiated through both
        encoder passes and the low-pass filter (linear, and kept in the graph), with tau_thres:
        raising C above it gets an image judged benign and classified untouched.
        """
        check_pixels(images)
        result = self.purify(classifier, images.detach())
        delta = torch.zeros_like(images)
        chosen = result.flagged.nonzero().flatten()
        if len(chosen):
            start = torch.zeros_like(images[chosen])
            steps = torch.stack([start, *replay_steps(images[chosen], start, result.signs, self.step_size, self.eps)])
            picked = steps[result.selected, torch.arange(len(chosen), device=images.device)]
            delta = delta.index_put((chosen,), picked)
        logits = classifier.logits(through_defense(images, delta, method))
        tau = self.consistency(classifier.encoder, images)[0] if with_score else None
        return AttackView(logits, tau)

    def describe(self) -> dict:
        return {**describe_options(self), "reference_side": REFERENCE_SIDE}
