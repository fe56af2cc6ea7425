"""Cross-modality alignment with optimal transport (COLA; Zhu, Zhu, Wang, Zhao, Zhang; NeurIPS 2025, arXiv 2510.24038).

"Enhancing CLIP Robustness via Cross-Modality Alignment". COLA has no released code: the paper (Sec. 3.2,
Eqs. 3-9, Sec. 4.1) is the specification, and where it is silent this follows the zero-shot code of AWT
(Zhu et al., NeurIPS 2024, ``MCG-NJU/AWT``, ``AWT_zero_shot/``), whose "augment, weight, transport" COLA's
Eqs. 5-9 restate with a projected cost. Each detail taken from AWT is marked (AWT): what AWT does, and
what COLA most likely does, unconfirmed. The specification is ``successors-2026.md`` Part B section 1.

Once per classifier (the text side, ``classifier.text_side``):

1. Prompts: for each class y, the template's prompt and the first ``prompts - 1`` descriptions of the
   class, each appended to the template as "template(y). description" (AWT, ``evaluate.py``: the
   template's prompt ends in ".", a description follows ". "). The template is the run's own (the first
   of ``classifier.templates``, its final "." dropped before joining); AWT has its own per dataset.
   M = ``prompts`` = 50 in all, the paper's count ("M-1 fine-grained variants in addition to the
   hand-crafted prompt"); AWT's code uses the template and 50 descriptions (``--cola-prompts 51``).
2. The K*M prompts are embedded and L2-normalised: z_y^m (AWT). Computed in float32 whatever the
   precision policy, so the cached text side does not depend on which run built it first (AWT: fp16).
3. Subspace (Eqs. 3-4): U_C, the first C = ``subspace`` left singular vectors of the d x KM matrix of the
   normalised, uncentred prompt embeddings (the paper does not say; a plain SVD as written), and
   Pi(v) = U_C U_C^T v. C is clamped to min(d, KM), with a warning: where d <= C and KM >= d (the tiny
   test CLIPs, d = 128 or 32, with 50 prompts per class) Pi is the identity.

Per image:

4. Views (Sec. 4.1, N = ``views`` = 5 "including the original"): v_1 = x, v_2..v_N = RandomResizedCrop
   (scale (0.08, 1), ratio (3/4, 4/3), bilinear) then RandomHorizontalFlip (AWT, ``datautils.py``), drawn
   from the image's stream and rendered at the image's own side. AWT crops the full-resolution picture
   and resizes to 224 px; under attack only the image given exists, so clean and adversarial images'
   views alike are cropped from it.
5. x_n = f(v_n) / ||f(v_n)||: N image-encoder forwards, under the precision policy (AWT: fp16 autocast).
   Everything after the encoder runs in float32.
6. Cost (Eq. 8): C_y(n, m) = 1 - cos(Pi x_n, z_y^m).
7. View weights a (Eq. 6): h_n, the entropy of view n's prediction s * x_n . mean_m z_y^m (its logits
   averaged over the prompts, unprojected), and a = softmax(-h / 0.5) over the views (AWT). Eq. 6 as
   printed is softmax(+h) while the text gives lower entropy the larger weight: the sign follows the
   text and AWT.
8. Prompt weights b_y ("computed analogously"): for prompt m of class y, the entropy of the original
   view's prompt-averaged logits with class y's entry replaced by its logit for prompt m alone;
   b_y = softmax(-entropy / 0.5) over the M prompts, the template's included (AWT). b depends on the
   image. The paper puts Pi only in the cost: a and b use the unprojected features (AWT).
9. Transport (Eq. 7), per class: Sinkhorn with kernel exp(-C_y / 0.1) and marginals a and b_y, from unit
   scalings, at most 100 iterations (a row then a column update), stopping when the mean absolute
   change of the row scalings over all of an image's classes and views is below 1e-2 (AWT's
   ``Sinkhorn``, one image at a time as its zero-shot code runs); T_y = diag(r) K diag(c).
10. Logits (Eq. 9): s * sum_{n,m} T_y(n, m) cos(Pi x_n, z_y^m) = s * (1 - <T_y, C_y>), s the model's logit
    scale: AWT's sum of the plan times its logits (AWT's logits are unprojected; here they are the
    projected cosines, so the argmax is Eq. 9's argmin_y <T_y, C_y>: the plan's mass is exactly 1 after
    the last column update). No gate: clean and attacked images go the same way.

Where the paper is silent or disagrees with AWT, and what is taken here (uncertain, each):

- M: the paper's 50 prompts in all, where AWT's code has 51 (``prompts`` sets it).
- The SVD of the normalised, uncentred prompt embeddings (the paper gives neither).
- Pi in the cost only; a and b from the unprojected features (AWT has no Pi).
- The logits summed under the plan are the projected cosines times the logit scale (Eq. 9's ranking);
  AWT sums its unprojected logits, which would rank by a cost the plan was not computed for.
- Eq. 6's sign (softmax(-h), the text's and AWT's); temperatures, epsilon and Sinkhorn's stopping (AWT).
- Views cropped from the image given, at its side (AWT: from the full-resolution picture at 224 px).
- The run's template and the prompts' text embeddings in float32 (AWT: its own template, fp16).

Cost per image: ``views`` (5) image-encoder forwards, no backward; the text encoder runs over the K*M
prompts once per classifier, not per image.

Adaptive attacks (``attack_view``): the views are differentiable functions of the image, drawn afresh
from ``rng`` on every call, so EOT is repeated calls. ``exact`` differentiates the whole computation: the
crops, the encoder, the projection, the costs, the weights a and b, and the Sinkhorn iterations unrolled
(each image's iteration count is what its own values decide, as in ``__call__``). ``bpda`` holds the
weights and the plan constant for this draw and differentiates the logits s * <T, cos> through the
crops, the encoder and the projection: AWT's own gradient (its code computes the weights and the plan
under ``no_grad`` and trains through the sum of the plan times the logits). COLA moves no pixel and no
embedding, so a straight-through on the pixels is the identity; holding its aggregation constant is the
part of it an attacker may skip (with the plan constant, the logit's gradient in the cost is that of the
entropic OT value, by the envelope theorem), while a logit-space straight-through around the undefended logits
would give the transfer attack's own gradient and never see the views.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..augment import CROP_ATTEMPTS, crop_and_resize, crop_boxes
from ..classifier import ZeroShotClassifier
from ..descriptions import WHERE_TO_GET, for_classes
from ..errors import CounterattackError
from ..inputs import check_pixels
from ..precision import full_precision
from ..randomness import ImageRandomness
from .base import (
    ADAPTIVE_METHODS, AttackView, DefenseOutput, describe_options, option, register_defense, shown_views, spread,
)

log = logging.getLogger(__name__)


# --- the text side -----------------------------------------------------------------------------------------


def class_prompts(template: str, name: str, descriptions: list[str]) -> list[str]:
    """The template's prompt for ``name``, then one prompt per description, "template(name). description" (AWT)."""
    base = template.format(name).rstrip().removesuffix(".")
    return [base + "."] + [f"{base}. {sentence}" for sentence in descriptions]


