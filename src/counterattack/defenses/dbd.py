"""Directional Bias-guided Defense (DBD; Liu, Chen, Wu, Feng, Cheng, Yin, Yang, Zhang; ICLR 2026, arXiv 2606.06186).

"Adversarial Attacks Already Tell the Answer: Directional Bias-Guided Test-time Defense for Vision-Language
Models". Specified in ``successors-2026.md`` section 3, after the authors' code ``liuls2002/DBD`` @ 36110cf:
``infer_dbd.py`` (``infer``), ``dataset/transform_lib.py`` (``Augmenter``), ``clip/clip_wrapper.py``
(``set_prompts``, ``custom_inference``), ``dataset/prompts_hand_craft.py``, ``dataset/adv_dataset.py``,
``generate_adv_images.py``. No gradient, no parameter update. For each image x:

1. 32 views (``Augmenter``; ``_dbd_views.py``): v_0 = x; v_1..v_16 RandomResizedCrop(224, scale 0.5-1, ratio
   3/4-4/3, bilinear) + RandomHorizontalFlip(0.5); v_17..v_19 bit-depth reduction to 3 bits with floor, round,
   ceil; v_20..v_22 JPEG at quality 50, 60, 75 (PIL, 4:2:0); v_23..v_28 Gaussian noise of sigma 0.1, clipped to
   [0, 1] and truncated to uint8; v_29..v_31 OpenCV's 5x5 median, box and Gaussian filters.
2. ``e_j = f(v_j) / ||f(v_j)||``; per view the entropy of ``softmax(s <e_j, t_c>)``, with s the classifier's
   ``logit_scale`` (the code's ``logit_scale.exp()``, 100 for OpenAI CLIP) and t_c DBD's class embeddings (below).
3. Selection I: the ``selected`` (16) views of v_1..v_31 with the lowest entropy (``topk(-ent[1:], 16)``).
4. ``r_i = e_i - e_0`` for i in I; ``d = mean_i r_i``; DB-score ``S = mean_i cos(r_i, d)``.
5. ``lambda = shift`` (2.5) if ``S > db_thres`` (0.8), else 1; ``f* = e_0 + lambda d`` (with lambda = 1, the mean
   of the selected views' features; with 2.5, an extrapolation ``2.5 mean(e_I) - 1.5 e_0``).
6. Logits ``s <f* / (||f*|| + 1e-8), t_c>``; the ``1e-8`` of the code's ``_normalize`` is kept there and in S.

The gate: ``score`` is S, ``counterattacked`` is ``S > db_thres`` (the images moved 2.5 times along d).

DBD's classifier (``set_prompts``), built once per classifier and template (``classifier.text_side``): class c's
embedding is the normalised mean of the normalised text embeddings of [the template for c] + every description
of c (``classifier.descriptions``, from ``--descriptions``: CuPL's GPT-3 files in the paper); without
descriptions, the template's embedding alone (the code's ``use_gpt3_prompts=False``). The template is
``template``, ``auto`` resolving per dataset (``for_dataset``) as ``prompts_hand_craft.py`` does, and to
"a photo of a {}." elsewhere (the code's template for every dataset it has no other for). The entropies and the
logits use this classifier, as the code does: the run's templates are ignored by DBD. The class names are the
run's (the code formats its template with the description file's key). The text side is computed in float32
(the code's fp16 CUDA model encodes it in fp16).

8 bits. The authors' images are 8-bit PIL images. Here: v_0, the crops and the filters use the pixels as given;
bit depth, JPEG and the noise views read ``round(255 x)`` (the identity on an 8-bit input, so on 8-bit inputs
the views are the code's, up to rounding the crops and filters back to 8 bits, at most 0.5/255). Reproduced
quirks: the uint8 wrap of bit depth (``round`` of levels >= 240 and ``ceil`` above 224 give 256, cast to 0:
black), the noise view's truncation. Found in checking OpenCV (4.10 and 5.1), against the spec: the median filter
replicates the border (the box and Gaussian filters reflect-101), and ``GaussianBlur((5, 5), 0)`` is the binomial
kernel (1, 4, 6, 4, 1)/16, not a sampled Gaussian of sigma 1.1.

Values the code did not fix, chosen here: the crop, flip and noise draws come from each image's stream
(``ImageRandomness``; the code's global torch and numpy generators with seed 0, shuffled batch-1 loading); the
crops are resized to the model's input side (the code's 224; bilinear as PIL's when enlarging, which every crop
of an input no larger than the model's side is; a larger crop is not antialiased) and the 15 other views are
resized by the encoder (bicubic, antialiased, in float; the code's PIL bicubic on uint8); ties in the entropy
ranking are broken by ``torch.topk``. Pixel units: the 5x5 filters, the JPEG blocks and sigma act on the input's
own pixels, as the code applies them before its resize. The code gives its adversarial images at 224 px but its
clean ones at full resolution (milder filters and crops there); here both take the input as given.

Precision: the 32 forwards run under the caller's policy (``paper_precision`` fp16: the code's CUDA model stays
fp16); the views and everything after the encoder (normalisation, entropies, S, the shift, the head) in float32.
Unlike TTC's tau, S compares views far apart (``||r_i||`` 0.12-0.70, 5-95 %, on the tiny CLIP), so fp16 moves it
little (by 0.002 on average over 20 CIFAR-10 images, fp16 autocast on a CPU), except where it reorders two views
of nearly equal entropy around the 16th place (1 image of 20, S moved by 0.03): the code's own fp16 does the same.

Adaptive attacks (``attack_view``, every call a fresh draw of the views): ``exact`` differentiates the crops,
flips, filters (the median through the pixel it selects) and the noise's addition and clip; bit depth, JPEG and
the uint8 truncation pass the gradient straight through; the selection I and lambda are held for the draw.
``bpda`` holds the feature move ``f* - e_0`` constant: only e_0 = f(x) is differentiated. ``with_score`` gives
S, differentiable in the same way (in ``bpda`` through e_0 alone).

Label leakage (spec 3(f)): the published robust accuracy is above the clean one (91.3 vs 64.1, ViT-B/32, 10
datasets; 98.8 vs 90.4 in T-VSS's re-run) by construction: a ground-truth-label attack pushes the feature away
from the true class, the transforms partly undo the push, and lambda = 2.5 extrapolates back towards the true
class, even for images CLIP misclassifies when clean. Under true-label transfer attacks (TTC's protocol) DBD's
robust numbers are inflated in the same way; read them beside pseudo-label and adaptive attacks, and robust minus
clean as a leakage indicator. tau = 0.8 and lambda = 2.5 were chosen on (adversarial) ImageNet validation data.

Cost per image: 32 image-encoder forwards, 0 backwards (``count_encoder_passes``); on the host 3 JPEG round trips.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..classifier import ZeroShotClassifier
from ..descriptions import for_classes
from ..errors import CounterattackError
from ..inputs import check_pixels
from ..precision import full_precision
from ..randomness import ImageRandomness
from ._dbd_views import CROPS, VIEWS, crop_views, draw_views, pixel_views
from .base import (
    ADAPTIVE_METHODS, AttackView, DefenseOutput, Gate, describe_options, feature_angle, option, register_defense,
    shown_views,
)

DEFAULT_TEMPLATE = "a photo of a {}."
# prompts_hand_craft.py's templates, under this project's dataset names (ImageNet and its variants, Caltech101,
# Stanford Cars and SUN397 take the default).
DATASET_TEMPLATES = {
    "flowers102": "a photo of a {}, a type of flower.",
    "dtd": "{} texture.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "ucf101": "a photo of a person doing {}.",
    "food101": "a photo of a {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "eurosat": "a central satellite photo of a {}.",
}
# The code's _normalize: v / (||v|| + 1e-8), for the DB-score's cosines and the final feature.
NORM_EPS = 1e-8
# The views the gallery shows besides the first crop v_1, by their index in the 32: JPEG at 50, the first noisy
# view, the median filter.
SHOWN_PIXEL_VIEWS = (20, 23, 29)


def template_for(dataset: str) -> str:
    """DBD's template for a dataset named as the registry names it (or an image folder, by its first name)."""
    from ..data import short_name

    key = short_name(dataset).split("/")[0].lower().replace("-", "_")
    return DATASET_TEMPLATES.get(key, DEFAULT_TEMPLATE)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """The prediction entropy of each row of logits (the code's ``_entropy``)."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def _normalise(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / (vectors.norm(dim=-1, keepdim=True) + NORM_EPS)


@dataclass
class DirectionalBias:
    """Per image: the views' normalised features and entropies, the chosen views, d, S, lambda and f*."""

    features: torch.Tensor  # (n, 32, dim): e_0..e_31, in the code's view order
    entropies: torch.Tensor  # (n, 32)
    selected: torch.Tensor  # (n, k): indices into the 32 views (1..31), lowest entropy first
    direction: torch.Tensor  # (n, dim): d = mean_i (e_i - e_0) over the selected views
    score: torch.Tensor  # (n,): S = mean_i cos(e_i - e_0, d)
    scale: torch.Tensor  # (n,): lambda
    defended: torch.Tensor  # (n, dim): f* = e_0 + lambda d, not normalised
    views: tuple[torch.Tensor, torch.Tensor] | None = None  # crops (n, 16, 3, side), pixel views (n, 15, 3, H, W)


