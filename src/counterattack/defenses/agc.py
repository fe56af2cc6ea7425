"""Adaptive Geodesic Correction (AGC; Li, Xue, Wang, Liu, Gao, Sun, Li; arXiv 2605.15584).

Specified in ``/work/shared/docs/successors-2026.md`` section 2, after the authors' code
(``lizhiwei23/AGC`` @ 02bcf94: ``utils/tta.py`` ``Adaptive_geo_cor``, ``utils/pull_modes.py``
``build_tangent_filtered_feature``, ``data/augmentation.py`` ``ImageAugmentation``, ``test.py``).
That repository does not run as stored: ``data/dataset.py`` imports ``data.cls_to_names``, which it
does not contain, and ``utils/tools.py`` calls ``fb.attacks.LinfPGD`` without importing foolbox. The
algorithm below is therefore implemented from the code as read, not checked against a run of it.

For each image x, with f the image encoder; no gradient, no parameter update, no gate:

1. Views: ``v_0 = x`` and ``v_1..v_K = P_i(x)`` (K = ``views``, 32), each P_i a fresh draw of
   torchvision's ``RandomPerspective(distortion_scale=0.5, p=1, bicubic, fill=0)``: every corner of
   the image moves inward by a whole number of pixels drawn uniformly in {0, ..., int(distortion *
   (side // 2))} per axis (``RandomPerspective.get_params``), 8 draws per view from the image's own
   stream; the warp maps those four points back onto the image's corners.
2. ``a_i = f(v_i) / ||f(v_i)||`` in float32 (the encoder runs under the run's precision, as the
   code casts its fp16 features to float32 before normalising).
3. Anchor ``m = normalise(mean_{i>=1} a_i)``.
4. Step: attack score ``A = clamp(mean_i (1 - <a_i, a_0>), 0, 1)``; trust ``R = clamp((mean_{i != j}
   <a_i, a_j> + 1) / 2, 0, 1)`` (1 for a single view, as coded); ``c = clamp(A^0.9 R^1.0, 0, 1)``;
   ``beta = beta_clean + (beta_adv - beta_clean) c`` with 0.45 and 2.25 (``Adaptive_geo_cor``'s;
   ``build_tangent_filtered_feature``'s own default 2.4 is overridden there).
5. Geodesic push: ``theta = arccos <a_0, m>`` (the cosine clamped to 1 -+ 1e-8, a no-op in float32),
   ``u`` the unit tangent at a_0 towards m, ``g = normalise(cos(beta theta) a_0 + sin(beta theta) u)``;
   beta = 1 lands on m, beta > 1 goes past it along the great circle; ``theta < 1e-6`` keeps a_0. In
   float32 that test holds only where the cosine rounds to 1: the next cosine down gives theta = 3.5e-4,
   and a feature whose anchor equals it to rounding moves by beta times that along a rounding-noise
   tangent (the code's behaviour, kept; at most 8e-4 rad).
6. Logits ``logit_scale * <g, t_c>`` with the run's class embeddings.

The perspective warp is the code's, PIL's ``Image.transform(PERSPECTIVE, BICUBIC)`` on the 8-bit
image, written as a tensor operation so adaptive attacks differentiate through it: the coefficients
solve torchvision's ``_get_perspective_coeffs`` system (float64, rounded to float32 as there); each
output pixel centre maps to a source point; a source point outside the image gives the fill 0 (PIL
cuts off, it does not fade); inside, PIL's cubic convolution with a = -1 (its Geometry.c kernel, not
resize's -0.5 nor grid_sample's -0.75) over the 4x4 neighbours, indices clamped to the edge. The
tests check this against PIL on float images to 1e-5. The code's PIL image is 8-bit, so its result
is clipped to [0, 255] and truncated: the clip is kept (a clamp to [0, 1]), the truncation is not
(float pixels, as for every defense here). ``interpolation="bilinear"`` takes torchvision's tensor
``perspective`` instead (``grid_sample``, coverage-mask fill), equal to it to 1e-5 (tested).

Where this differs from the code: the code warps a PIL image at its stored resolution, which is the
original dataset image on the clean path but the 224-px PNG on the adversarial path, then resizes to
224 (a no-op for the PNG); here every input is warped at the side it arrives at, clean and adversarial
alike, and the encoder resizes every view. The corner offsets are relative to that side, so the
distortion is the same fraction of the image; at 32 px they round to whole pixels of 32. The code
draws its views from torch's global generator in an 8-thread pool (``deterministic=False``), so its
runs are not reproducible; here they come from each image's stream. The code renormalises unit
vectors again inside each helper (a change of at most a last bit): not repeated here. Its ``beta`` is a
Python float; here a tensor, so that an exact adaptive attack differentiates through A and R.

Not fixed by the code, chosen here: views are drawn from ``rng`` (one draw of ``(views, 8)``
uniforms per call, corner by corner in ``get_params``'s order); the features of a batch's images and
views come from one encoder batch; A and R are not reported as a gate score (AGC has none, and
``DefenseOutput.score`` is read as one by records, plots and ``calibrate``): ``correction`` returns
them with beta and theta for diagnostics.

Cost per image, as counted: ``views + 1`` forwards (33), no backward, in one encoder batch. Through the
defense (``attack_view``): exact 33 forwards and 33 backwards, whose graphs are held together (memory of 33
images per image); bpda 33 forwards, 1 backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..augment import sample_bilinear
from ..classifier import ZeroShotClassifier
from ..inputs import check_pixels
from ..precision import full_precision
from ..randomness import ImageRandomness
from .base import (
    ADAPTIVE_METHODS, AttackView, DefenseOutput, feature_angle, option, register_defense, shown_views, spread,
)

# The code's tolerances: the cosine's clamp before arccos, the tangent's smallest norm, and the angle below
# which the original feature is returned unchanged.
COSINE_CLAMP = 1e-8
TANGENT_FLOOR = 1e-8
NO_ANGLE = 1e-6

INTERPOLATIONS = ("bicubic", "bilinear")


# --- the perspective warp, as torchvision's RandomPerspective ----------------------------------------------


def corner_offsets_to_endpoints(offsets: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Where the corners go, ``(m, 4, 2)`` (x, y), from inward offsets ``(m, 8)`` in ``get_params``'s order
    (top-left x, y; top-right x, y; bottom-right x, y; bottom-left x, y)."""
    dx, dy = offsets[:, 0::2], offsets[:, 1::2]
    right, bottom = width - 1, height - 1
    xs = torch.stack([dx[:, 0], right - dx[:, 1], right - dx[:, 2], dx[:, 3]], dim=1)
    ys = torch.stack([dy[:, 0], dy[:, 1], bottom - dy[:, 2], bottom - dy[:, 3]], dim=1)
    return torch.stack([xs, ys], dim=-1)


