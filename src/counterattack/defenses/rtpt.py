"""Robust Test-time Prompt Tuning (R-TPT; Sheng, Liang, Wang, He; CVPR 2025, arXiv 2504.11195).

R-TPT leaves the image alone and tunes the text prompt, separately for every test image:

1. Views: the image itself and ``views - 1`` AugMix views (a random resized crop and flip, then
   three chains of 1-3 AugMix operations at severity 1, mixed with Dirichlet(1, 1, 1) weights and
   blended with the crop by a Beta(1, 1) factor). ``augmentation="crop-flip"`` gives the crop and
   flip alone, as the authors' code does for ImageNet and its variants.
2. The image encoder embeds every view once (``views`` forwards per image, no backward).
3. Prompt tuning: the learnable context is the token embeddings of the template's words before the
   class name ("This is a photo of a" for "This is a photo of a {}."), reset for every image. The
   ``selection`` fraction of views whose predictions have the lowest entropy is kept, and one AdamW
   step (lr 5e-3) lowers the mean of their entropies (R-TPT drops TPT's marginal-entropy term).
4. Reliability-weighted ensemble: each view's score is the mean cosine similarity of its image
   embedding to its ``neighbours`` (20) most similar other views; ``w = softmax(score / 0.01)``; the
   output is ``sum_v w_v logits_v`` with the tuned prompt.

Costs per image: ``views`` image-encoder forwards (64 at defaults) and no image-encoder backward. The
text encoder runs over all C class prompts ``steps + 1`` times (2 at defaults, ``steps`` of them
with a graph) and backpropagates ``steps`` times (1): its cost grows with the number of classes.

Where the specification (``successors.md`` section 4, from the ``TomSheng21/R-TPT`` code) leaves a
choice, this implementation takes the following, each marked in the code:

- The context is the template's words before ``{}``, so the untuned prompt is exactly the
  classifier's own prompt; the authors initialise 4 tokens from "a photo of a". Exactly one
  template, with words before ``{}``, is needed.
- The authors' code runs the image encoder 1 + 4 x 64 times per image; the features do not depend on
  the prompt, so they are computed once here (the specification's minimum of 64).
- Views are rendered at the image's own resolution with tensor operations (the authors use PIL at
  224 px): AugMix's pixel amounts (translation) are scaled from 224 px, and images are not rounded to
  8 bits, except inside the operations defined on 8-bit levels (equalize, posterize and solarize's
  threshold). The sign of each operation's random direction makes orientation conventions moot.
- Views of clean and adversarial images are both cropped from the image the defense is given; the
  authors' code crops clean images' views from the uncropped image and adversarial ones' from the
  224-px crop (clean accuracy may move by a point).
- A view is excluded from its own neighbours by masking the diagonal (the code masks similarities
  >= 1.0, which also drops exact duplicates). With fewer than 21 views every other view is a
  neighbour, and at least one view is selected (``int(views * selection)`` as coded, minimum 1).
- AdamW has PyTorch's defaults besides the learning rate (weight decay 0.01), as the code builds it.

Adaptive attacks (``attack_view``): the logits are differentiated through the views and the image
embeddings, and through the reliability weights; the tuned context is held fixed (computed from
the same views without a graph). Little is lost by that: one Adam step from a fresh state moves each
coordinate by ``lr * g / (|g| + 1e-8)``, whose derivative in ``g`` vanishes unless ``|g|`` is about
1e-8, and the choice of the confident views is discrete. ``exact`` differentiates every augmentation
whose gradient exists (crops, flips, affine operations, autocontrast, solarize, the mixing) and passes
the gradient straight through equalize and posterize, whose derivative is zero almost everywhere;
``bpda`` passes it straight through every colour operation and differentiates only the geometry and
the mixing. Every call draws fresh views from ``rng``, so EOT is repeated calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..augmix import AUGMIX_CHAINS, draw_views, render_views
from ..backbones import PromptTunable, prompt_tunable
from ..classifier import ZeroShotClassifier
from ..inputs import check_pixels
from ..errors import CounterattackError
from ..precision import full_precision
from ..randomness import ImageRandomness
from .base import (
    ADAPTIVE_METHODS, SHOWN_VIEWS, AttackView, DefenseOutput, describe_options, option, register_defense, runtime,
    shown_views,
)

AUGMENTATIONS = ("augmix", "crop-flip")
# The datasets whose views the authors' code makes by crop and flip alone (``augmentation="auto"``).
IMAGENET_FAMILY = frozenset({"imagenet", "imagenet_v2", "imagenet_a", "imagenet_r", "imagenet_sketch", "tinyimagenet"})
SELF_MASKS = ("diagonal", "authors")

# --- the prompt -------------------------------------------------------------------------------------


@dataclass
class PromptContext:
    """The class prompts with the template's words before the class name made learnable."""

    backbone: PromptTunable
    tokens: torch.Tensor  # (C, L) token ids of the class prompts
    frozen: torch.Tensor  # (C, L, width) their token embeddings
    start: int  # position of the first context token (after the tokens every text starts with, e.g. start-of-text)
    init: torch.Tensor  # (n_ctx, width) the context's initial value: the template words' embeddings

    @property
    def length(self) -> int:
        return len(self.init)