def subspace_basis(embeddings: torch.Tensor, dimension: int) -> torch.Tensor:
    """``(d, C')``: the first C' = min(dimension, d, P) left singular vectors of the d x P matrix whose columns are
    ``embeddings`` (P, d), uncentred; ``U @ U.T`` projects onto their top subspace. The SVD runs on the CPU in
    float64, so the basis is the same on every device (once per dataset: seconds for ImageNet's 50,000 prompts)."""
    left, _, _ = torch.linalg.svd(embeddings.detach().double().cpu().T, full_matrices=False)
    return left[:, :dimension].to(embeddings.device, embeddings.dtype)


@dataclass(frozen=True)
class TextSupport:
    """COLA's text side for one classifier: the prompt embeddings and the subspace they span."""

    prompts: torch.Tensor  # (K, M, d): z_y^m, L2-normalised
    class_means: torch.Tensor  # (K, d): mean over m of z_y^m, not renormalised (AWT averages the logits)
    basis: torch.Tensor  # (d, C'): U_C


# --- the weights and the transport ---------------------------------------------------------------------------


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy of ``softmax(logits)`` over the last dimension."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def view_weights(mean_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``a = softmax(-h / temperature)`` over the views; ``mean_logits`` (n, V, K) are each view's logits averaged
    over the prompts, ``h`` their entropies (AWT)."""
    return torch.softmax(-entropy(mean_logits) / temperature, dim=1)


def _exclusive(values: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The sum of the entries before (or after) each entry of the last dimension, that entry left out."""
    if reverse:
        return _exclusive(values.flip(-1), False).flip(-1)
    return F.pad(values.cumsum(-1)[..., :-1], (1, 0))


