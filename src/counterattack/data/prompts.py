"""Zero-shot prompt sets: the class names and templates whose text embeddings make the classifier.

Two sets exist because published numbers depend on the exact text:

* ``paper`` reproduces the prompts the TTC paper's code builds (Xing et al., CVPR 2025,
  github.com/Sxing2/CLIP-Test-time-Counterattacks): per-dataset templates, and names derived from each
  dataset's *own* raw labels by small rules (one function per rule below), quirks included. Duplicate
  prompts are part of that protocol (Caltech-101's two face classes are both "person"; cutting the year
  off Stanford Cars leaves 7 identical pairs) and are kept as they are.
* ``openai`` is the curated names of ``classnames.json`` (or, for datasets without a curated list, the
  registry's tidied own labels) with the single template "This is a photo of a {}.".

The raw lists live in ``raw_classes.json`` (sources inside), so the rules run on the same strings the
datasets expose and :func:`check_own_classes` can prove a loaded dataset has the labels the prompts assume.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cache
from importlib.resources import files

from ..errors import CounterattackError
from .registry import DATASETS, curated_class_names

PROMPT_SETS: tuple[str, ...] = ("paper", "openai")

IMAGENET_DROPPED_WNID = "n03710637"
"""The ILSVRC-2012 synset (maillot) missing from the TTC authors' refined ImageNet names: the paper's
ImageNet has 999 classes, so this class is left out of the ``paper`` prompts."""

OPENAI_TEMPLATE = "This is a photo of a {}."
PCAM_PAPER_PROMPTS = [
    "This is a photo of a healthy lymph node tissue.",
    "This is a photo of a lymph node tumor tissue.",
]

# Datasets torchvision gives no class names for: their shipped list can only be checked by length.
_COUNT_ONLY = frozenset({"flowers102"})


@cache
def _shipped() -> dict:
    text = files("counterattack.data").joinpath("raw_classes.json").read_text(encoding="utf-8")
    return json.loads(text)


def _known_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise CounterattackError(f"Unknown dataset {dataset!r}. Choose one of: {', '.join(DATASETS)}.")
    return dataset


def _known_prompt_set(prompt_set: str) -> str:
    if prompt_set not in PROMPT_SETS:
        raise CounterattackError(f"Unknown prompt set {prompt_set!r}. Choose one of: {', '.join(PROMPT_SETS)}.")
    return prompt_set


def raw_classes(dataset: str) -> list[str]:
    """The dataset's own class list, in label order, as shipped in ``raw_classes.json``: what the stock
    torchvision class (or ``TinyImageNetVal``) exposes, so that label ``c`` of the loaded data is class ``c`` here."""
    return list(_shipped()["own_classes"][_known_dataset(dataset)])


# --- The paper's naming rules: one small function per rule, applied to raw names. ---------------------

def as_is(name: str) -> str:
    """CIFAR, STL-10 and SUN397 names go into the template untouched (underscores and slashes included)."""
    return name


def clean(name: str) -> str:
    """The authors' usual tidying: lower-case, then ``_`` and ``-`` become spaces (nothing is stripped)."""
    return name.lower().replace("_", " ").replace("-", " ")


def caltech101_name(category: str) -> str:
    """Caltech-101 folder names as they are, except both face classes (``Faces``, ``Faces_easy``) become "person"."""
    return "person" if category in ("Faces", "Faces_easy") else category


def caltech256_name(folder: str) -> str:
    """Caltech-256 folders lose their ``NNN.`` prefix and a ``-101`` suffix, then are cleaned and stripped:
    ``145.motorbikes-101`` -> ``motorbikes``."""
    number, _, rest = folder.partition(".")
    name = rest if number.isdigit() and rest else folder
    return clean(name.removesuffix("-101")).strip()


def aircraft_name(variant: str) -> str:
    """FGVC-Aircraft variants: Boeing's bare numbers (``707-320``) get their maker in front; then lower-case
    with ``_`` as spaces, hyphens kept: ``boeing 707-320``."""
    if variant.startswith("7"):
        variant = "Boeing " + variant
    return variant.lower().replace("_", " ")


def stanford_cars_name(name: str) -> str:
    """Stanford Cars names lose their last 5 characters (" 2012", the year), then are cleaned; this merges
    7 pairs of classes that differ only in the year."""
    return clean(name[:-5])


def country211_name(code: str) -> str:
    """Country211's alpha-2 folder code as its ISO 3166 short name (pycountry's, shipped as data), with ``_`` and
    ``-`` as spaces and the case kept: ``XK`` -> ``Kosovo``, ``TL`` -> ``Timor Leste``."""
    name = _shipped()["country_names"][code]
    return name.replace("_", " ").replace("-", " ")


