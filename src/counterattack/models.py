"""Load a CLIP through open_clip: built-in name + pretrained tag, ``local-dir:PATH`` or ``hf-hub:org/name``;
or through Hugging Face transformers: ``transformers:ORG/NAME`` or ``transformers:PATH`` (hf_transformers.py).

Weights are only ever read safely (safetensors, or ``torch.load(weights_only=True)``), and a model
that is neither on disk nor reachable fails within seconds with a message saying what to fetch.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import pickle
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.factory import parse_model_name

from .errors import CounterattackError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-32"
TRANSFORMERS_PREFIX = "transformers:"  # a Hugging Face transformers model: hf_transformers.py
DEFAULT_PRETRAINED = "openai"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@dataclass
class LoadedCLIP:
    """An open_clip model (or a transformers one behind the same interface, ``TransformersCLIP``) in
    eval mode with frozen weights, its tokenizer and its image settings."""

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Callable, description: str = "") -> "LoadedCLIP":
        """Wrap an open_clip model you created yourself; it is put in eval mode and frozen. Weights that hold NaN
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


def resolve_device(choice: str | torch.device) -> torch.device:
    """``auto`` (a CUDA GPU if PyTorch sees one), ``cpu``, ``cuda`` or ``cuda:N``; anything else is one line."""
    if isinstance(choice, torch.device):
        return choice
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except (RuntimeError, TypeError) as exc:
        raise CounterattackError(f"Unknown device {choice!r}: use auto, cpu, cuda or cuda:N ({exc}).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CounterattackError(f"--device {choice} was asked for, but PyTorch sees no CUDA GPU.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CounterattackError(f"--device {choice}: PyTorch sees {torch.cuda.device_count()} CUDA GPU(s).")
    if device.type not in ("cpu", "cuda"):
        raise CounterattackError(f"Unsupported device {choice!r}: use auto, cpu, cuda or cuda:N.")
    return device


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN or infinite values, naming the first such tensor."""
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CounterattackError(f"{what}: the weights {name} hold NaN or infinite values (a damaged file, or a "
                                     "training run that diverged); use other weights.")


def load_clip(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> LoadedCLIP:
    """Load a CLIP for zero-shot classification.

    ``model`` is an open_clip built-in name (``ViT-B-32``) used with ``pretrained`` (a tag such as
    ``openai``, or a weights file), or ``local-dir:PATH`` / ``hf-hub:org/name`` (``pretrained`` is
    then ignored). Tags trained with QuickGELU (OpenAI's among them) are loaded into the QuickGELU
    variant of the architecture, so the features are the original model's.

    ``transformers:ORG/NAME`` or ``transformers:PATH`` loads a Hugging Face ``CLIPModel`` or
    ``SiglipModel`` with its processor's image settings and tokenizer (needs the ``transformers``
    extra; ``pretrained`` is ignored).
    """
    device = resolve_device(device)
    if model.startswith(TRANSFORMERS_PREFIX):
        from .hf_transformers import load_transformers_clip  # it imports this module: imported here

        return load_transformers_clip(model[len(TRANSFORMERS_PREFIX):], device=device, cache_dir=cache_dir)
    schema, identifier = _parse(model)
    force_quick_gelu = False
    needs_hub = schema == "hf-hub"
    if schema == "local-dir":
        _check_local_dir(Path(identifier))
        pretrained = None
    elif schema is None:
        force_quick_gelu, needs_hub = _check_builtin(identifier, pretrained)
    if needs_hub:
        _go_offline_if_hub_unreachable()

    description = model if schema else f"{model} (pretrained: {pretrained})"
    try:
        clip, _, _ = open_clip.create_model_and_transforms(
            model,
            pretrained=pretrained if schema is None else None,
            force_quick_gelu=force_quick_gelu,
            cache_dir=cache_dir,
            weights_only=True,
        )
        tokenizer = open_clip.get_tokenizer(model, cache_dir=cache_dir)
    except pickle.UnpicklingError as exc:
        raise _refusal(description, exc) from exc
    except CounterattackError:
        raise
    except Exception as exc:  # open_clip and the hub raise many types for a missing download
        if schema == "local-dir":
            raise CounterattackError(f"Could not load {description}: {exc}") from exc
        raise CounterattackError(_missing_download_message(schema, identifier, pretrained, exc)) from exc

    return LoadedCLIP.from_model(clip.to(device), tokenizer, description)


def refusal_message(what: str, details: str) -> str:
    """Why pickled weights are refused, and what to do instead (shared by every loader)."""
    return (
        f"Refusing to load {what}: the checkpoint holds pickled objects whose loading could run code, "
        "not only tensors. Convert it to safetensors (or a plain state dict) on a machine you trust. "
        f"Details: {details}"
    )


def _refusal(what: str, exc: Exception) -> CounterattackError:
    return CounterattackError(refusal_message(what, str(exc).splitlines()[0]))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a ``torch.load(weights_only=True)`` checkpoint; nothing else runs."""
    path = Path(path)
    if not path.is_file():
        raise CounterattackError(f"Checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(str(path), exc) from exc
    except Exception as exc:  # a truncated or foreign file
        raise CounterattackError(f"Cannot read checkpoint {path}: {exc}") from exc


def load_vision_checkpoint(clip: LoadedCLIP, path: str | Path) -> None:
    """Swap fine-tuned weights into ``clip``'s vision tower, strictly.

    Accepts the TTC authors' checkpoints (``vision_encoder_state_dict`` holding OpenAI-CLIP visual
    weights, whose names open_clip's ViT shares), a plain visual state dict, or a full CLIP state
    dict (its ``visual.`` entries are used); ``module.`` prefixes from DataParallel are dropped.
    """
    checkpoint = read_state_dict(path)
    state = checkpoint
    for key in ("vision_encoder_state_dict", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CounterattackError(f"{path} holds no state dict of tensors for a vision tower.")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    check_finite(state, str(path))
    expected = clip.model.visual.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        def some(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

        problems = [f"{label}: {some(items)}" for label, items in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if items]
        raise CounterattackError(
            f"{path} does not fit the vision tower of {clip.description}: " + "; ".join(problems)
            + ". Is it for this architecture (e.g. --model ViT-B-32 for a ViT-B/32 checkpoint)?"
        )
    device = next(clip.model.visual.parameters()).device
    clip.model.visual.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)


def _parse(model: str) -> tuple[str | None, str]:
    try:
        return parse_model_name(model)
    except ValueError as exc:
        raise CounterattackError(f"Bad model name {model!r}: {exc}") from exc


def read_json_config(path: Path) -> Any:
    """A model folder's JSON configuration, or a one-line error saying why it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CounterattackError(f"Cannot read {path}: {exc}") from exc


def _check_local_dir(path: Path) -> None:
    config = path / "open_clip_config.json"
    if not path.is_dir():
        raise CounterattackError(f"Model folder not found: {path}")
    if not config.is_file():
        raise CounterattackError(
            f"{path} is not an open_clip model folder: it needs open_clip_config.json "
            "(with 'model_cfg' and 'preprocess_cfg') beside a weights file."
        )
    parsed = read_json_config(config)
    if not isinstance(parsed, dict) or "model_cfg" not in parsed:
        raise CounterattackError(f"{config} has no 'model_cfg' entry.")
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir()):
        raise CounterattackError(
            f"No weights in {path}: expected open_clip_model.safetensors (or a .bin/.pth state dict)."
        )


def _check_builtin(name: str, pretrained: str | None) -> tuple[bool, bool]:
    """Validate a built-in name and tag; return (force QuickGELU, needs the hub)."""
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise CounterattackError(
            f"Unknown model {name!r}.{hint} Use an open_clip name, local-dir:PATH or hf-hub:org/name."
        )
    if not pretrained:
        return False, False
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        return bool(tag_cfg.get("quick_gelu", False)), True
    if os.path.isfile(pretrained):
        return False, False
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise CounterattackError(
        f"{pretrained!r} is neither a pretrained tag of {name} nor a file. Tags: {', '.join(tags) or 'none'}."
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
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


def _go_offline_if_hub_unreachable() -> None:
    """Without this, huggingface_hub retries an unreachable hub for ~50 s before failing."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy")):
        return
    if not _hub_reachable():
        log.warning("The Hugging Face Hub is unreachable: using the local cache only (as HF_HUB_OFFLINE=1).")
        constants.HF_HUB_OFFLINE = True


def _missing_download_message(schema: str | None, identifier: str, pretrained: str | None, exc: Exception) -> str:
    from huggingface_hub import constants

    if schema in ("hf-hub", "transformers"):
        repo, what = identifier, f"{schema}:{identifier}"
    else:
        tag_cfg = open_clip.get_pretrained_cfg(identifier, pretrained or "")
        # open_clip's convention: "org/name/" (default file) or "org/name/file.bin".
        repo = os.path.split(tag_cfg.get("hf_hub", ""))[0]
        what = f"{identifier} with pretrained weights {pretrained!r}"
    folder = (
        "save the model and its processor with save_pretrained into a folder and pass --model transformers:FOLDER"
        if schema == "transformers"
        else "put open_clip_config.json and the weights in a folder and pass --model local-dir:FOLDER"
    )
    fetch = (
        f"On a machine with internet, run `hf download {repo}` and copy the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) here, or {folder}."
        if repo
        else "Download the weights file and pass its path as --pretrained, or use --model local-dir:FOLDER."
    )
    if constants.HF_HUB_OFFLINE:
        why = "the hub is unreachable or HF_HUB_OFFLINE is set, and it is not in the local cache"
    else:
        why = f"the download failed ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
    return f"Could not get {what}: {why}. {fetch}"
