"""Published tables as presets of the ordinary evaluation: one row each.

A preset fixes what its table measured (datasets, defenses, attacks and their budget) and runs it
through ``eval``'s own code path; ``reproduce`` then compares the records with the table's numbers
(``compare``). ``tests/test_presets.py`` checks each row against ``data/published.json``, so a
preset and the table it reproduces cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import PAPER_AVERAGE_DATASETS as TTC16
from .options import PIXEL
from .published import FINE_GRAINED10

COLA9 = ("oxford_pets", "flowers102", "fgvc_aircraft", "dtd", "eurosat", "stanford_cars", "food101", "sun397",
         "caltech101")


@dataclass(frozen=True)
class Preset:
    """One published table: what it ran, and where its numbers come from (a source of published.json)."""

    name: str
    source: str
    title: str
    datasets: tuple[str, ...]
    defenses: tuple[str, ...]
    attacks: tuple[str, ...]
    eps: int  # the attacks' budget, in 1/255
    steps: int
    backbones: tuple[str, ...] = ("openai",)  # anything else is a fine-tuned vision tower given by --NAME-checkpoint
    quantize: str | None = None  # how the table's attacks saved their images (QUANTIZE_MODES); None: in float

    @property
    def attack_settings(self) -> dict[str, dict[str, float | int]]:
        """Each attack at the table's budget and steps (library units)."""
        return {attack: {"eps": self.eps * PIXEL, "steps": self.steps} for attack in self.attacks}

    @property
    def checkpoint_flags(self) -> dict[str, str]:
        """The flag that gives each fine-tuned backbone's vision weights."""
        return {backbone: f"--{backbone}-checkpoint" for backbone in self.backbones if backbone != "openai"}

    def describe_attacks(self) -> str:
        names = {"pgd": "PGD", "cw": "CW", "autoattack-paper": "APGD-CE + APGD-DLR"}
        return " and ".join(f"{names.get(a, a)}-{self.steps}" for a in self.attacks) + f" at {self.eps}/255"


PRESETS: dict[str, Preset] = {preset.name: preset for preset in [
    Preset("ttc-table1", "ttc-poster",
           "TTC, Table 1: CLIP ViT-B/32 under PGD-10 at 1/255, no defense, random noise, TTC",
           TTC16, ("none", "rn", "ttc"), ("pgd",), 1, 10),
    Preset("ttc-aft", "ttc-poster", "TTC, Table 2: TTC on adversarially fine-tuned vision towers (TeCoA, FARE), PGD-10 "
           "at 1/255", TTC16, ("none", "ttc"), ("pgd",), 1, 10, backbones=("tecoa", "fare")),
    Preset("doc-table1", "doc-aaai26", "DOC, Table 1 (TTC and the baselines re-run by DOC's authors): PGD-10 at 4/255",
           TTC16, ("none", "anti-adversary", "hd", "ttc", "doc"), ("pgd",), 4, 10),
    Preset("doc-table2", "doc-aaai26", "DOC, Table 2: CW at 4/255", TTC16, ("none", "hd", "ttc", "doc"), ("cw",), 4,
           10),
    Preset("doc-fig4", "doc-aaai26", "DOC, Figure 4: AutoAttack's APGD-CE + APGD-DLR at 4/255, 100 iterations",
           TTC16, ("none", "anti-adversary", "hd", "ttc", "doc"), ("autoattack-paper",), 4, 100),
    Preset("cola-table1", "cola-neurips25", "COLA, Table 1 (COLA, and TTC and the baselines re-run by its authors): "
           "PGD-10 and CW at 1/255 on nine datasets, and its ImageNet numbers (COLA needs --descriptions)",
           (*COLA9, "imagenet"),
           ("none", "rn", "hd", "tte", "ttc", "cola"), ("pgd", "cw"), 1, 10),
    Preset("dbd-table1", "dbd-iclr26", "DBD, main table (averages as a summary quotes them): PGD-100 at 4/255 on the "
           "ten fine-grained datasets, adversarial images saved as PNGs by truncation as DBD's code does (DBD reads "
           "--descriptions when given)", FINE_GRAINED10, ("none", "ttc", "rtpt", "dbd"), ("pgd",), 4, 100,
           quantize="floor"),
]}