def prompt_context(classifier: ZeroShotClassifier) -> PromptContext:
    """The learnable context of ``classifier``'s prompts, or a ``CounterattackError`` saying why there is none."""
    clip = classifier.clip
    if clip is None:
        raise CounterattackError("rtpt tunes the text prompt: build the classifier with ZeroShotClassifier.from_clip.")
    backbone = prompt_tunable(clip.model)
    if len(classifier.templates) != 1:
        raise CounterattackError(f"rtpt tunes one prompt template; the classifier averages {len(classifier.templates)} "
                                 f"({', '.join(map(repr, classifier.templates))}). Give a single --templates.")
    template = classifier.templates[0]
    words = template.split("{}")[0].strip()
    if not words:
        raise CounterattackError(f"rtpt tunes the template's words before the class name; {template!r} has none.")
    device = next(clip.model.parameters()).device
    tokens = clip.tokenizer([template.format(name) for name in classifier.class_names]).to(device)
    span = _context_span(clip.tokenizer([words])[0].to(device), clip.tokenizer([""])[0].to(device), tokens)
    if span is None:
        raise CounterattackError(f"rtpt: the tokenizer does not keep the words {words!r} as the first tokens of "
                                 f"every prompt of {template!r}, so they cannot be tuned as a shared context.")
    start, end = span
    with torch.no_grad():
        frozen = backbone.embed_tokens(tokens)
    return PromptContext(backbone, tokens, frozen, start, frozen[0, start:end].clone())


def _common_prefix(rows: torch.Tensor) -> int:
    """How many leading positions all ``rows`` (``(k, L)`` token ids) agree on."""
    differs = (rows != rows[:1]).any(dim=0)
    return int(differs.int().argmax()) if differs.any() else rows.shape[1]


def _context_span(words: torch.Tensor, empty: torch.Tensor, prompts: torch.Tensor) -> tuple[int, int] | None:
    """``(start, end)``: the positions of the template words' tokens at the head of every prompt, or None.

    Found by the tokenizer alone, whatever its special tokens: every text starts with what the words and the empty
    text share (CLIP's start-of-text; nothing for SigLIP's), and the words end where the prompts, which go on with
    their class names, part from them. The words alone must then end as the empty text does (their own tokens are
    all of the context), and every prompt must go on after them (no class name cut off).
    """
    start = _common_prefix(torch.stack([words, empty]))
    end = _common_prefix(torch.cat([words[None], prompts]))
    length = words.shape[0]
    if end <= start or end == length or (prompts[:, end] == words[end]).any():
        return None
    if not torch.equal(words[end:], empty[start : start + length - end]):
        return None
    return start, end


def encode_prompts(prompt: PromptContext, context: torch.Tensor) -> torch.Tensor:
    """L2-normalised text embeddings ``(n, C, dim)`` of the class prompts with each image's ``context``
    (``(n, n_ctx, width)``): the backbone's text features with the context's embeddings in place."""
    tokens = prompt.tokens
    n, classes = len(context), len(tokens)
    end = prompt.start + prompt.length
    embeddings = torch.cat([
        prompt.frozen[None, :, : prompt.start].expand(n, -1, -1, -1),
        context[:, None].expand(-1, classes, -1, -1),
        prompt.frozen[None, :, end:].expand(n, -1, -1, -1),
    ], dim=2).flatten(0, 1)
    features = prompt.backbone.encode_text_embeddings(embeddings, tokens.repeat(n, 1))
    return F.normalize(features.float(), dim=-1).view(n, classes, -1)


