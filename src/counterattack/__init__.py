"""clip-counterattack: Test-time Counterattacks (TTC) for CLIP zero-shot classifiers."""

from .attacks import ATTACKS, PGD, AdaptiveAttack, Attack, AutoAttack, build_attack
from .classifier import DEFAULT_TEMPLATES, ImageEncoder, ZeroShotClassifier
from .data import EvalDataset, balanced_subset, load_dataset
from .defenses import (
    DEFENSES, TTC, AntiAdversary, Defense, DefenseOptions, DefenseOutput, HedgeDefense, NoDefense, RandomNoise,
    TransformEnsemble, TTCResult, build_defenses,
)
from .errors import CounterattackError
from .evaluate import RunSettings, evaluate_dataset, summarize
from .models import LoadedCLIP, load_clip, load_vision_checkpoint, read_state_dict
from .randomness import ImageRandomness

__all__ = [
    "AdaptiveAttack", "AutoAttack", "AntiAdversary", "HedgeDefense", "RandomNoise", "TransformEnsemble", "load_vision_checkpoint", "read_state_dict",
    "ATTACKS", "Attack", "CounterattackError", "DEFAULT_TEMPLATES", "DEFENSES", "Defense", "DefenseOptions",
    "DefenseOutput", "EvalDataset", "ImageEncoder", "ImageRandomness", "LoadedCLIP", "NoDefense", "PGD",
    "RunSettings", "TTC", "TTCResult", "ZeroShotClassifier", "balanced_subset", "build_attack",
    "build_defenses", "evaluate_dataset", "load_clip", "load_dataset", "summarize",
]
