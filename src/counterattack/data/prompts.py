"""Zero-shot prompt sets: the class names and templates whose text embeddings make the classifier.

Two sets exist because published numbers depend on the exact text:

* ``paper`` reproduces the prompts the TTC paper's code builds (Xing et al., CVPR 2025,
  github.com/Sxing2/CLIP-Test-time-Counterattacks): per-dataset templates, and names derived from each
  dataset's *own* raw labels by small rules (one function per rule, in names.py; each dataset's row in the
  registry names its rule and template). Duplicate prompts are part of that protocol (Caltech-101's two
  face classes are both "person"; cutting the year off Stanford Cars leaves 7 identical pairs) and are
  kept as they are.
  R-TPT's datasets (UCF101, ImageNet-A, -V2, -R, -Sketch) are not in the TTC paper: their ``paper`` set takes
  CoOp's and R-TPT's templates ("a photo of a person doing {}." for UCF101, "a photo of a {}." for the ImageNet
  variants), UCF101's CoOp names with spaces for ``_``, and for the variants the TTC code's ImageNet names, with
  OpenAI's name for the one synset the TTC table lacks, so that no class and no image is left out.
* ``openai`` is the curated names of ``classnames.json`` (or, for datasets without a curated list, the
  row's naming of their own labels) with the single template "This is a photo of a {}.".

The raw lists live in ``raw_classes.json`` (sources inside), so the rules run on the same strings the
datasets expose and :func:`check_own_classes` can prove a loaded dataset has the labels the prompts assume.
A dataset with no list there takes its class names from its loaded data (``own_classes``). The rules themselves
live in ``names.py``, below the registry whose rows name them: this module reads the rows, the registry never
reads this module.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import CounterattackError
from .names import (
    COOP_TEMPLATE, IMAGENET_DROPPED_WNID, OPENAI_TEMPLATE, PAPER_TEMPLATE, PCAM_PAPER_PROMPTS, UCF101_TEMPLATE,
    aircraft_name, as_is, caltech101_name, caltech256_name, clean, country211_name, curated_class_names,
    imagenet_paper_name, imagenet_variant_paper_name, openai_imagenet_name, shipped_own_classes, stanford_cars_name,
    tinyimagenet_paper_name, words,
)
from .registry import DATASETS, DatasetInfo

PROMPT_SETS: tuple[str, ...] = ("paper", "openai")

# The naming rules and templates live in names.py (below the registry, which names them); they stay importable
# from here, where the prompt sets are built.
__all__ = [
    "COOP_TEMPLATE", "IMAGENET_DROPPED_WNID", "OPENAI_TEMPLATE", "PAPER_TEMPLATE", "PCAM_PAPER_PROMPTS", "PROMPT_SETS",
    "UCF101_TEMPLATE", "aircraft_name", "as_is", "caltech101_name", "caltech256_name", "check_own_classes",
    "class_prompts", "clean", "country211_name", "curated_class_names", "imagenet_paper_name",
    "imagenet_variant_paper_name", "openai_imagenet_name", "prompt_class_indices", "raw_classes",
    "stanford_cars_name", "tinyimagenet_paper_name", "words",
]


def _row(dataset: str) -> DatasetInfo:
    if dataset not in DATASETS:
        raise CounterattackError(f"Unknown dataset {dataset!r}. Choose one of: {', '.join(DATASETS)}.")
    return DATASETS[dataset]


def _known_prompt_set(prompt_set: str) -> str:
    if prompt_set not in PROMPT_SETS:
        raise CounterattackError(f"Unknown prompt set {prompt_set!r}. Choose one of: {', '.join(PROMPT_SETS)}.")
    return prompt_set


def _ships_classes(dataset: str) -> bool:
    return shipped_own_classes(dataset) is not None


def raw_classes(dataset: str) -> list[str]:
    """The dataset's own class list, in label order, as shipped in ``raw_classes.json``: what the stock
    torchvision class (or ``TinyImageNetVal``) exposes, so that label ``c`` of the loaded data is class ``c`` here.
    A dataset added without a shipped list has none to give before its data is loaded: an error says so."""
    _row(dataset)
    own = shipped_own_classes(dataset)
    if own is None:
        raise CounterattackError(f"No class list of {dataset} ships with the package (raw_classes.json): "
                                 "its classes are known once its data is loaded.")
    return own


def _own_classes(dataset: str, own_classes: Sequence[str] | None) -> list[str]:
    """The raw names the prompts are built from: the shipped list, which a loaded copy is checked against;
    for a dataset without one, the loaded copy's own list."""
    if _ships_classes(dataset) or own_classes is None:
        return raw_classes(dataset)
    return [str(c) for c in own_classes]


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