def imagenet_paper_name(wnid: str) -> str:
    """The TTC authors' refined ImageNet name of a WordNet id (none for :data:`IMAGENET_DROPPED_WNID`)."""
    return _shipped()["paper_names"]["imagenet"][wnid]


def tinyimagenet_paper_name(wnid: str) -> str:
    """The TTC authors' refined Tiny ImageNet name of a WordNet id."""
    return _shipped()["paper_names"]["tinyimagenet"][wnid]


PAPER_RULES: dict[str, tuple[Callable[[str], str], str]] = {
    "cifar10": (as_is, "This is a photo of a {}."),
    "cifar100": (as_is, "This is a photo of a {}."),
    "stl10": (as_is, "This is a photo of a {}."),
    "imagenet": (imagenet_paper_name, "This is a photo of a {}."),
    "tinyimagenet": (tinyimagenet_paper_name, "This is a photo of a {}."),
    "sun397": (as_is, "This is a photo of a {}."),
    "caltech101": (caltech101_name, "This is a photo of a {}."),
    "caltech256": (caltech256_name, "A photo of a {}."),
    "eurosat": (clean, "A centered satellite photo of {}."),
    "dtd": (clean, "A surface with a {} texture."),
    "fgvc_aircraft": (aircraft_name, "A photo of a {}, a type of aircraft."),
    "flowers102": (clean, "A photo of a {}, a type of flower."),
    "food101": (clean, "A photo of {}, a type of food."),
    "oxford_pets": (clean, "A photo of a {}, a type of pet."),
    "stanford_cars": (stanford_cars_name, "A photo of a {}."),
    "country211": (country211_name, "A photo I took in {}."),
}
"""Per dataset: the rule turning a raw class name into the paper's name, and the paper's template.
PCAM is absent: its two prompts are whole sentences (:data:`PCAM_PAPER_PROMPTS`)."""


def prompt_class_indices(dataset: str, prompt_set: str = "paper") -> list[int]:
    """For each class of the prompt set, its index in :func:`raw_classes`: every class, except that the
    paper's ImageNet leaves out :data:`IMAGENET_DROPPED_WNID` (its images have no prompt to be scored against)."""
    own = raw_classes(dataset)
    if _known_prompt_set(prompt_set) == "paper" and dataset == "imagenet":
        return [i for i, wnid in enumerate(own) if wnid != IMAGENET_DROPPED_WNID]
    return list(range(len(own)))


def _openai_names(dataset: str) -> list[str]:
    curated = curated_class_names().get(dataset)
    if curated is not None:
        return list(curated)
    return [DATASETS[dataset].clean_name(c) for c in raw_classes(dataset)]


def class_prompts(dataset: str, prompt_set: str = "paper") -> tuple[list[str], list[str]]:
    """``(class names, templates)``: the zero-shot text of class ``c`` is ``template.format(names[c])`` for each
    template. Names follow :func:`prompt_class_indices` (ImageNet under ``paper``: 999, in WordNet id order);
    PCAM under ``paper`` has the two whole prompts as names and ``["{}"]`` as template."""
    own = raw_classes(dataset)
    if _known_prompt_set(prompt_set) == "openai":
        return _openai_names(dataset), [OPENAI_TEMPLATE]
    if dataset == "pcam":
        return list(PCAM_PAPER_PROMPTS), ["{}"]
    rule, template = PAPER_RULES[dataset]
    return [rule(own[i]) for i in prompt_class_indices(dataset, prompt_set)], [template]


def check_own_classes(dataset: str, own: Sequence[str]) -> None:
    """Refuse a loaded dataset whose own class list is not the shipped one (count and order), since the prompts
    are matched to labels by position: a reordered or partial copy would silently score images against the wrong
    text. Flowers-102 (torchvision reads no names from its files) is checked by count only."""
    expected = raw_classes(dataset)
    found = [str(c) for c in own]
    if dataset in _COUNT_ONLY:
        if len(found) != len(expected):
            raise CounterattackError(
                f"{dataset} has {len(found)} classes, expected {len(expected)}: is it the full dataset?")
        return
    if found == expected:
        return
    index = next((i for i, (e, f) in enumerate(zip(expected, found)) if e != f), min(len(expected), len(found)))
    expected_at = repr(expected[index]) if index < len(expected) else "no class"
    found_at = repr(found[index]) if index < len(found) else "no class"
    raise CounterattackError(
        f"{dataset}'s own class list does not match the one the prompts were built for (raw_classes.json): "
        f"{len(found)} classes, expected {len(expected)}; first difference at index {index}: "
        f"expected {expected_at}, found {found_at}."
    )