def draw_endpoints(rng: ImageRandomness, views: int, height: int, width: int, distortion: float) -> torch.Tensor:
    """``views`` draws of RandomPerspective's corners per image, image-major: ``(len(rng) * views, 4, 2)`` on the
    CPU. ``get_params`` draws each offset as ``randint(0, int(distortion * half) + 1)``: here the floor of a
    uniform times that count (clamped, as a float32 product can round up to the count)."""
    reach_x, reach_y = int(distortion * (width // 2)), int(distortion * (height // 2))
    uniforms = rng.uniform(views, 8, device="cpu").view(-1, 8).double()
    reach = uniforms.new_tensor([reach_x, reach_y] * 4)
    offsets = torch.minimum(torch.floor(uniforms * (reach + 1)), reach)
    return corner_offsets_to_endpoints(offsets, height, width)


def perspective_coefficients(endpoints: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(m, 8)`` float32 coefficients (a..h) of the map from output pixel to source pixel, with
    ``x_src = (a x + b y + c) / (g x + h y + 1)``, that sends ``endpoints`` to the image's corners: torchvision's
    ``_get_perspective_coeffs`` system, solved in float64 (it has exactly one solution) and rounded as there."""
    ends = endpoints.double()
    starts = ends.new_tensor([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]])
    x, y = ends[..., 0], ends[..., 1]  # (m, 4)
    sx, sy = starts[:, 0].expand_as(x), starts[:, 1].expand_as(y)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_x = torch.stack([x, y, one, zero, zero, zero, -sx * x, -sx * y], dim=-1)
    rows_y = torch.stack([zero, zero, zero, x, y, one, -sy * x, -sy * y], dim=-1)
    system = torch.stack([rows_x, rows_y], dim=2).flatten(1, 2)  # (m, 8, 8): corner by corner, x then y
    targets = torch.stack([sx, sy], dim=-1).flatten(1)
    return torch.linalg.solve(system, targets).float()


def source_points(coefficients: torch.Tensor, height: int, width: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For every output pixel centre (x + 0.5, y + 0.5), its source point in continuous pixel coordinates
    (pixel centres at +0.5, as PIL's and torchvision's): two ``(m, H, W)`` float64 tensors. In double, as PIL
    computes them: with integer corners many edge pixels map onto the image's border, and float32 rounding
    would put some of them outside (fill 0) where PIL samples the image."""
    c = coefficients.to(device).double().view(-1, 8, 1, 1)
    xs = (torch.arange(width, device=device, dtype=torch.float64) + 0.5).view(1, 1, width)
    ys = (torch.arange(height, device=device, dtype=torch.float64) + 0.5).view(1, height, 1)
    denominator = c[:, 6] * xs + c[:, 7] * ys + 1
    return (c[:, 0] * xs + c[:, 1] * ys + c[:, 2]) / denominator, (c[:, 3] * xs + c[:, 4] * ys + c[:, 5]) / denominator


def _pil_cubic_weights(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Weights of the neighbours at offsets -1, 0, 1, 2 for a fraction ``t``: PIL's transform kernel, a = -1."""
    return t * (t * (2 - t) - 1), (t - 2) * t * t + 1, t * ((1 - t) * t + 1), (t - 1) * t * t


def sample_bicubic_pil(images: torch.Tensor, source_x: torch.Tensor, source_y: torch.Tensor) -> torch.Tensor:
    """Each image sampled at its own source points as PIL's ``Image.transform`` with BICUBIC and fill 0:
    0 where the point lies outside the image, else cubic convolution (a = -1) over the 4x4 neighbours with
    indices clamped to the edge. Differentiable in ``images``."""
    m, channels, height, width = images.shape
    inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
    x, y = source_x - 0.5, source_y - 0.5  # from continuous coordinates to pixel indices
    left, top = torch.floor(x), torch.floor(y)
    weights_x = [w.to(images.dtype) for w in _pil_cubic_weights(x - left)]
    weights_y = [w.to(images.dtype) for w in _pil_cubic_weights(y - top)]
    flat = images.reshape(m, channels, height * width)
    out = images.new_zeros(m, channels, height * width)
    for j, weight_y in enumerate(weights_y):
        row = (top + (j - 1)).clamp(0, height - 1).long() * width
        for i, weight_x in enumerate(weights_x):
            column = (left + (i - 1)).clamp(0, width - 1).long()
            index = (row + column).reshape(m, 1, -1).expand(m, channels, -1)
            out = out + (weight_y * weight_x).reshape(m, 1, -1) * flat.gather(2, index)
    return (out * inside.reshape(m, 1, -1).to(images.dtype)).view_as(images)


def perspective(images: torch.Tensor, endpoints: torch.Tensor, interpolation: str = "bicubic") -> torch.Tensor:
    """Each image warped so that its ``endpoints`` ``(m, 4, 2)`` land on its corners, fill 0: torchvision's
    ``perspective(img, startpoints=corners, endpoints)`` on a PIL image (bicubic, clipped to [0, 1]) or on a
    tensor (bilinear). Differentiable in ``images``."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; one of {INTERPOLATIONS}")
    height, width = images.shape[-2:]
    source_x, source_y = source_points(perspective_coefficients(endpoints, height, width), height, width,
                                       images.device)
    if interpolation == "bicubic":
        return sample_bicubic_pil(images, source_x, source_y).clamp(0, 1)
    grid = torch.stack((source_x / (width / 2) - 1, source_y / (height / 2) - 1), dim=-1).to(images.dtype)
    return sample_bilinear(images, grid, "zeros", coverage=True)


# --- the correction on the sphere --------------------------------------------------------------------------


def _power(base: torch.Tensor, exponent: float) -> torch.Tensor:
    """``base ** exponent`` for base >= 0, with a zero gradient rather than NaN at base = 0 (a constant image's
    views all equal it, so A = 0 is reachable)."""
    positive = base > 0
    return torch.where(positive, torch.where(positive, base, torch.ones_like(base)).pow(exponent),
                       base.detach().pow(exponent))


def geodesic_push(original: torch.Tensor, anchor: torch.Tensor,
                  beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, theta)``: each unit row of ``original`` moved ``beta * theta`` along the great circle towards its
    unit ``anchor``, theta their angle; rows with theta < 1e-6 are returned as they are (the code's test)."""
    cosine = (original * anchor).sum(dim=-1)
    clamped = cosine.clamp(-1 + COSINE_CLAMP, 1 - COSINE_CLAMP)
    with torch.no_grad():
        kept = torch.arccos(clamped) < NO_ANGLE
    # arccos has an infinite slope at 1: the kept rows take a harmless cosine so no NaN reaches a gradient.
    theta = torch.arccos(torch.where(kept, torch.zeros_like(clamped), clamped))
    tangent = anchor - cosine.unsqueeze(-1) * original
    direction = tangent / tangent.norm(dim=-1, keepdim=True).clamp_min(TANGENT_FLOOR)
    step = (beta * theta).unsqueeze(-1)
    pushed = F.normalize(torch.cos(step) * original + torch.sin(step) * direction, dim=-1)
    return torch.where(kept.unsqueeze(-1), original, pushed), torch.where(kept, torch.zeros_like(theta), theta)


@dataclass
class Correction:
    """One draw of AGC for a batch: the corrected features and the per-image quantities behind them."""

    corrected: torch.Tensor  # (n, d) g, unit rows
    original: torch.Tensor  # (n, d) a_0, unit rows
    anchor: torch.Tensor  # (n, d) m, unit rows
    attack_score: torch.Tensor  # (n,) A
    trust_score: torch.Tensor  # (n,) R
    beta: torch.Tensor  # (n,) the step, in units of theta
    theta: torch.Tensor  # (n,) the angle from a_0 to m (0 where the feature was kept)


def geodesic_correction(original: torch.Tensor, augmented: torch.Tensor, beta_clean: float, beta_adv: float,
                        gamma_attack: float, gamma_trust: float) -> Correction:
    """AGC's steps 3-5 on unit features: ``original`` ``(n, d)``, ``augmented`` ``(n, K, d)``; differentiable."""
    count = augmented.shape[1]
    anchor = F.normalize(augmented.mean(dim=1), dim=-1)
    to_original = torch.einsum("nkd,nd->nk", augmented, original)
    attack = (1 - to_original).mean(dim=1).clamp(0, 1)
    if count > 1:
        gram = augmented @ augmented.transpose(1, 2)
        off_diagonal = ~torch.eye(count, dtype=torch.bool, device=gram.device)
        trust = ((gram[:, off_diagonal].mean(dim=1) + 1) * 0.5).clamp(0, 1)
    else:  # no pair to agree: the code trusts a single view fully
        trust = torch.ones_like(attack)
    confidence = (_power(attack, gamma_attack) * _power(trust, gamma_trust)).clamp(0, 1)
    beta = beta_clean + (beta_adv - beta_clean) * confidence
    corrected, theta = geodesic_push(original, anchor, beta)
    return Correction(corrected, original, anchor, attack, trust, beta, theta)


# --- the defense -------------------------------------------------------------------------------------------


@register_defense
@dataclass(frozen=True)
class AGC:
    """Li et al., arXiv 2605.15584: the feature pushed along the sphere past 32 perspective views' mean (33 fwd).

    The step, between beta_clean and beta_adv in units of the angle to the views' mean, grows with how far the
    views sit from the image and how much they agree with one another. No gate, no gradient.

    Example::

        agc = AGC()
        output = agc(classifier, images, ImageRandomness.from_seed(0, len(images), "agc"))
        details = agc.correction(classifier, images, ImageRandomness.from_seed(0, len(images), "agc"))
        details.beta  # each image's step, between beta_clean and beta_adv
    """

    # The authors' CUDA clip.load keeps OpenAI's fp16 weights; their features are cast to float32 afterwards.
    paper_precision: ClassVar[str] = "fp16"
    views: int = option(32, "random-perspective views per image, besides the image itself", low=1)
    distortion: float = option(0.5, "RandomPerspective's distortion_scale: each corner moves inward by up to this "
                                    "fraction of half the side", high=1)
    beta_clean: float = option(0.45, "geodesic step, in units of the angle to the anchor, at correction score 0")
    beta_adv: float = option(2.25, "geodesic step at correction score 1 (above 1: past the anchor)")
    gamma_attack: float = option(0.9, "exponent of the attack score (the views' mean distance from the image)")
    gamma_trust: float = option(1.0, "exponent of the trust score (the views' mutual agreement)")
    interpolation: str = option("bicubic", "perspective sampling: bicubic as PIL (the code's), or bilinear as "
                                           "torchvision's tensor warp", choices=INTERPOLATIONS)

    def warped_views(self, images: torch.Tensor, rng: ImageRandomness) -> torch.Tensor:
        """``(n * views, 3, H, W)``, image-major: a fresh draw of every image's perspective views (one draw of its
        stream); differentiable in ``images``."""
        if len(rng) != len(images):
            raise ValueError(f"{len(images)} images but {len(rng)} random streams")
        height, width = images.shape[-2:]
        endpoints = draw_endpoints(rng, self.views, height, width, self.distortion)
        return perspective(images.repeat_interleave(self.views, dim=0), endpoints, self.interpolation)

    def _correct(self, original: torch.Tensor, augmented: torch.Tensor) -> Correction:
        with full_precision(original.device):
            return geodesic_correction(original.float(), augmented.float(), self.beta_clean, self.beta_adv,
                                       self.gamma_attack, self.gamma_trust)

    def _features(self, classifier: ZeroShotClassifier, images: torch.Tensor,
                  views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a_0 ``(n, d)`` and a_1..a_K ``(n, K, d)`` from one encoder batch, unit rows in float32."""
        n = len(images)
        features = F.normalize(classifier.encode_image(torch.cat((images, views))).float(), dim=-1)
        return features[:n], features[n:].view(n, self.views, -1)

    @torch.no_grad()
    def correction(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> Correction:
        """The corrected features of a fresh draw of views, with A, R, beta and theta per image."""
        return self._correction_and_views(classifier, images, rng)[0]

    def _correction_and_views(self, classifier: ZeroShotClassifier, images: torch.Tensor,
                              rng: ImageRandomness) -> tuple[Correction, torch.Tensor]:
        x = check_pixels(images).detach().float()
        views = self.warped_views(x, rng)
        return self._correct(*self._features(classifier, x, views)), views

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        correction, views = self._correction_and_views(classifier, images, rng)
        # The gallery's views: a few of the warps, spread over them; the feature's move: the angle from a_0 to g.
        warps = views.view(len(correction.corrected), self.views, *views.shape[1:])
        return DefenseOutput(logits=classifier.logits_from_embeddings(correction.corrected),
                             views=shown_views([warps[:, j] for j in spread(self.views)]), view_count=self.views + 1,
                             feature_shift=feature_angle(correction.corrected, correction.original))

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str,
        with_score: bool = False
    ) -> AttackView:
        """AGC as a function of its input, for this draw of the perspective views (each call draws anew: EOT).

        ``exact`` differentiates everything: the warps, the 33 features, the anchor, beta through A and R, and the
        push (the theta < 1e-6 test held). ``bpda`` holds the feature's move constant, ``g = a_0 + (g - a_0)``
        with the bracket detached: the gradient reaches the image through a_0 = f(x) alone (the head's gradient
        taken at g), and the views are encoded without a graph (33 forwards, 1 backward per image). No gate:
        ``with_score`` gives no score.
        """
        x = check_pixels(images)
        if method == "exact":
            correction = self._correct(*self._features(classifier, x, self.warped_views(x, rng)))
            return AttackView(classifier.logits_from_embeddings(correction.corrected))
        if method not in ADAPTIVE_METHODS:
            raise ValueError(f"unknown adaptive method {method!r}; one of {ADAPTIVE_METHODS}")
        with torch.no_grad():
            augmented = F.normalize(classifier.encode_image(self.warped_views(x.detach(), rng)).float(), dim=-1)
        original = F.normalize(classifier.encode_image(x).float(), dim=-1)
        corrected = self._correct(original.detach(), augmented.view(len(x), self.views, -1)).corrected
        return AttackView(classifier.logits_from_embeddings(original + (corrected - original).detach()))
