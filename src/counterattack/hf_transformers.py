"""CLIP and SigLIP from Hugging Face ``transformers``, behind the backbone protocol (``backbones.py``).

``load_clip("transformers:ORG/NAME")`` (a hub id, read from the local Hugging Face cache when
offline) or ``load_clip("transformers:FOLDER")`` (a ``save_pretrained`` folder holding the model, its
image processor and its tokenizer) returns the same ``LoadedCLIP`` as an open_clip model.

The rest of the library touches a backbone through the protocol only: ``model.visual`` (normalised
pixels -> image embeddings), ``model.encode_text(tokens, normalize=...)``, ``model.logit_scale`` (the
log of the scale), ``model.logit_bias`` (None for CLIP) and, for R-TPT's prompt tuning, the token
embeddings and the text features of given ones. ``TransformersCLIP`` offers exactly these over a
``CLIPModel`` or ``SiglipModel``, so preprocessing, the zero-shot head, every attack and every defense
run unchanged on either kind of model.

``transformers`` is an optional dependency (``pip install "clip-counterattack[transformers]"``); this
module imports it only when a model is loaded. Weights are read from safetensors files only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CounterattackError
from .loading import (
    LoadedCLIP, go_offline_if_hub_unreachable, hub_download_hint, missing_download_message, read_json_config,
    refusal_message, token_embeddings_replaced,
)

log = logging.getLogger(__name__)

TRANSFORMERS_PREFIX = "transformers:"  # its row in the scheme table (backbones.py)

EXTRA_INSTALL = 'pip install "clip-counterattack[transformers]"'  # transformers and sentencepiece
INSTALL_HINT = f'{EXTRA_INSTALL} (or: pip install "transformers>=4.40")'

# model_type in config.json -> the transformers class that holds it. Both compute
# logits = logit_scale.exp() * cos(image, text) (+ logit_bias for SigLIP's sigmoid head).
SUPPORTED_MODEL_TYPES = {"clip": "CLIPModel", "siglip": "SiglipModel"}

# What a model folder needs from the hub: configs, transformers' safetensors weights (whole or
# sharded; not the open_clip copy some repos also hold), tokenizer files. Pickled weights
# (pytorch_model.bin) are never fetched, so they can never be loaded by accident.
HUB_PATTERNS = ("*.json", "model*.safetensors", "*.txt", "*.model", "*.tiktoken")
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# PIL resampling codes (what image processors store) -> open_clip's interpolation names.
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


class TransformersImageTower(nn.Module):
    """Normalised pixels -> image embeddings, as open_clip's ``model.visual``.

    The embedding is the projection head's output: CLIP's ``visual_projection`` of the pooled
    class token, SigLIP's attention-pooling head (its ``pooler_output``, already in the joint space).
    ``preprocess_cfg`` holds the image processor's settings, where open_clip keeps them.
    """

    def __init__(self, model: nn.Module, preprocess_cfg: dict[str, Any]):
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = getattr(model, "visual_projection", None) or nn.Identity()
        self.preprocess_cfg = dict(preprocess_cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pooler_output exists in every transformers version we support; get_image_features'
        # return type does not (a tensor before 5.0, a model output after).
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class TransformersCLIP(nn.Module):
    """A transformers ``CLIPModel`` or ``SiglipModel`` as a backbone (``backbones.PromptTunable``).

    ``visual`` maps normalised pixels to image embeddings, ``encode_text`` maps token ids (as the
    ``TransformersTokenizer`` returns them) to text embeddings, ``logit_scale`` is the model's own
    (log) scale and ``logit_bias`` its bias (None for CLIP); ``embed_tokens`` and
    ``encode_text_embeddings`` are the text tower's input and the rest of it, for prompt tuning.
    Wrap a model you loaded yourself with
    ``LoadedCLIP.from_model(TransformersCLIP(model, preprocess_cfg), TransformersTokenizer(tok, n))``.
    """

    def __init__(self, model: nn.Module, preprocess_cfg: dict[str, Any]):
        super().__init__()
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CounterattackError(
                f"A {model_type or type(model).__name__} model is not supported: use a CLIP (CLIPModel) "
                "or SigLIP (SiglipModel) model."
            )
        self.model_type = model_type
        self.hf_model = model
        self.visual = TransformersImageTower(model, preprocess_cfg)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.hf_model.logit_scale

    @property
    def logit_bias(self) -> torch.Tensor | None:
        return getattr(self.hf_model, "logit_bias", None)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(pixel_values)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        # No attention mask, as open_clip: CLIP's text tower is causal and pools the first end
        # token, so the padding after it cannot change the result; SigLIP was trained on
        # max-length padded text without a mask and pools the last position.
        pooled = self.hf_model.text_model(input_ids=tokens).pooler_output
        projection = getattr(self.hf_model, "text_projection", None)
        features = projection(pooled) if projection is not None else pooled
        return F.normalize(features, dim=-1) if normalize else features

    @property
    def _token_embedding(self) -> nn.Module:
        return self.hf_model.text_model.embeddings.token_embedding

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._token_embedding(tokens)

    def encode_text_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # The text model's own forward, its token embeddings replaced: whatever the version, transformers then
        # builds CLIP's causal mask and pools at the end token of ``tokens`` (CLIP) or the last position (SigLIP,
        # through its head). Driving its parts by hand would tie this to one version: the text model takes no
        # inputs_embeds, and its encoder's arguments changed (causal_attention_mask in 4.x, is_causal in 5.x).
        with token_embeddings_replaced(self._token_embedding, embeddings):
            return self.encode_text(tokens)


class TransformersTokenizer:
    """A transformers tokenizer as open_clip's: a list of texts in, a LongTensor of token ids out,
    each row padded (or truncated, keeping the end token) to ``context_length``.

    Max-length padding is what SigLIP was trained with, and changes nothing for CLIP.
    """

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = int(context_length)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                                 return_tensors="pt")
        return encoded["input_ids"]


def import_transformers() -> Any:
    """The transformers package, or a one-line ``CounterattackError`` saying what to install."""
    try:
        import transformers
    except ImportError as exc:
        raise CounterattackError(f"--model {TRANSFORMERS_PREFIX}... needs the transformers package ({exc}): "
                                 f"{INSTALL_HINT}") from exc
    return transformers


def load_transformers_clip(identifier: str, *, pretrained: str | None = None, device: str | torch.device = "cpu",
                           cache_dir: str | None = None) -> LoadedCLIP:
    """Load ``transformers:IDENTIFIER``: a ``save_pretrained`` folder, or a hub id (ORG/NAME) that is
    fetched (or, offline, read from the local cache) without its pickled weights (``pretrained`` is ignored:
    the folder holds the weights).

    The model runs in float32 with transformers' plain ("eager") attention: like the open_clip
    models here, an embedding is then bit-identical with and without autograd, which TTC's gate
    (a small difference of two embeddings) relies on; fused attention kernels may round differently.
    """
    description = f"{TRANSFORMERS_PREFIX}{identifier}"
    transformers = import_transformers()
    folder = _model_folder(identifier, cache_dir)
    model_type = _check_folder(folder, description)

    def load(what: str, loader: Any) -> Any:
        try:
            return loader()
        except CounterattackError:
            raise
        except Exception as exc:  # transformers raises many types for a broken folder
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            # SigLIP's tokenizer needs sentencepiece, which plain `pip install transformers` lacks.
            hint = f" ({EXTRA_INSTALL})" if "sentencepiece" in str(exc).lower() else ""
            raise CounterattackError(f"Could not load the {what} of {description}: {first_line}{hint}") from exc

    # local_files_only: the folder is complete here, nothing is looked up online.
    image_processor = load("image processor", lambda: transformers.AutoImageProcessor.from_pretrained(
        folder, local_files_only=True))
    tokenizer = load("tokenizer", lambda: transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True))
    model_class = getattr(transformers, SUPPORTED_MODEL_TYPES[model_type])
    model = load("model", lambda: model_class.from_pretrained(
        folder, use_safetensors=True, local_files_only=True, attn_implementation="eager"))
    model = model.float()

    preprocess_cfg = image_settings(image_processor)
    expected = getattr(model.config.vision_config, "image_size", None)
    if expected is not None and tuple(preprocess_cfg["size"]) != (expected, expected):
        raise CounterattackError(
            f"{description}: its image processor gives {preprocess_cfg['size']} images but the model "
            f"takes {expected}x{expected}; fix preprocessor_config.json."
        )
    text_positions = model.config.text_config.max_position_embeddings
    context_length = min(int(getattr(tokenizer, "model_max_length", text_positions) or text_positions), text_positions)
    adapter = TransformersCLIP(model, preprocess_cfg).to(device)
    return LoadedCLIP.from_model(adapter, TransformersTokenizer(tokenizer, context_length), description)


def image_settings(image_processor: Any) -> dict[str, Any]:
    """open_clip's preprocess_cfg (size, mean, std, interpolation, resize_mode) of a CLIP or SigLIP
    image processor: CLIP resizes the shortest side and centre-crops ("shortest"), SigLIP resizes
    to the exact size ("squash")."""

    def entry(sizes: Any, key: str) -> int | None:
        return dict(sizes).get(key) if sizes is not None else None

    crop = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    size = getattr(image_processor, "size", None)
    if crop is not None and entry(crop, "height"):
        height, width, resize_mode = entry(crop, "height"), entry(crop, "width"), "shortest"
        shortest = entry(size, "shortest_edge")
        if shortest and shortest != min(height, width):
            # open_clip's eval transform resizes the shortest side to the crop size itself.
            log.warning("The image processor resizes to %s before a %sx%s crop; image folders are resized "
                        "straight to the crop size.", shortest, height, width)
    elif entry(size, "height"):
        height, width, resize_mode = entry(size, "height"), entry(size, "width"), "squash"
    elif entry(size, "shortest_edge"):
        height = width = entry(size, "shortest_edge")
        resize_mode = "shortest"
    else:
        raise CounterattackError(f"Cannot tell the image size from the image processor's size {size!r}.")
    return {
        "size": (int(height), int(width)),
        "mean": tuple(float(v) for v in image_processor.image_mean),
        "std": tuple(float(v) for v in image_processor.image_std),
        "interpolation": _RESAMPLE.get(int(getattr(image_processor, "resample", 3)), "bicubic"),
        "resize_mode": resize_mode,
    }


def _model_folder(identifier: str, cache_dir: str | None) -> Path:
    """A local folder, as given or as the hub's cached snapshot of a hub id."""
    path = Path(identifier).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not _HUB_ID.match(identifier):
        raise CounterattackError(
            f"Model folder not found: {identifier} (transformers: takes a save_pretrained folder or a hub id ORG/NAME)."
        )
    from huggingface_hub import constants, snapshot_download

    go_offline_if_hub_unreachable()
    try:
        snapshot = snapshot_download(identifier, cache_dir=cache_dir, allow_patterns=list(HUB_PATTERNS),
                                     local_files_only=bool(constants.HF_HUB_OFFLINE))
    except Exception as exc:  # huggingface_hub raises many types for a missing download
        fetch = hub_download_hint(identifier, "save the model and its processor with save_pretrained into a folder "
                                              f"and pass --model {TRANSFORMERS_PREFIX}FOLDER")
        raise CounterattackError(
            missing_download_message(f"{TRANSFORMERS_PREFIX}{identifier}", exc, fetch)
            + f" (There is no folder {identifier} here either.)"
        ) from exc
    return Path(snapshot)


def _check_folder(folder: Path, description: str) -> str:
    """The folder's model type, once its config, weights and processor are known to be there and usable."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CounterattackError(
            f"{folder} is not a transformers model folder: it needs config.json (model.save_pretrained(FOLDER)) "
            "beside the weights, the image processor and the tokenizer (processor.save_pretrained(FOLDER))."
        )
    config = read_json_config(config_file)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CounterattackError(
            f"{description} is a {model_type!r} model; transformers: loads CLIP (CLIPModel) and SigLIP (SiglipModel) "
            "models."
        )
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
        if pickled:
            raise CounterattackError(refusal_message(
                description, f"only pickled weights were found ({', '.join(pickled)}); save them with "
                "model.save_pretrained(FOLDER, safe_serialization=True)"))
        raise CounterattackError(
            f"No safetensors weights in {folder}: expected model.safetensors (model.save_pretrained(FOLDER)); "
            "pickled checkpoints (pytorch_model.bin) are never fetched or loaded."
        )
    if not (folder / "preprocessor_config.json").is_file():
        raise CounterattackError(
            f"{folder} has no preprocessor_config.json: save the model's processor beside it "
            "(processor.save_pretrained(FOLDER)), which gives the image size, mean and std."
        )
    return model_type