def description_weights(base: torch.Tensor, replaced: torch.Tensor, temperature: float) -> torch.Tensor:
    """``b`` (n, K, M): for class y and prompt m, the entropy of ``base`` (n, K), the original view's logits averaged
    over the prompts, with entry y replaced by ``replaced[:, y, m]``, its logit for prompt m; b_y = softmax over m of
    ``-entropy / temperature`` (AWT).

    AWT builds the M x K replaced K-way distributions of an image one by one (M K^2 values: 50 million for
    ImageNet). Their entropies need only each class's complement, the sums over the other classes of exp(l) and
    exp(l) l, taken here from prefix and suffix sums (no subtraction, so a dominant class loses no precision),
    in float64 after shifting every logit below 0.
    """
    dtype = base.dtype
    base, replaced = base.double(), replaced.double()
    shift = torch.maximum(base.amax(-1), replaced.flatten(1).amax(-1))[:, None]
    kept = base - shift
    mass = kept.exp()
    moment = mass * kept

    def others(values: torch.Tensor) -> torch.Tensor:
        return (_exclusive(values, False) + _exclusive(values, True))[..., None]

    swapped = replaced - shift[..., None]
    total = others(mass) + swapped.exp()
    # entropy = log Z - sum_k p_k l_k with p = exp(l) / Z, of logits shifted below 0
    entropies = total.log() - (others(moment) + swapped.exp() * swapped) / total
    return torch.softmax(-entropies / temperature, dim=-1).to(dtype)


def sinkhorn(kernel: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, iterations: int,
             tolerance: float) -> torch.Tensor:
    """Transport plans ``diag(r) kernel diag(c)`` (n, K, V, M) with row marginals ``rows`` (n, V) and column
    marginals ``columns`` (n, K, M), by AWT's Sinkhorn: from r = c = 1, at most ``iterations`` row-then-column
    updates, an image stopping after the first whose row scalings moved by less than ``tolerance`` on average
    over its K x V entries. Each image stops on its own values, as AWT's one-image batches do; differentiable
    (the stopping iterations are discrete choices)."""
    r = kernel.new_ones(kernel.shape[:-1])
    c = kernel.new_ones(*kernel.shape[:-2], kernel.shape[-1])
    running = torch.ones(len(kernel), dtype=torch.bool, device=kernel.device)
    for _ in range(iterations):
        new_r = rows[:, None] / (kernel @ c[..., None]).squeeze(-1)
        new_c = columns / (kernel.transpose(-1, -2) @ new_r[..., None]).squeeze(-1)
        change = (new_r - r).detach().abs().mean(dim=(1, 2))
        r = torch.where(running[:, None, None], new_r, r)
        c = torch.where(running[:, None, None], new_c, c)
        running = running & ~(change < tolerance)
        if not bool(running.any()):
            break
    return r[..., None] * kernel * c[..., None, :]


# --- the defense ---------------------------------------------------------------------------------------------


