"""Multi-view guided Adaptive Counterattack (MAC; Kim & Um, CVPR 2026).

"When CLIP Sees More, It Fights Back Harder". Specified in ``docs/successors.md`` section 1, after
the authors' ``code/mac.py``. For each image x, with f the image encoder (unnormalised embeddings):

1. Views: ``v_0 = x`` and ``v_i = T_i(x)`` for i = 1..views-1, each T_i a fresh draw from the
   augmentation distribution below.
2. For every view v (the views form one batch; the paper's joint objective splits per view):
   - anchor ``e = f(v)``;
   - corruption degree ``d = ||f(T'(v)) - e|| / (||e|| + 1e-10)`` with a second, fresh draw T'
     (for v_1 this is ``T'(T_1(x))``, as the code does);
   - soft weight ``w = sigmoid((d - tau_thres) / tau_temp)``: a large d (an augmentation breaks
     the embedding) reads as heavy corruption, the opposite of TTC's "falsely stable" signal;
   - counterattack from ``delta0 ~ U[-eps, eps]`` (kept in [0, 1]): ``steps`` signed steps of
     ``step_size`` ascending ``||f(v + delta) - e||^2``, projected onto the eps ball and the box;
   - defended view ``v + w * delta_K``: the last iterate only, no step averaging, no fallback
     to delta0. Every view gets all the steps, even where w is about 0.
3. Logits: the mean over the views of ``logit_scale * cos(f(v + w delta_K), t_c)``.

The augmentation distribution (the code's ``build_aug``, torchvision ops on [0, 1] tensors, in
this order): a random affine map (rotation within +-5 degrees, translation up to 4 % of each side,
scale in [0.92, 1.08], bilinear, fill 0); colour jitter with probability 0.5 (brightness,
contrast, saturation 0.08, hue 0.02, in a random order); a 5x5 Gaussian blur with probability 0.5,
sigma in [0.5, 1.2]; with probability 0.5 additive Gaussian noise of a standard deviation drawn
in [0, 0.02], clamped to [0, 1]. Here each is a batched tensor operation (``counterattack.augment``),
differentiable in the image, whose parameters are per-image draws of ``ImageRandomness``
(torchvision's random transforms draw from the global generator, so results would depend on
batching). They equal torchvision's functional ops for the same parameters (the tests check this),
down to two of its details: translations are rounded to whole pixels, and the bilinear fill
multiplies by the interpolated coverage mask, so border pixels fade towards 0.

The augmentations' pixel units (the blur's kernel and sigma, the whole pixels translations round
to) are those of a 224-px input, the code's; on an input of another side they scale with side/224,
as CSR's low-pass radius does: on a 32-px image the blur's sigma would be 0.07-0.17 px and its
kernel rounds to 1 px, so it is no blur at all (at 112 px: sigma 0.25-0.6, a 3-px kernel), and
translations round to 1/7 px, so a view is as mild a corruption as on the authors' inputs. At 224 px
nothing changes.

Defaults (``mac_test.sh``): eps 8/255, 4 steps of eps/4 = 2/255 (the code ties the step to eps), 2 views,
tau_thres 0.7, tau_temp 0.01. tau_thres was calibrated on OpenAI ViT-B/32 under fp16 autocast and
is backbone-specific (the spec marks it so): recalibrate it on the distribution of d for clean and
adversarial images before trusting the gate on another encoder. ``tau_temp = 0`` makes the gate
hard (``w = 1`` where ``d > tau_thres``), the paper's ablation. The spec marks one reading
uncertain, the second augmentation of an already augmented view; this follows the code. The gate
weighs every view by its own d, so the score MAC reports, gate evasion pushes and ``calibrate``
thresholds is every view's d (a calibrated threshold flags a fraction of *views*). With ``steps = 0``
a view gets delta0 itself, as the code returns it, not w * delta0.

Cost per image, as counted by ``count_encoder_passes`` at the defaults: per view f(v) and
f(T'(v)), ``steps`` forward/backward pairs and one classification forward, i.e.
``views * (steps + 3)`` forwards and ``views * steps`` backwards: 14 / 8, the spec's count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..attacks.loop import project, replay_steps, run_steps
from ..augment import (
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, affine, apply_to_rows, gaussian_blur, per_image,
)
from ..classifier import ZeroShotClassifier
from ..inputs import check_pixels
from ..errors import CounterattackError
from ..precision import full_precision
from ..randomness import ImageRandomness
from .base import (
    PIXEL_UNIT, REFERENCE_SIDE, AttackView, DefenseOutput, Gate, describe_options, option,
    register_defense, shown_views, spread, through_defense,
)

# Columns of one augmentation draw: every per-image parameter comes from a single uniform draw.
_ANGLE, _SHIFT_X, _SHIFT_Y, _SCALE = 0, 1, 2, 3
_JITTER, _BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 4, 5, 6, 7, 8
_ORDER = slice(9, 13)  # four uniforms whose ranks give the colour jitter's random order
_BLUR, _BLUR_SIGMA, _NOISE, _NOISE_SIGMA = 13, 14, 15, 16
_PARAMETERS = 17

# The colour jitter's operations, numbered as the order columns rank them.
_BRIGHTNESS_OP, _CONTRAST_OP, _SATURATION_OP, _HUE_OP = range(4)


def corruption_degree(moved: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``||moved - anchor|| / (||anchor|| + 1e-10)`` per row: MAC's d (its code's epsilon)."""
    return (moved - anchor).norm(dim=-1) / (anchor.norm(dim=-1) + 1e-10)


