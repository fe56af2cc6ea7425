"""``counterattack attack``: craft the paper protocol's adversarial images once and store them."""

from __future__ import annotations

import torch

from ..adversarial import AdversarialSet
from ..config import RunConfig
from ..distributed import ProcessGroup
from ..errors import CounterattackError
from .context import open_run


def run(config: RunConfig, group: ProcessGroup, device: torch.device) -> AdversarialSet:
    if config.attack.threat != "paper":
        raise CounterattackError("counterattack attack stores the paper protocol's images (crafted against the "
                                 "undefended model); adaptive attacks go through each defense: use `counterattack eval "
                                 "--threat adaptive`.")
    context = open_run(config, group, device)
    adversarial = context.craft_into(config.out, context.attacks)
    if group.is_main:
        count = sum(len(ids) for ids in context.expected().values())
        print(f"{count} images x {len(context.attacks)} attack(s) stored in {config.out}; evaluate them with "
              f"`counterattack eval --adversarial {config.out} ...` (same model and data flags).")
    return adversarial