# --- selection, tuning, weighting -------------------------------------------------------------------


def view_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each view's predicted class distribution (last dimension: classes)."""
    return -(logits.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1)


def reliability_weights(features: torch.Tensor, neighbours: int, temperature: float,
                        self_mask: str = "diagonal") -> torch.Tensor:
    """``softmax(score / temperature)`` over each image's views, ``score`` being a view's mean cosine
    similarity to its ``neighbours`` most similar other views; ``features`` ``(n, views, dim)`` normalised.
    ``self_mask="authors"`` leaves out similarities >= 1.0 instead of each view's own, as the code does."""
    views = features.shape[1]
    similarity = features @ features.transpose(1, 2)
    if self_mask == "authors":
        self_pairs = similarity.detach() >= 1.0
    else:
        self_pairs = torch.eye(views, dtype=torch.bool, device=features.device)
    similarity = similarity.masked_fill(self_pairs, float("-inf"))
    score = similarity.topk(min(neighbours, views - 1), dim=-1).values.mean(dim=-1)
    return torch.softmax(score / temperature, dim=-1)


@register_defense
@dataclass(frozen=True)
class RTPT:
    """R-TPT, Sheng et al. 2025: per-image prompt tuning on 64 views, reliability-weighted ensemble (64 forwards per
    image)."""

    paper_precision: ClassVar[str] = "fp32"  # its authors' code runs in float32

    views: int = option(64, "views per image, the image itself included", low=2)
    augmentation: str = option("auto", "the views: auto (as the code chooses: crop and flip for the ImageNet family, "
                               "AugMix otherwise), augmix or crop-flip", choices=("auto", *AUGMENTATIONS))
    severity: float = option(1.0, "AugMix severity (operation levels are drawn in [0.1, severity))", low=0.1, high=10)
    selection: float = option(0.1, "fraction of views, lowest entropy first, whose mean entropy is minimised",
                              high=1)
    steps: int = option(1, "AdamW steps on the prompt context per image")
    lr: float = option(5e-3, "AdamW learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay (PyTorch's default, which the R-TPT code keeps)")
    neighbours: int = option(20, "a view's reliability is its mean cosine to this many most similar other views", low=1)
    temperature: float = option(0.01, "reliability weights: softmax(reliability / temperature)", low=1e-6)
    self_mask: str = option("diagonal", "what a view's reliability leaves out: diagonal (its own similarity) or "
                            "authors (similarities >= 1.0, as the code; in float32 about 40% of views keep their own)",
                            choices=SELF_MASKS)
    # Memory bounds, not settings: images are processed in chunks whose AugMix chains hold at most
    # ``chunk_values`` pixel values and whose text-encoder passes hold at most ``chunk_prompts`` prompts.
    chunk_values: int = runtime(2**25)
    chunk_prompts: int = runtime(8192)

    def for_dataset(self, dataset: str) -> RTPT:
        """``auto`` resolved as the authors' code resolves it for this dataset."""
        if self.augmentation != "auto":
            return self
        return replace(self, augmentation="crop-flip" if dataset in IMAGENET_FAMILY else "augmix")

    @property
    def view_augmentation(self) -> str:
        """The views' augmentation; ``auto`` outside a dataset (the library's API on any images) is AugMix."""
        return "augmix" if self.augmentation == "auto" else self.augmentation

    @property
    def selected_views(self) -> int:
        """How many views the entropy loss keeps: ``int(views * selection)`` as coded, at least one."""
        return max(1, int(self.views * self.selection))

    def _chunks(self, images: torch.Tensor, classes: int) -> Iterator[slice]:
        per_image = self.views * (AUGMIX_CHAINS + 1) * images[0].numel()
        size = max(1, min(self.chunk_values // per_image, self.chunk_prompts // max(classes, 1)))
        for start in range(0, len(images), size):
            yield slice(start, start + size)

    def _embed_views(self, classifier: ZeroShotClassifier, views: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings ``(n, views, dim)``: one encoder forward per view (under the caller's
        precision policy; everything after the image encoder runs in float32)."""
        features = classifier.encode_image(views.flatten(0, 1))
        return F.normalize(features.float(), dim=-1).view(*views.shape[:2], -1)

    def tune_context(self, prompt: PromptContext, features: torch.Tensor, logit_scale: float) -> torch.Tensor:
        """Each image's context after ``steps`` AdamW steps on the mean entropy of its most confident views
        (chosen at the first step, as coded); ``features`` are the views' normalised embeddings, held fixed."""
        context = prompt.init.detach().expand(len(features), -1, -1).clone().requires_grad_(True)
        # Adam works element by element, so one optimiser over every image's context is one per image.
        optimizer = torch.optim.AdamW([context], lr=self.lr, weight_decay=self.weight_decay)
        selected = None
        for _ in range(self.steps):
            with torch.enable_grad():
                text = encode_prompts(prompt, context)
                entropy = view_entropy(logit_scale * features.detach() @ text.transpose(1, 2))
                if selected is None:
                    selected = entropy.detach().argsort(dim=1, stable=True)[:, : self.selected_views]
                # Summed over images, so each image's gradient is its own mean over its selected views.
                loss = entropy.gather(1, selected).mean(dim=1).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
        return context.detach()

    def _defended_logits(self, classifier: ZeroShotClassifier, prompt: PromptContext, features: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
        """``sum_v w_v logits_v`` with each image's tuned prompt (differentiable in ``features`` and ``weights``)."""
        context = self.tune_context(prompt, features.detach(), classifier.logit_scale)
        with torch.no_grad():
            text = encode_prompts(prompt, context)
        logits = classifier.logit_scale * features @ text.transpose(1, 2)
        mixed = (weights[..., None] * logits).sum(dim=1)
        # The weights sum to 1: a sigmoid head's bias (SigLIP's) is the mix's as it is every view's.
        return mixed + classifier.logit_bias if classifier.logit_bias else mixed

    def _logits(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness,
                method: str | None, shown: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The defended logits; ``shown`` collects, per chunk, ``(c, k, 3, H, W)``: each image's k views that its
        reliability weights weigh most, heaviest first (at temperature 0.01 they carry nearly all of the mix)."""
        prompt = prompt_context(classifier)
        draws = draw_views(rng, self.views, self.severity, images.device)
        logits = []
        for chunk in self._chunks(images, len(prompt.tokens)):
            views = render_views(images[chunk], draws[chunk], self.view_augmentation, method)
            features = self._embed_views(classifier, views)
            # The text side, the weights and the head in float32 whatever the image encoder's precision:
            # softmax(score / 0.01) and the entropy gradient's signs are sensitive to rounding.
            with full_precision(images.device):
                weights = reliability_weights(features, self.neighbours, self.temperature, self.self_mask)
                logits.append(self._defended_logits(classifier, prompt, features, weights))
            if shown is not None:
                heaviest = weights.detach().argsort(dim=1, descending=True, stable=True)[:, :SHOWN_VIEWS]
                shown.append(views.detach()[torch.arange(len(views), device=views.device)[:, None], heaviest])
        return torch.cat(logits)

    @torch.no_grad()
    def __call__(self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness) -> DefenseOutput:
        x = check_pixels(images).detach().float()
        shown: list[torch.Tensor] = []
        logits = self._logits(classifier, x, rng, None, shown)
        heaviest = torch.cat(shown)
        return DefenseOutput(logits=logits, views=shown_views(heaviest.unbind(1)), view_count=self.views)

    def attack_view(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, rng: ImageRandomness, method: str,
        with_score: bool = False
    ) -> AttackView:
        """The ensemble as a function of the images: fresh views from ``rng``, the tuned context held fixed
        (see the module's docstring for what ``exact`` and ``bpda`` differentiate). R-TPT has no gate."""
        if method not in ADAPTIVE_METHODS:
            raise ValueError(f"unknown adaptive method {method!r}; one of {ADAPTIVE_METHODS}")
        return AttackView(self._logits(classifier, check_pixels(images), rng, method))

    def describe(self) -> dict:
        return {
            **describe_options(self),
            "selected_views": self.selected_views,
            "neighbours_used": min(self.neighbours, self.views - 1),
            "context": "the template's words before the class name",
            "text_encoder_per_image": {"forwards": self.steps + 1, "backwards": self.steps,
                                       "over": "every class prompt"},
        }
