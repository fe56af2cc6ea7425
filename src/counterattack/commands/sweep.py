"""``counterattack sweep``: every setting of a grid over one defense's options, on one adversarial set."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..data import short_name
from ..defenses import DEFENSES, NoDefense
from ..distributed import ProcessGroup
from ..errors import CounterattackError
from ..flags import cli_value, library_value, option_parser
from ..identity import evaluation_description
from ..manifest import option_spec
from ..options import options_of
from ..plots import plot_pareto, safe_file_name
from ..records import Results
from .checks import single_defense
from .context import RunContext, open_run, over_seeds, write_results


def parse_grid(texts: Sequence[str], defense: str) -> list[dict[str, Any]]:
    """``["tau_thres=0,0.1", "eps=2,4"]`` -> every combination, as settings in the library's units (cartesian
    product)."""
    by_name = {f.name: option_spec(f) for f in options_of(DEFENSES[defense])}
    if not by_name:
        raise CounterattackError(f"{defense} has no options to sweep.")
    axes: dict[str, list[Any]] = {}
    for text in texts:
        name, sep, values = text.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in by_name:
            raise CounterattackError(f"--grid {text!r}: expected OPTION=V1,V2,... with an option of {defense}: "
                                     f"{', '.join(by_name) or 'none'}.")
        if name in axes:
            raise CounterattackError(f"--grid gives {name} twice.")
        parse, spec = option_parser(by_name[name]), by_name[name]
        try:
            parsed = [parse(v.strip()) for v in values.split(",") if v.strip()]
        except argparse.ArgumentTypeError as exc:
            raise CounterattackError(f"--grid {name}: {exc}.") from None
        if not parsed:
            raise CounterattackError(f"--grid {name}: no values.")
        axes[name] = [library_value(v, spec.unit) for v in parsed]
    return [dict(zip(axes, combination, strict=True)) for combination in itertools.product(*axes.values())]


def cli_setting(defense: str, setting: Mapping[str, Any]) -> dict[str, Any]:
    """A sweep point's values as the command line writes them (budgets in 1/255)."""
    fields_by_name = {f.name: f for f in fields(DEFENSES[defense])}
    return {k: cli_value(v, fields_by_name[k].metadata["unit"]) for k, v in setting.items()}


def setting_label(defense: str, setting: Mapping[str, Any]) -> str:
    """``ttc tau_thres=0.1 eps=2``: a sweep point's name, budgets in 1/255."""
    return " ".join([defense, *(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                for k, v in cli_setting(defense, setting).items())])


def write_sweep(out: Path, results: Results) -> None:
    """A Pareto plot per dataset and attack, then what ``eval`` writes."""
    records, name = results.records, results.config.sweep["defense"]
    plots = []
    pairs = list(dict.fromkeys((r.dataset, r.attack) for r in records))
    for dataset, attack in pairs:
        these = [r for r in records if r.dataset == dataset and r.attack == attack]
        points = [{**r.to_json(), "label": r.defense.removeprefix(f"{name} ")} for r in these if r.defense != "none"]
        baseline = next(r for r in these if r.defense == "none")
        path = out / ("pareto.png" if len(pairs) == 1 else f"pareto-{safe_file_name(short_name(dataset))}-{attack}.png")
        seeds = f", mean of {len(results.config.seeds)} seeds" if results.config.seeds else ""
        plots.append(plot_pareto(points, path, baseline.to_json(),
                                 title=f"{name} on {short_name(dataset)}, {attack} ({baseline.n} images{seeds})"))
    write_results(out, results, also=f"; Pareto plot(s): {', '.join(map(str, plots))}")


def run(config: RunConfig, group: ProcessGroup, device: torch.device) -> Results | None:
    name = single_defense(config)
    grid = parse_grid(config.study.grid, name)
    settings = {setting_label(name, setting): setting for setting in grid}
    if len(settings) != len(grid):
        raise CounterattackError(f"--grid repeats a setting ({len(grid)} combinations, {len(settings)} distinct at "
                                 "6 digits).")
    makers = {"none": lambda base: NoDefense(),
              **{label: (lambda base, setting=setting: replace(base, **setting))
                 for label, setting in settings.items()}}
    context = open_run(config, group, device, defenses=makers)

    def sweep(context: RunContext) -> Results | None:
        context.adversarial_set()
        config_ = replace(evaluation_description(context, context.defenses, context.attacks),
                          sweep={"defense": name, "grid": list(config.study.grid)})
        evaluation = context.evaluate_into(context.config.out, context.defenses, context.attacks, config_)
        if evaluation is None:
            return None
        records = [replace(r, setting=cli_setting(name, settings.get(r.defense, {}))) for r in evaluation.records]
        results = context.results(config_, records)
        write_sweep(context.config.out, results)
        return results

    return over_seeds(context, sweep, write_sweep)
