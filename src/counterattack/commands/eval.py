"""``counterattack eval``: attack, then apply every defense to the same clean and adversarial images."""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..distributed import ProcessGroup
from ..identity import evaluation_description
from ..records import Results
from .context import RunContext, open_run, over_seeds, write_results


def evaluate(context: RunContext) -> Results | None:
    """One run into ``--out``, resuming what is there: the results on the main process, None on the others."""
    config = evaluation_description(context, context.defenses, context.attacks)
    evaluation = context.evaluate_into(context.config.out, context.defenses, context.attacks, config)
    if evaluation is None:
        return None
    results = context.results(config, evaluation.records)
    write_results(context.config.out, results)
    return results


def run(config: RunConfig, group: ProcessGroup, device: torch.device) -> Results | None:
    return over_seeds(open_run(config, group, device), evaluate, write_results)
