"""clip-counterattack: Test-time Counterattacks (TTC) for CLIP zero-shot classifiers."""

import re as _re
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version
from pathlib import Path as _Path


def _package_version() -> str:
    """The installed version; from a source tree without installed metadata, pyproject.toml's."""
    try:
        return _version("clip-counterattack")
    except _PackageNotFoundError:
        pyproject = _Path(__file__).resolve().parents[2] / "pyproject.toml"
        found = _re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), _re.M) if pyproject.is_file() else None
        return f"{found.group(1)} (source tree)" if found else "unknown (no package metadata)"


__version__ = _package_version()

from .attacks import (
    ATTACKS, CW, PGD, Attack, AutoAttack, AutoAttackPaper, build_attack, build_attacks, register_attack,
)
from .adaptive import AdaptiveAttack
from .classifier import DEFAULT_TEMPLATES, EncoderPasses, ImageEncoder, ZeroShotClassifier, count_encoder_passes
from .inputs import (
    DtypeError, InputError, LabelError, PixelRangeError, RandomnessError, ShapeError, check_labels, check_pixels,
    check_randomness,
)
from .data import EvalDataset, balanced_subset, load_dataset
from .defended import DefendedModel, defended
from .defenses import (
    CSR, DEFENSES, DOC, MAC, RTPT, TTC, AntiAdversary, Defense, DefenseOutput, Gate, HedgeDefense, NoDefense, RandomNoise,
    TransformEnsemble, TTCResult, build_defense, build_defenses, register_defense,
)
from .errors import CounterattackError
from .evaluate import RunSettings, evaluate_dataset, summarize
from .hf_transformers import TransformersCLIP, TransformersTokenizer
from .models import LoadedCLIP, load_clip, load_vision_checkpoint, read_state_dict
from .randomness import ImageRandomness

__all__ = [
    "__version__", "EncoderPasses", "PixelRangeError", "check_pixels", "count_encoder_passes", "InputError", "ShapeError",
    "DtypeError", "LabelError", "RandomnessError", "check_labels", "check_randomness",
    "AdaptiveAttack", "AutoAttack", "AutoAttackPaper", "CW", "build_attacks", "register_attack", "AntiAdversary", "HedgeDefense", "RandomNoise", "TransformEnsemble", "load_vision_checkpoint", "read_state_dict",
    "ATTACKS", "Attack", "CounterattackError", "DEFAULT_TEMPLATES", "DEFENSES", "Defense", "build_defense", "register_defense",
    "DefenseOutput", "EvalDataset", "ImageEncoder", "ImageRandomness", "LoadedCLIP", "NoDefense", "PGD",
    "RunSettings", "TTC", "TTCResult", "ZeroShotClassifier", "balanced_subset", "build_attack",
    "build_defenses", "evaluate_dataset", "load_clip", "load_dataset", "summarize",
    "DefendedModel", "defended", "TransformersCLIP", "TransformersTokenizer", "CSR", "DOC", "MAC", "RTPT", "Gate",
]
