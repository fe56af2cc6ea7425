"""The zero-shot head and the image preprocessing: the one place where pixels meet CLIP.

Attacks and defenses work on [0, 1] pixels; resizing to the model's input size and normalising
with its mean/std happen here, differentiably, so gradients reach the pixels.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from open_clip.zero_shot_classifier import build_zero_shot_classifier

from .errors import CounterattackError
from .inputs import ArgumentKindError, check_pixels, inputs_checked, kind_of
from .loading import LoadedCLIP
from .precision import full_precision

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES: tuple[str, ...] = ("This is a photo of a {}.",)

@dataclass
class EncoderPasses:
    """Image-encoder passes over single images: a batch of n counts n."""

    forwards: int = 0
    backwards: int = 0


_ACTIVE_COUNTERS: list[EncoderPasses] = []


@contextlib.contextmanager
def count_encoder_passes() -> Iterator[EncoderPasses]:
    """Count every image-encoder forward, and every backward through one, inside the block.

    Costs are measured here rather than declared by each defense, so a defense's reported cost is
    the computation it actually did (every ``ImageEncoder`` counts, a separate tau encoder too).
    """
    passes = EncoderPasses()
    _ACTIVE_COUNTERS.append(passes)
    try:
        yield passes
    finally:
        _ACTIVE_COUNTERS.remove(passes)


def _count(batch: int, embeddings: torch.Tensor) -> None:
    for passes in list(_ACTIVE_COUNTERS):
        passes.forwards += batch
        if embeddings.requires_grad:
            def backward(grad: torch.Tensor, passes: EncoderPasses = passes) -> None:
                passes.backwards += batch

            embeddings.register_hook(backward)


class ImageEncoder(nn.Module):
    """[0, 1] pixels of any size -> unnormalised CLIP image embeddings.

    Images whose size differs from the model's input size are resized with bicubic interpolation
    (antialiased, so downsampling matches PIL); images of the right size are left untouched.

    The first batch it encodes (after each cast) is checked for finite embedding norms: weights that overflow give
    NaN logits and chance-level accuracy without a word, and one check per encoder costs nothing afterwards.
    """

    def __init__(
        self,
        visual: nn.Module,
        image_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        self.visual = visual
        self.image_size = tuple(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.checked_finite = False

    @classmethod
    def from_clip(cls, clip: LoadedCLIP) -> "ImageEncoder":
        return cls(clip.model.visual, clip.image_size, clip.mean, clip.std)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected RGB images of shape (N, 3, H, W), got {tuple(pixels.shape)}")
        if pixels.dtype == torch.float64:  # the weights are float32 (or autocast's): double pixels are pixels too
            pixels = pixels.float()
        if tuple(pixels.shape[-2:]) != self.image_size:
            pixels = F.interpolate(pixels, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        return (pixels - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # PyTorch's attention "fast path" runs only when no gradient is tracked, and rounds
        # differently. Without it an embedding is bit-identical with or without autograd, so TTC's
        # gate (a small difference of two embeddings) never depends on which code path computed it.
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            embeddings = self.visual(self.preprocess(pixels))
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        if not self.checked_finite:
            self._check_finite(embeddings)
        if _ACTIVE_COUNTERS:
            _count(len(pixels), embeddings)
        return embeddings

    def _check_finite(self, embeddings: torch.Tensor) -> None:
        # The norm, not the values: finite values whose squares overflow make every logit 0 (the command line's check).
        if not torch.isfinite(embeddings.detach().float().norm(dim=-1)).all():
            raise CounterattackError(
                "non-finite image embedding norms (NaN or infinity) on the first images this model encoded: its "
                "weights likely overflow (values too large for its precision, or a float16 cast of weights that need "
                "float32); every logit would be NaN or 0")
        self.checked_finite = True

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "ImageEncoder":
        self.checked_finite = False  # weights fine in float32 may overflow in float16: check the next batch again
        return super()._apply(fn, *args, **kwargs)


class ZeroShotClassifier(nn.Module):
    """CLIP as a classifier: ``logits(x) = logit_scale * cos(f(x), t_c) + logit_bias`` for every class ``c``.

    Text embeddings are computed once (L2-normalised, averaged over the templates, normalised
    again) and cached. ``encode_image`` returns unnormalised embeddings, as TTC's tau needs.
    ``logit_bias`` is 0 for CLIP and the learnt bias of SigLIP's sigmoid head; one bias shared by
    every class changes no prediction and no softmax or margin loss, only the logits' values.
    """

    def __init__(self, encoder: ImageEncoder, text_embeddings: torch.Tensor, logit_scale: float,
                 class_names: Sequence[str], logit_bias: float = 0.0):
        super().__init__()
        if len(class_names) != len(text_embeddings):
            raise ValueError("one text embedding per class name is needed")
        self.encoder = encoder
        self.register_buffer("text_embeddings", F.normalize(text_embeddings.float(), dim=-1))
        self.logit_scale = float(logit_scale)
        self.logit_bias = float(logit_bias)
        self.class_names = list(class_names)
        self.clip: LoadedCLIP | None = None  # set by from_clip
        self.templates: tuple[str, ...] = DEFAULT_TEMPLATES
        # Per class name, sentences describing the class (CuPL's and AWT's LLM descriptions), for the defenses that
        # build their own text side from them (DBD, COLA); None where no file was given.
        self.descriptions: Mapping[str, Sequence[str]] | None = None
        self._text_side: dict[Hashable, Any] = {}

    @classmethod
    @torch.no_grad()
    def from_clip(
        cls,
        clip: LoadedCLIP,
        class_names: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        chunk_size: int = 256,
        descriptions: Mapping[str, Sequence[str]] | None = None,
    ) -> "ZeroShotClassifier":
        for what, value, example in (("class_names", class_names, '["cat", "dog"]'),
                                     ("templates", templates, '["a photo of a {}."]')):
            if isinstance(value, (str, bytes)):  # a string is a sequence of characters: "cat" would be 3 classes
                raise ArgumentKindError(f"{what} must be a list of strings (such as {example}), got {kind_of(value)}")
        if not class_names:
            raise CounterattackError("A zero-shot classifier needs at least one class name.")
        # CLIP's tokenizers lower-case and collapse whitespace: "Cat" and "cat " are one prompt.
        keys = [" ".join(name.split()).casefold() for name in class_names]
        repeated = sorted({name for name, key in zip(class_names, keys, strict=True) if keys.count(key) > 1})
        if repeated:  # a benchmark's own prompts may repeat a name (the paper's Caltech-101 has two "person")
            log.warning("class names repeat as the text encoder reads them (%s): images of those classes cannot be "
                        "told apart by their prompts", ", ".join(map(repr, repeated)))
        for template in templates:
            if template.count("{}") != 1:
                raise CounterattackError(f"Template {template!r} must contain '{{}}' exactly once.")
        device = next(clip.model.parameters()).device
        # open_clip's own head builder: per class, the mean of the L2-normalised template
        # embeddings, normalised again; it returns (dim, classes).
        embeddings = build_zero_shot_classifier(clip.model, clip.tokenizer, list(class_names), list(templates),
                                                num_classes_per_batch=chunk_size, device=device).T
        logit_scale = clip.model.logit_scale.exp().item()
        bias = getattr(clip.model, "logit_bias", None)  # SigLIP (open_clip's or transformers')
        logit_bias = bias.item() if bias is not None else 0.0
        classifier = cls(ImageEncoder.from_clip(clip), embeddings, logit_scale, class_names, logit_bias).to(device)
        # Defenses that work on the text side (R-TPT's prompt tuning) need the model and the prompts.
        classifier.clip, classifier.templates, classifier.descriptions = clip, tuple(templates), descriptions
        return classifier

    def text_side(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per classifier and ``key``: a defense's text-side work (its own class embeddings,
        a blank prompt's) is done once per dataset, not once per batch."""
        if key not in self._text_side:
            self._text_side[key] = build()
        return self._text_side[key]

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], chunk_size: int = 256) -> torch.Tensor:
        """The L2-normalised text embeddings ``(len(texts), dim)`` of sentences, in float32, with the model's own
        tokenizer and text tower."""
        if self.clip is None:
            raise CounterattackError("encoding text needs the model: build the classifier with "
                                     "ZeroShotClassifier.from_clip.")
        device = self.text_embeddings.device
        chunks = [self.clip.model.encode_text(self.clip.tokenizer(list(texts[i:i + chunk_size])).to(device)).float()
                  for i in range(0, len(texts), chunk_size)]
        return F.normalize(torch.cat(chunks), dim=-1)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings of [0, 1] pixels (checked, unless inside the library's own loops)."""
        return self.encoder(pixels if inputs_checked() else check_pixels(pixels))

    def logits_from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The zero-shot head, always in float32 (even inside an autocast region)."""
        with full_precision(embeddings.device):
            # .float() on the text side too: a classifier cast to float64 keeps a float32 head
            logits = self.logit_scale * F.normalize(embeddings.float(), dim=-1) @ self.text_embeddings.float().T
        return logits + self.logit_bias if self.logit_bias else logits

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """The zero-shot logits of [0, 1] pixels."""
        return self.logits_from_embeddings(self.encode_image(pixels))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.logits(pixels)