def soft_weight(degree: torch.Tensor, tau_thres: float, tau_temp: float) -> torch.Tensor:
    """``sigmoid((d - tau_thres) / tau_temp)``; with ``tau_temp = 0`` the hard gate ``d > tau_thres``."""
    if tau_temp == 0:
        return (degree > tau_thres).to(degree.dtype)
    return torch.sigmoid((degree - tau_thres) / tau_temp)


@dataclass
class AugmentationDraw:
    """Per-image parameters of draws from MAC's augmentation distribution (one row per augmented image)."""

    parameters: torch.Tensor  # (m, _PARAMETERS): the uniforms, mapped to ranges by MAC.augment
    noise: torch.Tensor  # (m, 3, H, W) standard normal, scaled by the drawn noise level where applied

    def rows(self, index: torch.Tensor) -> "AugmentationDraw":
        return AugmentationDraw(self.parameters[index], self.noise[index])


@register_defense
@dataclass(frozen=True)
class MAC:
    """Multi-view guided Adaptive Counterattack, Kim & Um, CVPR 2026 (2 views, 8/255, 4 steps of 2/255; 14 fwd / 8 bwd).

    Example::

        mac = MAC()
        output = mac(classifier, images, ImageRandomness.from_seed(0, len(images), "mac"))
        predictions = output.logits.argmax(-1)  # output.score: corruption degree of each image itself
    """

    # A large d flags a view (TTC's tau: a small one).
    gate: ClassVar[Gate] = Gate("corruption degree", flags_above=True)
    eps: float = option(8 / 255, "counterattack budget (and delta0's range)", unit=PIXEL_UNIT)
    steps: int = option(4, "counterattack steps")
    step_size: float | None = option(None, "size of each step (default: eps / 4, as the code ties it)", unit=PIXEL_UNIT)
    views: int = option(2, "views per image: the image and views-1 augmentations of it", low=1)
    tau_thres: float = option(0.7, "corruption degree where the weight is 1/2 (calibrated for ViT-B/32)")
    tau_temp: float = option(0.01, "temperature of the sigmoid weight (0: hard gate)")
    rotation: float = option(5.0, "augmentation: rotation range, +- degrees", high=180)
    translate: float = option(0.04, "augmentation: translation range, +- fraction of each side", high=1)
    scale_low: float = option(0.92, "augmentation: smallest scale", low=0.01)
    scale_high: float = option(1.08, "augmentation: largest scale", low=0.01)
    jitter_p: float = option(0.5, "augmentation: probability of the colour jitter", high=1)
    brightness: float = option(0.08, "colour jitter: brightness factor within 1 +- this", high=1)
    contrast: float = option(0.08, "colour jitter: contrast factor within 1 +- this", high=1)
    saturation: float = option(0.08, "colour jitter: saturation factor within 1 +- this", high=1)
    hue: float = option(0.02, "colour jitter: hue shift within +- this (turns)", high=0.5)
    blur_p: float = option(0.5, "augmentation: probability of the Gaussian blur", high=1)
    blur_kernel: int = option(5, "Gaussian blur: kernel side (odd), in pixels of a 224-px input (scaled with side/224)",
                              low=1)
    blur_sigma_low: float = option(0.5, "Gaussian blur: smallest sigma, pixels of a 224-px input", low=0.01)
    blur_sigma_high: float = option(1.2, "Gaussian blur: largest sigma, pixels of a 224-px input", low=0.01)
    noise_p: float = option(0.5, "augmentation: probability of additive Gaussian noise", high=1)
    noise_sigma: float = option(0.02, "additive noise: standard deviation drawn in [0, this]", high=1)

    def __post_init__(self) -> None:
        if self.scale_low > self.scale_high or self.blur_sigma_low > self.blur_sigma_high:
            raise CounterattackError(f"{self.name}: a range's low end exceeds its high end (scale or blur sigma).")
        if self.blur_kernel % 2 == 0:
            raise CounterattackError(f"{self.name}: blur_kernel must be odd, got {self.blur_kernel}.")

    @property
    def alpha(self) -> float:
        """The step size: as set, else eps / 4 (the code's)."""
        return self.eps / 4 if self.step_size is None else self.step_size

    # The augmentation distribution ------------------------------------------------------------

    def draw_augmentations(self, rng: ImageRandomness, copies: int, images: torch.Tensor) -> AugmentationDraw:
        """``copies`` draws for each image of ``images`` (shaped like one view per stream), image-major:
        row ``i * copies + j`` is image i's j-th draw. Three draws of each image's stream (parameters, normal noise)."""
        n = len(rng)
        uniforms = rng.uniform(copies, _PARAMETERS, device=images.device).view(n * copies, _PARAMETERS)
        normal = rng.normal_like(images.new_empty(n, copies, *images.shape[1:])).view(n * copies, *images.shape[1:])
        applied = (uniforms[:, _NOISE] < self.noise_p).to(normal.dtype)
        level = uniforms[:, _NOISE_SIGMA] * self.noise_sigma * applied
        return AugmentationDraw(uniforms, normal * per_image(level))

    def augment(self, images: torch.Tensor, draw: AugmentationDraw) -> torch.Tensor:
        """The drawn augmentations applied to ``images`` (one row of ``draw`` each); differentiable."""
        u = draw.parameters
        height, width = images.shape[-2:]
        unit = min(height, width) / REFERENCE_SIDE  # one pixel of a 224-px input, in this input's pixels

        def symmetric(column: int, half_range: float) -> torch.Tensor:
            return (2 * u[:, column] - 1) * half_range

        def whole_pixels(shift: torch.Tensor) -> torch.Tensor:
            """RandomAffine rounds its translation to whole pixels: of a 224-px input."""
            return torch.round(shift / unit) * unit

        shift = torch.stack((whole_pixels(symmetric(_SHIFT_X, self.translate * width)),
                             whole_pixels(symmetric(_SHIFT_Y, self.translate * height))), dim=1)
        scale = self.scale_low + u[:, _SCALE] * (self.scale_high - self.scale_low)
        out = affine(images, symmetric(_ANGLE, self.rotation), shift, scale)

        jittered = (u[:, _JITTER] < self.jitter_p).nonzero().flatten()
        out = apply_to_rows(out, jittered, lambda x, rows: self._color_jitter(x, u[rows]))

        blurred = (u[:, _BLUR] < self.blur_p).nonzero().flatten()
        sigma = unit * (self.blur_sigma_low + u[:, _BLUR_SIGMA] * (self.blur_sigma_high - self.blur_sigma_low))
        kernel = 2 * round((self.blur_kernel - 1) / 2 * unit) + 1  # odd, the 224-px kernel's reach
        out = apply_to_rows(out, blurred, lambda x, rows: gaussian_blur(x, sigma[rows], kernel))

        noisy = (u[:, _NOISE] < self.noise_p).nonzero().flatten()
        return apply_to_rows(out, noisy, lambda x, rows: (x + draw.noise[rows]).clamp(0, 1))

    def _color_jitter(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """ColorJitter's four adjustments in each image's own random order."""
        factors = {
            _BRIGHTNESS_OP: 1 + (2 * u[:, _BRIGHTNESS] - 1) * self.brightness,
            _CONTRAST_OP: 1 + (2 * u[:, _CONTRAST] - 1) * self.contrast,
            _SATURATION_OP: 1 + (2 * u[:, _SATURATION] - 1) * self.saturation,
            _HUE_OP: (2 * u[:, _HUE] - 1) * self.hue,
        }
        adjust = {_BRIGHTNESS_OP: adjust_brightness, _CONTRAST_OP: adjust_contrast,
                  _SATURATION_OP: adjust_saturation, _HUE_OP: adjust_hue}
        order = u[:, _ORDER].argsort(dim=1)  # a uniformly random permutation per image
        for position in range(order.shape[1]):
            for op, function in adjust.items():
                chosen = (order[:, position] == op).nonzero().flatten()
                images = apply_to_rows(images, chosen, lambda x, rows, f=function, a=factors[op]: f(x, a[rows]))
        return images

    def build_views(self, images: torch.Tensor, draw: AugmentationDraw | None) -> torch.Tensor:
        """``(n * views, 3, H, W)``, image-major: each image, then its augmented views."""
        if draw is None:
            return images
        n = len(images)
        augmented = self.augment(images.repeat_interleave(self.views - 1, dim=0), draw)
        return torch.cat((images.unsqueeze(1), augmented.view(n, self.views - 1, *images.shape[1:])),
                         dim=1).flatten(0, 1)

    # The defense ---------------------------------------------------------------------------------

    @torch.no_grad()
    def counterattack(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> "MACResult":
        """The views, their defended versions and the gate's diagnostics. Under a mixed-precision policy
        (``precision_context``) the gate's passes, f(v) and f(T'(v)), stay in float32; the steps use the policy."""
        encoder = classifier.encoder
        x = check_pixels(images).detach().float()
        if len(rng) != len(x):
            raise ValueError(f"{len(x)} images but {len(rng)} random streams")
        n, v = len(x), self.views
        # The spec's draw order: the views, the second augmentations, delta0.
        view_draw = self.draw_augmentations(rng, v - 1, x) if v > 1 else None
        views = self.build_views(x, view_draw)
        corruption_draw = self.draw_augmentations(rng, v, x)
        corrupted = self.augment(views, corruption_draw)
        noise = rng.uniform_like(views.view(n, v, *x.shape[1:]), -self.eps, self.eps).flatten(0, 1)

        with full_precision(x.device):  # d compares two nearby embeddings: float32 only
            embeddings = encoder(torch.cat((views, corrupted))).float()
        anchor, moved = embeddings[: n * v], embeddings[n * v :]
        degree = corruption_degree(moved, anchor)
        weights = soft_weight(degree, self.tau_thres, self.tau_temp)

        def embedding_shift(perturbed: torch.Tensor) -> torch.Tensor:
            return (encoder(perturbed).float() - anchor).pow(2).sum()

        signs: list[torch.Tensor] = []
        last = run_steps(embedding_shift, views, project(views, noise, self.eps), self.eps, self.alpha, self.steps,
                         signs)
        defended = views + self.modulated(weights, last)
        return MACResult(views, defended, degree.view(n, v), weights.view(n, v), view_draw, corruption_draw, noise,
                         signs)

    def modulated(self, weights: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Each view's perturbation: ``w * delta_K``; with no steps, delta0 itself (the code's)."""
        return last if self.steps == 0 else per_image(weights.flatten()) * last

    def _mean_over_views(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.view(-1, self.views, logits.shape[-1]).mean(dim=1)

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        result = self.counterattack(classifier, images, rng)
        logits = self._mean_over_views(classifier.logits(result.defended))
        # The gallery's views: the defended views it classified (view 0: the image counterattacked), spread over all.
        defended = result.defended.view(len(logits), self.views, *result.defended.shape[1:])
        shown = shown_views([defended[:, j] for j in spread(self.views)])
        # Every view's own gate: (n, views) scores, and which views it judged corrupted (w > 1/2).
        return DefenseOutput(logits, result.degree, self.gate.flags(self, result.degree), views=shown,
                             view_count=self.views)

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str,
        with_score: bool = False
    ) -> AttackView:
        """MAC as a function of its input, for this draw of every augmentation, noise and delta0.

        The views are differentiable functions of the image (the augmentations are tensor ops) under
        both methods. ``exact`` replays the recorded step signs through the projections of each view
        and holds the weights w; ``bpda`` holds ``w * delta_K`` constant. ``with_score`` gives every
        view's corruption degree d, ``(n, views)``, differentiated through the views, f and the same
        second augmentations, with ``tau_thres``: d *above* the threshold means counterattacked.
        """
        x = check_pixels(images)
        result = self.counterattack(classifier, x.detach(), rng)
        views = self.build_views(x, result.view_draw)
        if method == "exact":
            last = project(views, result.noise, self.eps)
            if result.signs:
                last = replay_steps(views, last, result.signs, self.alpha, self.eps)[-1]
            delta = self.modulated(result.weights, last)
        else:
            delta = result.defended - result.views
        logits = self._mean_over_views(classifier.logits(through_defense(views, delta, method)))
        degree = None
        if with_score:
            corrupted = self.augment(views, result.corruption_draw)
            with full_precision(x.device):
                degree = corruption_degree(classifier.encoder(corrupted).float(), classifier.encoder(views).float())
            degree = degree.view(len(x), self.views)
        return AttackView(logits, degree)

    def describe(self) -> dict:
        return {**describe_options(self), "step_size": self.alpha, "pixel_units": f"of a {REFERENCE_SIDE}-px input"}


@dataclass
class MACResult:
    """Views, defended views (image-major, ``n * views`` rows) and per-view diagnostics."""

    views: torch.Tensor  # row i * views + j: view j of image i; view 0 is the image itself
    defended: torch.Tensor  # views + w * delta_K
    degree: torch.Tensor  # (n, views): corruption degree d of each view
    weights: torch.Tensor  # (n, views): w = sigmoid((d - tau_thres) / tau_temp)
    view_draw: AugmentationDraw | None  # the augmentations T_i that made views 1.. (None for one view)
    corruption_draw: AugmentationDraw  # the second augmentations T' behind d, one per view
    noise: torch.Tensor  # the uniform draw behind delta0, one per view
    signs: list[torch.Tensor]  # gradient signs of each step, for replay_steps
