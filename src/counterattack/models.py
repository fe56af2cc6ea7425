"""open_clip backbones, three rows of the scheme table (``backbones.py``): a built-in name with a pretrained tag
or weights file, ``local-dir:PATH`` and ``hf-hub:ORG/NAME``; fine-tuned vision weights swapped into a loaded model;
and the prompt-tuning side of the backbone protocol over open_clip's ``CLIP`` (``OpenCLIPBackbone``).

Weights are only ever read safely (safetensors, or ``torch.load(weights_only=True)``), and a model
that is neither on disk nor reachable fails within seconds with a message saying what to fetch.
"""

from __future__ import annotations

import difflib
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from open_clip.factory import HF_HUB_PREFIX, LOCAL_DIR_PREFIX

from .config import DEFAULT_MODEL, DEFAULT_PRETRAINED
from .errors import CounterattackError
from .loading import (
    LoadedCLIP, check_finite, go_offline_if_hub_unreachable, hub_download_hint, missing_download_message,
    read_json_config, refusal, token_embeddings_replaced,
)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# Without the hub, an open_clip model is a folder: what to put in it.
_LOCAL_DIR_INSTEAD = "put open_clip_config.json and the weights in a folder and pass --model local-dir:FOLDER"

__all__ = [
    "DEFAULT_MODEL", "DEFAULT_PRETRAINED", "HF_HUB_PREFIX", "LOCAL_DIR_PREFIX", "LoadedCLIP", "OpenCLIPBackbone",
    "check_finite", "load_builtin", "load_hf_hub", "load_local_dir", "load_vision_checkpoint", "read_state_dict",
    "resolve_device",
]


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


def load_builtin(name: str, *, pretrained: str | None, device: torch.device, cache_dir: str | None) -> LoadedCLIP:
    """An open_clip built-in architecture (``ViT-B-32``) with ``pretrained`` weights: a tag such as ``openai``, or a
    weights file. Tags trained with QuickGELU (OpenAI's among them) are loaded into the QuickGELU variant of the
    architecture, so the features are the original model's."""
    force_quick_gelu, needs_hub = _check_builtin(name, pretrained)
    if needs_hub:
        go_offline_if_hub_unreachable()

    def missing(exc: Exception) -> str:
        # open_clip's convention for a tag's weights: "org/name/" (default file) or "org/name/file.bin".
        repo = os.path.split(open_clip.get_pretrained_cfg(name, pretrained or "").get("hf_hub", ""))[0]
        fetch = (hub_download_hint(repo, _LOCAL_DIR_INSTEAD) if repo
                 else "Download the weights file and pass its path as --pretrained, or use --model local-dir:FOLDER.")
        return missing_download_message(f"{name} with pretrained weights {pretrained!r}", exc, fetch)

    return _create(name, pretrained, force_quick_gelu, f"{name} (pretrained: {pretrained})", device, cache_dir, missing)


def load_local_dir(path: str, *, pretrained: str | None, device: torch.device, cache_dir: str | None) -> LoadedCLIP:
    """``local-dir:PATH``: a folder holding open_clip_config.json and the weights (``pretrained`` is ignored)."""
    _check_local_dir(Path(path))
    model = f"{LOCAL_DIR_PREFIX}{path}"
    return _create(model, None, False, model, device, cache_dir, lambda exc: f"Could not load {model}: {exc}")


def load_hf_hub(repo: str, *, pretrained: str | None, device: torch.device, cache_dir: str | None) -> LoadedCLIP:
    """``hf-hub:ORG/NAME``: an open_clip model on the Hugging Face Hub, or in its local cache when the hub cannot
    be reached (``pretrained`` is ignored)."""
    go_offline_if_hub_unreachable()
    model = f"{HF_HUB_PREFIX}{repo}"
    return _create(model, None, False, model, device, cache_dir,
                   lambda exc: missing_download_message(model, exc, hub_download_hint(repo, _LOCAL_DIR_INSTEAD)))


def _create(model: str, pretrained: str | None, force_quick_gelu: bool, description: str, device: torch.device,
            cache_dir: str | None, missing: Callable[[Exception], str]) -> LoadedCLIP:
    """open_clip's model and tokenizer for ``model`` (its own name, scheme included), loaded safely; ``missing``
    says what went wrong when open_clip or the hub fails."""
    try:
        clip, _, _ = open_clip.create_model_and_transforms(
            model,
            pretrained=pretrained,
            force_quick_gelu=force_quick_gelu,
            cache_dir=cache_dir,
            weights_only=True,
        )
        tokenizer = open_clip.get_tokenizer(model, cache_dir=cache_dir)
    except pickle.UnpicklingError as exc:
        raise refusal(description, exc) from exc
    except CounterattackError:
        raise
    except Exception as exc:  # open_clip and the hub raise many types for a missing download
        raise CounterattackError(missing(exc)) from exc
    return LoadedCLIP.from_model(clip.to(device), tokenizer, description)


class OpenCLIPBackbone:
    """open_clip's ``CLIP`` as a prompt-tunable backbone (``backbones.PromptTunable``): the model's own ``visual``,
    ``encode_text``, ``logit_scale`` and ``logit_bias``, and its text tower's token embedding. ``CustomTextCLIP``
    keeps its text tower (open_clip's or a Hugging Face one) behind ``model.text``, which this does not open."""

    def __init__(self, model: open_clip.CLIP):
        self.model = model

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> torch.Tensor | None:
        return getattr(self.model, "logit_bias", None)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens)

    def encode_text_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        with token_embeddings_replaced(self.model.token_embedding, embeddings):
            return self.model.encode_text(tokens)


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
        raise refusal(str(path), exc) from exc
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
            f"Unknown model {name!r}.{hint} Use an open_clip name, local-dir:PATH, hf-hub:org/name or "
            "transformers:ORG/NAME|PATH."
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
