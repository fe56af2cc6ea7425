"""The backbone protocol and the scheme table.

A backbone is what the library touches of a CLIP-like model (``Backbone``): ``visual`` maps normalised
pixels to image embeddings, ``encode_text`` token ids to text embeddings, ``logit_scale`` is the log of
the logits' scale and ``logit_bias`` the sigmoid head's bias (None for a softmax CLIP). The zero-shot
classifier, every attack and every defense need nothing else. R-TPT's prompt tuning needs the text
tower opened in two (``PromptTunable``): the token embeddings of token ids, and the text features of
given token embeddings, so that a learnable context can replace some of them.

``SCHEMES`` maps a model name's prefix to its row: the function that loads it into a ``LoadedCLIP`` and how its
weights are identified in a run (``WeightsIdentity``; every row today by the tensors it loaded): open_clip's
built-in names (no prefix), ``local-dir:``, ``hf-hub:`` and ``transformers:``. A new kind of backbone is one row:
a prefix, a loader (``SchemeLoader``) whose model meets the protocol (or is open_clip's), and an identity.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import open_clip
import torch

from .errors import CounterattackError
from .hf_transformers import TRANSFORMERS_PREFIX, load_transformers_clip
from .loading import LoadedCLIP
from .models import (
    DEFAULT_MODEL, DEFAULT_PRETRAINED, HF_HUB_PREFIX, LOCAL_DIR_PREFIX, OpenCLIPBackbone, load_builtin, load_hf_hub,
    load_local_dir, resolve_device,
)


@runtime_checkable
class Backbone(Protocol):
    """What the library uses of a model: open_clip's models and ``TransformersCLIP`` meet it as they are."""

    visual: torch.nn.Module  # normalised pixels (n, 3, H, W) -> image embeddings (n, dim), not normalised

    @property
    def logit_scale(self) -> torch.Tensor:
        """The log of the scale of the logits ``scale * cos(image, text)``."""

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """The bias added to every logit (a sigmoid head's, SigLIP's), or None."""

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings ``(n, dim)`` of token ids ``(n, L)`` as the backbone's tokenizer returns them."""