def directional_bias_of_features(features: torch.Tensor, class_embeddings: torch.Tensor, logit_scale: float,
                                 selected: int, db_thres: float, shift: float) -> DirectionalBias:
    """DBD's steps 2-5 on the views' normalised features ``(n, 32, dim)``. The selection and lambda are read off
    detached values: an adaptive attack holds them for its draw; S and f* stay differentiable."""
    entropies = entropy(logit_scale * features @ class_embeddings.T)
    selected_views = torch.topk(-entropies.detach()[:, 1:], k=selected, dim=-1).indices + 1
    original = features[:, 0]
    chosen = features.gather(1, selected_views.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    differences = chosen - original.unsqueeze(1)
    direction = differences.mean(dim=1)
    score = (_normalise(differences) * _normalise(direction).unsqueeze(1)).sum(-1).mean(dim=1)
    scale = torch.where(score.detach() > db_thres, shift, 1.0).to(features.dtype)
    defended = original + scale.unsqueeze(-1) * direction
    return DirectionalBias(features, entropies, selected_views, direction, score, scale, defended)


@register_defense
@dataclass(frozen=True)
class DBD:
    """Directional Bias-guided Defense, Liu et al., ICLR 2026: 32 views, shift along their mean move (32 fwd / 0 bwd).

    Example::

        dbd = DBD().for_dataset("dtd")  # the template "{} texture."
        output = dbd(classifier, images, ImageRandomness.from_seed(0, len(images), "dbd"))
        output.score  # the DB-score S; output.counterattacked: S > 0.8, the images moved 2.5 times along d
    """

    gate: ClassVar[Gate] = Gate("db score", flags_above=True, threshold="db_thres")
    paper_precision: ClassVar[str] = "fp16"
    reads_descriptions: ClassVar[str] = "optional"

    selected: int = option(16, "transformed views kept, lowest prediction entropy first (31: all)", low=1,
                           high=VIEWS - 1)
    db_thres: float = option(0.8, "DB-score above which the feature is shifted by `shift` times the direction",
                             low=-1, high=1)
    shift: float = option(2.5, "lambda: how far along the mean view direction a flagged image moves (1 otherwise)")
    template: str = option("auto", "DBD's class template ('{}' for the class name); auto: the code's per dataset, "
                           f"'{DEFAULT_TEMPLATE}' elsewhere")

    def __post_init__(self) -> None:
        if self.template != "auto" and self.template.count("{}") != 1:
            raise CounterattackError(f"{self.name}: template must contain '{{}}' exactly once, got {self.template!r}.")

    def for_dataset(self, dataset: str) -> DBD:
        """``auto`` resolved to the code's template for ``dataset``."""
        return replace(self, template=template_for(dataset)) if self.template == "auto" else self

    @property
    def class_template(self) -> str:
        """The template in use; ``auto`` outside a dataset (the library's API on any images) is the default."""
        return DEFAULT_TEMPLATE if self.template == "auto" else self.template

    def class_embeddings(self, classifier: ZeroShotClassifier) -> torch.Tensor:
        """DBD's ``(C, dim)`` normalised class embeddings: template + descriptions, once per classifier."""
        template = self.class_template
        return classifier.text_side(("dbd", template), lambda: self._build_class_embeddings(classifier, template))

    def _build_class_embeddings(self, classifier: ZeroShotClassifier, template: str) -> torch.Tensor:
        names = classifier.class_names
        described = None
        if classifier.descriptions is not None:
            described = for_classes(classifier.descriptions, names, self.descriptions_needed, self.name)
        prompts: list[Sequence[str]] = [[template.format(name), *(described[name] if described else ())]
                                        for name in names]
        with full_precision(classifier.text_embeddings.device):
            embeddings = classifier.encode_texts([p for per_class in prompts for p in per_class])
        means = torch.stack([chunk.mean(dim=0) for chunk in embeddings.split([len(p) for p in prompts])])
        return F.normalize(means, dim=-1)

    def _encode(self, classifier: ZeroShotClassifier, views: torch.Tensor, tracked: bool) -> torch.Tensor:
        """Normalised float32 features of ``(n, m, 3, H, W)`` views; with a graph only if ``tracked``."""
        with contextlib.nullcontext() if tracked else torch.no_grad():
            embeddings = classifier.encoder(views.flatten(0, 1))
        with full_precision(views.device):
            return F.normalize(embeddings.float(), dim=-1).view(*views.shape[:2], -1)

    def directional_bias(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness,
                         method: str | None = None) -> DirectionalBias:
        """Steps 1-5 for this draw of the views. ``method`` None: no graph; ``exact``: every view differentiable;
        ``bpda``: only v_0's feature. v_0, the 15 pixel views and the 16 crops go through the encoder as three
        batches in every mode, so the features do not depend on the mode."""
        if method is not None and method not in ADAPTIVE_METHODS:
            raise ValueError(f"unknown adaptive method {method!r}; one of {ADAPTIVE_METHODS}")
        if len(rng) != len(images):
            raise ValueError(f"{len(images)} images but {len(rng)} random streams")
        draw = draw_views(rng, images.detach())
        views_tracked = method == "exact"
        # The views in float32 whatever the policy (autocast would run the filters' convolutions in half precision).
        with contextlib.nullcontext() if views_tracked else torch.no_grad(), full_precision(images.device):
            crops = crop_views(images, draw, classifier.encoder.image_size)
            pixels = pixel_views(images, draw)
        original = self._encode(classifier, images.unsqueeze(1), method is not None)
        features = torch.cat((original, self._encode(classifier, crops, views_tracked),
                              self._encode(classifier, pixels, views_tracked)), dim=1)
        with full_precision(images.device):
            result = directional_bias_of_features(features, self.class_embeddings(classifier), classifier.logit_scale,
                                                  self.selected, self.db_thres, self.shift)
        result.views = (crops, pixels)
        return result

    def _logits(self, classifier: ZeroShotClassifier, feature: torch.Tensor) -> torch.Tensor:
        with full_precision(feature.device):
            logits = classifier.logit_scale * _normalise(feature) @ self.class_embeddings(classifier).T
        return logits + classifier.logit_bias if classifier.logit_bias else logits

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        result = self.directional_bias(classifier, check_pixels(images).detach().float(), rng)
        crops, pixels = result.views
        # The gallery's views: v_1 (a crop), v_20 (JPEG at 50), v_23 (the first noisy view), v_29 (the median filter).
        shown = shown_views([crops[:, 0], *(pixels[:, k - 1 - CROPS] for k in SHOWN_PIXEL_VIEWS)])
        return DefenseOutput(self._logits(classifier, result.defended), result.score,
                             self.gate.flags(self, result.score), views=shown, view_count=VIEWS,
                             feature_shift=feature_angle(result.defended, result.features[:, 0]))

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str,
        with_score: bool = False
    ) -> AttackView:
        """DBD's logits for a fresh draw of its views, differentiable in ``images`` (see the module's docstring)."""
        result = self.directional_bias(classifier, check_pixels(images), rng, method)
        feature = result.defended
        if method == "bpda":  # the move f* - e_0 held constant
            original = result.features[:, 0]
            feature = original + (feature - original).detach()
        return AttackView(self._logits(classifier, feature), result.score if with_score else None)

    def describe(self) -> dict:
        return {**describe_options(self), "views": VIEWS}
