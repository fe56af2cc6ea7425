"""Zero-shot prompt sets: the class names and templates whose text embeddings make the classifier.

Two sets exist because published numbers depend on the exact text:

* ``paper`` reproduces the prompts the TTC paper's code builds (Xing et al., CVPR 2025,
  github.com/Sxing2/CLIP-Test-time-Counterattacks): per-dataset templates, and names derived from each
  dataset's *own* raw labels by small rules (one function per rule below; each dataset's row in the
  registry names its rule and template). Duplicate prompts are part of that protocol (Caltech-101's two
  face classes are both "person"; cutting the year off Stanford Cars leaves 7 identical pairs) and are
  kept as they are.
* ``openai`` is the curated names of ``classnames.json`` (or, for datasets without a curated list, the
  row's naming of their own labels) with the single template "This is a photo of a {}.".

The raw lists live in ``raw_classes.json`` (sources inside), so the rules run on the same strings the
datasets expose and :func:`check_own_classes` can prove a loaded dataset has the labels the prompts assume.
A dataset with no list there takes its class names from its loaded data (``own_classes``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING

from ..errors import CounterattackError

if TYPE_CHECKING:
    from .registry import DatasetInfo

PROMPT_SETS: tuple[str, ...] = ("paper", "openai")

IMAGENET_DROPPED_WNID = "n03710637"
"""The ILSVRC-2012 synset (maillot) missing from the TTC authors' refined ImageNet names: the paper's
ImageNet has 999 classes, so this class is left out of the ``paper`` prompts."""

OPENAI_TEMPLATE = "This is a photo of a {}."
PAPER_TEMPLATE = "This is a photo of a {}."
"""The TTC code's template where a dataset has none of its own."""
PCAM_PAPER_PROMPTS = [
    "This is a photo of a healthy lymph node tissue.",
    "This is a photo of a lymph node tumor tissue.",
]


@cache
def _shipped() -> dict:
    text = files("counterattack.data").joinpath("raw_classes.json").read_text(encoding="utf-8")
    return json.loads(text)


@cache
def curated_class_names() -> dict[str, list[str]]:
    """The ``openai`` names of ``classnames.json`` per dataset (its ``_`` keys are notes on their sources)."""
    text = files("counterattack.data").joinpath("classnames.json").read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def _row(dataset: str) -> DatasetInfo:
    from .registry import DATASETS  # the rows name this module's rules, so the registry imports it first

    if dataset not in DATASETS:
        raise CounterattackError(f"Unknown dataset {dataset!r}. Choose one of: {', '.join(DATASETS)}.")
    return DATASETS[dataset]


def _known_prompt_set(prompt_set: str) -> str:
    if prompt_set not in PROMPT_SETS:
        raise CounterattackError(f"Unknown prompt set {prompt_set!r}. Choose one of: {', '.join(PROMPT_SETS)}.")
    return prompt_set


def _ships_classes(dataset: str) -> bool:
    return dataset in _shipped()["own_classes"]


def raw_classes(dataset: str) -> list[str]:
    """The dataset's own class list, in label order, as shipped in ``raw_classes.json``: what the stock
    torchvision class (or ``TinyImageNetVal``) exposes, so that label ``c`` of the loaded data is class ``c`` here.
    A dataset added without a shipped list has none to give before its data is loaded: an error says so."""
    _row(dataset)
    if not _ships_classes(dataset):
        raise CounterattackError(f"No class list of {dataset} ships with the package (raw_classes.json): "
                                 "its classes are known once its data is loaded.")
    return list(_shipped()["own_classes"][dataset])


def _own_classes(dataset: str, own_classes: Sequence[str] | None) -> list[str]:
    """The raw names the prompts are built from: the shipped list, which a loaded copy is checked against;
    for a dataset without one, the loaded copy's own list."""
    if _ships_classes(dataset) or own_classes is None:
        return raw_classes(dataset)
    return [str(c) for c in own_classes]


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


def prompt_class_indices(dataset: str, prompt_set: str = "paper",
                         own_classes: Sequence[str] | None = None) -> list[int]:
    """For each class of the prompt set, its index in the own class list (:func:`raw_classes`, or ``own_classes``
    where none is shipped): every class, except those the paper has no prompt for (the row's ``paper_dropped``:
    the paper's ImageNet leaves out :data:`IMAGENET_DROPPED_WNID`), whose images could not be scored."""
    row, prompt_set = _row(dataset), _known_prompt_set(prompt_set)
    own = _own_classes(dataset, own_classes)
    if prompt_set == "paper" and row.paper_dropped:
        return [i for i, name in enumerate(own) if name not in row.paper_dropped]
    return list(range(len(own)))


def class_prompts(dataset: str, prompt_set: str = "paper",
                  own_classes: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """``(class names, templates)``: the zero-shot text of class ``c`` is ``template.format(names[c])`` for each
    template. Names follow :func:`prompt_class_indices` (ImageNet under ``paper``: 999, in WordNet id order);
    PCAM under ``paper`` has the two whole prompts as names and ``["{}"]`` as template. ``own_classes``, the
    loaded data's class list, names the classes of a dataset that ships no list; without it such a dataset's
    prompts are unknown (a :class:`CounterattackError` says so)."""
    row, prompt_set = _row(dataset), _known_prompt_set(prompt_set)
    curated = curated_class_names().get(dataset)
    if prompt_set == "openai" and curated is not None:
        return list(curated), [OPENAI_TEMPLATE]
    if prompt_set == "paper" and row.paper_prompts:
        return list(row.paper_prompts), ["{}"]
    own = _own_classes(dataset, own_classes)
    if prompt_set == "openai":
        return [row.openai_name(c) for c in own], [OPENAI_TEMPLATE]
    return [row.paper_rule(own[i]) for i in prompt_class_indices(dataset, prompt_set, own)], [row.paper_template]


def check_own_classes(dataset: str, own: Sequence[str]) -> None:
    """Refuse a loaded dataset whose own class list is not the shipped one (count and order), since the prompts
    are matched to labels by position: a reordered or partial copy would silently score images against the wrong
    text. Where the files name no class (Flowers-102, PCAM) only the count can be checked; where nothing is
    shipped, the loaded list is the one the prompts are built from, and there is nothing to compare."""
    row = _row(dataset)
    if not _ships_classes(dataset):
        return
    expected = raw_classes(dataset)
    found = [str(c) for c in own]
    if not row.names_its_classes:
        if len(found) != len(expected):
            raise CounterattackError(
                f"{dataset} has {len(found)} classes, expected {len(expected)}: is it the full dataset?")
        return
    if found == expected:
        return
    # The lists may differ in length: the first difference may lie past the shorter one's end.
    index = next((i for i, (e, f) in enumerate(zip(expected, found, strict=False)) if e != f),
                 min(len(expected), len(found)))
    expected_at = repr(expected[index]) if index < len(expected) else "no class"
    found_at = repr(found[index]) if index < len(found) else "no class"
    raise CounterattackError(
        f"{dataset}'s own class list does not match the one the prompts were built for (raw_classes.json): "
        f"{len(found)} classes, expected {len(expected)}; first difference at index {index}: "
        f"expected {expected_at}, found {found_at}."
    )
