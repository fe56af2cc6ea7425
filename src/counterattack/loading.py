"""What every backbone loader shares: the ``LoadedCLIP`` it returns, safe weights (pickled checkpoints refused,
non-finite weights refused), a model folder's JSON configuration, the Hugging Face Hub's reachability and the
message for a model that is neither on disk nor reachable, and the one way a text tower encodes given token
embeddings (prompt tuning).

The open_clip loaders (``models.py``) and the transformers one (``hf_transformers.py``) both import this module
and not each other; the scheme table that dispatches to them is ``backbones.py``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch

from .errors import CounterattackError

log = logging.getLogger(__name__)


@dataclass
class LoadedCLIP:
    """A backbone (an open_clip model, or any model meeting ``backbones.Backbone``, such as ``TransformersCLIP``)
    in eval mode with frozen weights, its tokenizer and its image settings."""

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Callable, description: str = "") -> "LoadedCLIP":
        """Wrap a model you created yourself (open_clip's, or one meeting ``backbones.Backbone`` whose ``visual``
        keeps a ``preprocess_cfg``); it is put in eval mode and frozen. Weights that hold NaN
        or infinite values are refused, naming the tensor: they would give NaN logits, or silently chance-level ones."""
        check_finite(model.state_dict(), description or type(model).__name__)
        model = model.eval().requires_grad_(False)
        cfg = dict(open_clip.get_model_preprocess_cfg(model))
        size = cfg.get("size", 224)
        return cls(
            model=model,
            tokenizer=tokenizer,
            image_size=(size, size) if isinstance(size, int) else tuple(size),
            mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
            preprocess_cfg=cfg,
            description=description,
        )


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN or infinite values, naming the first such tensor."""
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CounterattackError(f"{what}: the weights {name} hold NaN or infinite values (a damaged file, or a "
                                     "training run that diverged); use other weights.")


def refusal_message(what: str, details: str) -> str:
    """Why pickled weights are refused, and what to do instead (shared by every loader)."""
    return (
        f"Refusing to load {what}: the checkpoint holds pickled objects whose loading could run code, "
        "not only tensors. Convert it to safetensors (or a plain state dict) on a machine you trust. "
        f"Details: {details}"
    )


def refusal(what: str, exc: Exception) -> CounterattackError:
    """The refusal of pickled weights, from the unpickler's own error (its first line)."""
    return CounterattackError(refusal_message(what, str(exc).splitlines()[0]))


def read_json_config(path: Path) -> Any:
    """A model folder's JSON configuration, or a one-line error saying why it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CounterattackError(f"Cannot read {path}: {exc}") from exc


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub's endpoint answers a connection within ``timeout`` seconds."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    address = (url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80))
    reached = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            reached.set()
        except OSError:
            pass

    # A thread bounds the DNS look-up too, which socket timeouts do not cover.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return reached.is_set()


def go_offline_if_hub_unreachable() -> None:
    """Without this, huggingface_hub retries an unreachable hub for ~50 s before failing."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy")):
        return
    if not hub_reachable():
        log.warning("The Hugging Face Hub is unreachable: using the local cache only (as HF_HUB_OFFLINE=1).")
        constants.HF_HUB_OFFLINE = True


def hub_download_hint(repo: str, instead: str) -> str:
    """How to get a hub repository onto a machine that cannot reach the hub: `hf download` on one that can, and
    its cache copied here, or ``instead`` (a way without the hub)."""
    from huggingface_hub import constants

    return (f"On a machine with internet, run `hf download {repo}` and copy the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) here, or {instead}.")


def missing_download_message(what: str, exc: Exception, fetch: str) -> str:
    """One line: ``what`` could not be got, why (offline and not in the cache, or the download's own first line),
    then ``fetch``, how to get it."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        why = "the hub is unreachable or HF_HUB_OFFLINE is set, and it is not in the local cache"
    else:
        why = f"the download failed ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
    return f"Could not get {what}: {why}. {fetch}"


@contextmanager
def token_embeddings_replaced(layer: torch.nn.Module, embeddings: torch.Tensor) -> Iterator[None]:
    """While open, a text tower's token-embedding ``layer`` returns ``embeddings`` instead of looking its ids up.

    The tower's own forward then encodes them, with its own positions, attention mask, pooling at the token ids it
    was given, and projection, in whatever version of its library: prompt tuning replaces a few rows of these
    embeddings by learnable ones and differentiates through the rest of the tower unchanged.
    """

    def replace(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if output.shape != embeddings.shape:
            raise ValueError(f"token embeddings of shape {tuple(embeddings.shape)} given for token ids whose "
                             f"embeddings are {tuple(output.shape)}")
        return embeddings.to(output.dtype)

    handle = layer.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()