@runtime_checkable
class PromptTunable(Backbone, Protocol):
    """A backbone whose text tower prompt tuning can open: its input and the rest of it."""

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The text tower's token embeddings ``(n, L, width)`` of token ids ``(n, L)``."""

    def encode_text_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings ``(n, dim)``, not normalised, of token embeddings ``(n, L, width)`` in place of those
        of ``tokens``, which still decide the rest (the position pooled, a padding mask): with
        ``embed_tokens(tokens)`` this is ``encode_text(tokens)``, and it is differentiable in ``embeddings``."""


def prompt_tunable(model: torch.nn.Module) -> PromptTunable:
    """``model`` as a ``PromptTunable``: itself if it is one, open_clip's ``CLIP`` through ``OpenCLIPBackbone``;
    anything else is refused in one line."""
    if isinstance(model, PromptTunable):
        return model
    if isinstance(model, open_clip.CLIP):
        return OpenCLIPBackbone(model)
    raise CounterattackError(
        f"A {type(model).__name__} model cannot be prompt-tuned: tuning needs its text tower's token embeddings and "
        "the text features of given ones (backbones.PromptTunable), which open_clip's CLIP class and transformers' "
        "CLIP and SigLIP models offer.")


class SchemeLoader(Protocol):
    """A row's loader: the model named by ``identifier`` (the name after the prefix), in eval mode with frozen
    weights, on ``device``; ``pretrained`` is the tag or weights file given with a name (only open_clip's built-in
    names use it) and ``cache_dir`` where downloads are kept (None: the library's default)."""

    def __call__(self, identifier: str, *, pretrained: str | None, device: torch.device,
                 cache_dir: str | None) -> LoadedCLIP: ...


class WeightsIdentity(Protocol):
    """How a row's models are identified in a run's configuration: ``{"model": ..., "weights": ..., ...}`` from the
    name as given (``prefix``, ``identifier``, ``pretrained``) and the model as loaded. Two runs whose identities
    are equal computed on the same weights; weights of other content must give another identity."""

    def __call__(self, prefix: str, identifier: str, pretrained: str | None, loaded: LoadedCLIP) -> dict[str, Any]: ...


def tensors_fingerprint(module: torch.nn.Module) -> str:
    """A module's weights by content: every tensor of its state, by name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}\n".encode())
        digest.update(data.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def by_loaded_tensors(prefix: str, identifier: str, pretrained: str | None, loaded: LoadedCLIP) -> dict[str, Any]:
    """The tensors actually loaded, whatever files they came from (an unrelated file beside them changes nothing, a
    file edited in place is new weights); a local path is named by its scheme alone, so the same weights reached by
    another path are the same run. The built-in names keep their pretrained tag ("file" for a weights file)."""
    local = bool(prefix) and Path(identifier).expanduser().exists()
    described: dict[str, Any] = {"model": f"{prefix}folder" if local else f"{prefix}{identifier}"}
    if not prefix:
        described["pretrained"] = "file" if pretrained and Path(pretrained).expanduser().is_file() else pretrained
    described["weights"] = tensors_fingerprint(loaded.model)
    return described


@dataclass(frozen=True)
class Scheme:
    """A row of the scheme table: how its models load, and how their weights are identified in a run."""

    load: SchemeLoader
    identify: WeightsIdentity


# One row per scheme: a model name's prefix -> its loader and identity. The empty prefix holds open_clip's built-in
# names; a name with a colon must start with one of the others.
SCHEMES: dict[str, Scheme] = {
    "": Scheme(load_builtin, by_loaded_tensors),
    LOCAL_DIR_PREFIX: Scheme(load_local_dir, by_loaded_tensors),
    HF_HUB_PREFIX: Scheme(load_hf_hub, by_loaded_tensors),
    TRANSFORMERS_PREFIX: Scheme(load_transformers_clip, by_loaded_tensors),
}


def split_scheme(model: str) -> tuple[str, str]:
    """``(prefix, identifier)`` of a model name by the scheme table: ``("local-dir:", "PATH")``, or ``("", NAME)``
    for an open_clip built-in name; a name whose prefix is no scheme's is refused."""
    prefix = max((p for p in SCHEMES if p and model.startswith(p)), key=len, default="")
    if not prefix and ":" in model:
        raise CounterattackError(f"Unknown model {model!r}: a name with a colon starts with a scheme, one of "
                                 f"{', '.join(p for p in SCHEMES if p)} (or use an open_clip name, e.g. ViT-B-32).")
    identifier = model[len(prefix):]
    if not identifier:
        raise CounterattackError(f"Bad model name {model!r}: nothing follows the scheme {prefix}.")
    return prefix, identifier


def load_clip(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> LoadedCLIP:
    """Load a CLIP for zero-shot classification, by the scheme table.

    ``model`` is an open_clip built-in name (``ViT-B-32``) used with ``pretrained`` (a tag such as
    ``openai``, or a weights file), or ``local-dir:PATH`` / ``hf-hub:org/name`` (``pretrained`` is
    then ignored). Tags trained with QuickGELU (OpenAI's among them) are loaded into the QuickGELU
    variant of the architecture, so the features are the original model's.

    ``transformers:ORG/NAME`` or ``transformers:PATH`` loads a Hugging Face ``CLIPModel`` or
    ``SiglipModel`` with its processor's image settings and tokenizer (needs the ``transformers``
    extra; ``pretrained`` is ignored). Any other row of ``SCHEMES`` loads the names it prefixes.
    """
    device = resolve_device(device)
    prefix, identifier = split_scheme(model)
    loaded = SCHEMES[prefix].load(identifier, pretrained=pretrained, device=device, cache_dir=cache_dir)
    if not isinstance(loaded.model, Backbone):  # a new row's mistake, said here rather than deep in an attack
        lacking = [name for name in ("visual", "logit_scale", "logit_bias", "encode_text")
                   if not hasattr(loaded.model, name)]
        raise CounterattackError(f"{model}: the {prefix or 'open_clip'} loader gave a {type(loaded.model).__name__}, "
                                 f"which is not a backbone (it lacks {', '.join(lacking)}; see backbones.Backbone).")
    return loaded


def weights_identity(model: str, pretrained: str | None, loaded: LoadedCLIP) -> dict[str, Any]:
    """What a run records of the weights it loaded: its scheme row's identity of ``loaded``."""
    prefix, identifier = split_scheme(model)
    return SCHEMES[prefix].identify(prefix, identifier, pretrained if not prefix else None, loaded)
