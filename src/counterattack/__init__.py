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
        found = (_re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), _re.M)
                 if pyproject.is_file() else None)
        return f"{found.group(1)} (source tree)" if found else "unknown (no package metadata)"


__version__ = _package_version()

# The public API, by the module that defines each name. Imported on first use (PEP 562): the command line's
# parser, and ``counterattack --help``, must not pay for importing torch and open_clip.
_PUBLIC = {
    "attacks": ("ATTACKS", "CW", "PGD", "Attack", "AutoAttack", "AutoAttackPaper", "build_attack", "build_attacks",
                "register_attack"),
    "adaptive": ("AdaptiveAttack",),
    "backbones": ("Backbone", "PromptTunable", "SCHEMES", "load_clip"),
    "classifier": ("DEFAULT_TEMPLATES", "EncoderPasses", "ImageEncoder", "ZeroShotClassifier", "count_encoder_passes"),
    "inputs": ("ArgumentKindError", "DtypeError", "InputError", "LabelError", "PixelRangeError", "RandomnessError",
               "ShapeError", "check_labels", "check_pixels", "check_randomness"),
    "data": ("EvalDataset", "balanced_subset", "load_dataset"),
    "defended_model": ("DefendedModel", "defended"),
    "defenses": ("AGC", "CLIPure", "COLA", "CSR", "DBD", "DEFENSES", "DOC", "ET3", "MAC", "RTPT", "TTC",
                 "AntiAdversary", "Defense", "DefenseOutput", "Gate",
                 "HedgeDefense", "NoDefense", "RandomNoise", "TransformEnsemble", "TTCResult", "build_defense",
                 "build_defenses", "register_defense"),
    "errors": ("CounterattackError",),
    "evaluate": ("RunSettings", "evaluate_dataset"),
    "summary": ("summarize",),
    "hf_transformers": ("TransformersCLIP", "TransformersTokenizer"),
    "loading": ("LoadedCLIP",),
    "models": ("load_vision_checkpoint", "read_state_dict"),
    "randomness": ("ImageRandomness",),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}
# A name defined here on first use must not be a submodule's name too: importing that submodule would set the
# package's attribute to the module, and the name would then mean the module.
assert not set(_HOME) & set(_PUBLIC), "a public name is also a module's name"

__all__ = ["__version__", *_HOME]


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'counterattack' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