@register_defense
@dataclass(frozen=True)
class COLA:
    """Zhu et al., NeurIPS 2025: optimal transport of 5 views onto class descriptions, top-256 text subspace (5 fwd)."""

    reads_descriptions: ClassVar[str] = "required"
    views: int = option(5, "views per image N: the image and N-1 random resized crops with flips", low=1)
    prompts: int = option(50, "prompts per class M: the template's and M-1 descriptions appended to it (the paper's "
                              "50; AWT's code: 51)", low=1)
    subspace: int = option(256, "dimension C of the text subspace the views are projected onto (clamped to the "
                                "embedding's)", low=1)
    epsilon: float = option(0.1, "entropic regularisation of the transport: kernel exp(-cost / epsilon) (AWT)")
    iterations: int = option(100, "most Sinkhorn iterations (AWT)", low=1)
    tolerance: float = option(1e-2, "Sinkhorn stops when the row scalings move less than this on average (AWT)")
    view_temperature: float = option(0.5, "temperature of the view weights softmax(-entropy / t) (AWT)")
    description_temperature: float = option(0.5, "temperature of the prompt weights softmax(-entropy / t) (AWT)")

    def __post_init__(self) -> None:
        for name in ("epsilon", "view_temperature", "description_temperature"):
            if getattr(self, name) <= 0:
                raise CounterattackError(f"{self.name}: {name} must be > 0, got {getattr(self, name)}.")

    # The text side --------------------------------------------------------------------------------------------

    def text_support(self, classifier: ZeroShotClassifier) -> TextSupport:
        """The prompt embeddings and the subspace basis, built once per classifier."""
        return classifier.text_side(("cola", self.prompts, self.subspace), lambda: self._build_text(classifier))

    def _build_text(self, classifier: ZeroShotClassifier) -> TextSupport:
        if classifier.descriptions is None:
            raise CounterattackError(f"{self.name} needs class descriptions (--descriptions FILE): {WHERE_TO_GET}.")
        chosen = for_classes(classifier.descriptions, classifier.class_names, self.prompts - 1, self.name)
        template = classifier.templates[0]
        texts = [text for name in classifier.class_names
                 for text in class_prompts(template, name, chosen[name][: self.prompts - 1])]
        with full_precision(classifier.text_embeddings.device):
            embeddings = classifier.encode_texts(texts).float()
        dimension = embeddings.shape[-1]
        basis = subspace_basis(embeddings, self.subspace)
        if basis.shape[1] < self.subspace:
            log.warning("%s: the subspace is clamped to %d dimensions (the embeddings have %d, the prompts %d)%s",
                        self.name, basis.shape[1], dimension, len(texts),
                        ": the projection is the identity" if basis.shape[1] == dimension else "")
        grouped = embeddings.view(classifier.num_classes, self.prompts, dimension)
        return TextSupport(prompts=grouped, class_means=grouped.mean(dim=1), basis=basis)

    # The views --------------------------------------------------------------------------------------------------

    def draw_views(self, images: torch.Tensor, rng: ImageRandomness) -> torch.Tensor:
        """``(n, views, 3, H, W)``: each image, then ``views - 1`` random resized crops with flips of it at its own
        side (two draws of each image's stream: the crops, the flips); differentiable in ``images``."""
        if len(rng) != len(images):
            raise ValueError(f"{len(images)} images but {len(rng)} random streams")
        extra = self.views - 1
        if extra == 0:
            return images.unsqueeze(1)
        n, height, width = len(images), *images.shape[-2:]
        crops = rng.uniform(extra, CROP_ATTEMPTS, 4, device=images.device)
        flips = rng.uniform(extra, device=images.device)
        boxes = crop_boxes(crops, height, width).flatten(0, 1)
        cropped = crop_and_resize(images.repeat_interleave(extra, dim=0), boxes, flips.flatten() < 0.5)
        return torch.cat((images.unsqueeze(1), cropped.view(n, extra, *images.shape[1:])), dim=1)

    # The transport ----------------------------------------------------------------------------------------------

    def transport_logits(self, classifier: ZeroShotClassifier, features: torch.Tensor, text: TextSupport,
                         hold_plan: bool = False) -> torch.Tensor:
        """COLA's logits from the views' normalised embeddings ``features`` (n, V, d), in float32;
        ``hold_plan``: the weights and the plan are computed from ``features`` detached (``bpda``)."""
        scale = classifier.logit_scale
        weighing = features.detach() if hold_plan else features
        # The weights read the unprojected features (AWT): the paper puts the projection only in the cost.
        mean_logits = scale * weighing @ text.class_means.T  # (n, V, K): each view's logits averaged over prompts
        a = view_weights(mean_logits, self.view_temperature)
        replaced = scale * torch.einsum("nd,kmd->nkm", weighing[:, 0], text.prompts)
        b = description_weights(mean_logits[:, 0], replaced, self.description_temperature)

        projected = F.normalize(features @ text.basis @ text.basis.T, dim=-1)
        cosines = torch.einsum("nvd,kmd->nkvm", projected, text.prompts)  # 1 - cost, per class
        costs = 1 - (cosines.detach() if hold_plan else cosines)
        plan = sinkhorn(torch.exp(-costs / self.epsilon), a, b, self.iterations, self.tolerance)
        logits = scale * (plan * cosines).sum(dim=(-2, -1))
        # The plan's mass is 1: a sigmoid head's bias (SigLIP's) is added as the zero-shot head adds it.
        return logits + classifier.logit_bias if classifier.logit_bias else logits

    def _logits(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness,
                hold_plan: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the views ``(n, V, 3, H, W)`` they were computed from."""
        text = self.text_support(classifier)
        views = self.draw_views(images, rng)
        embeddings = classifier.encoder(views.flatten(0, 1))
        with full_precision(images.device):
            features = F.normalize(embeddings.float(), dim=-1).view(*views.shape[:2], -1)
            return self.transport_logits(classifier, features, text, hold_plan), views

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        x = check_pixels(images).detach().float()
        logits, views = self._logits(classifier, x, rng, hold_plan=False)
        # The gallery's views: the crops (view 0 is the image itself), or the image where there is no crop.
        shown = shown_views([views[:, j] for j in spread(self.views, first=1 if self.views > 1 else 0)])
        return DefenseOutput(logits=logits, views=shown, view_count=self.views)

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str,
        with_score: bool = False
    ) -> AttackView:
        """COLA's logits as a function of the images for fresh views from ``rng``: ``exact`` differentiates the
        weights and the unrolled Sinkhorn iterations too, ``bpda`` holds the weights and the plan (see the
        module's docstring). COLA has no gate, so no score."""
        if method not in ADAPTIVE_METHODS:
            raise ValueError(f"unknown adaptive method {method!r}; one of {ADAPTIVE_METHODS}")
        return AttackView(self._logits(classifier, check_pixels(images), rng, hold_plan=method == "bpda")[0])

    @property
    def descriptions_needed(self) -> int:
        """The template's prompt and M - 1 descriptions make a class's M prompts."""
        return self.prompts - 1

    def describe(self) -> dict:
        return {**describe_options(self), "descriptions_per_class": self.prompts - 1,
                "template_prompt": "template(y).", "description_prompt": "template(y). description"}
