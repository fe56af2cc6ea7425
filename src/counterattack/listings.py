"""The listing commands: ``counterattack datasets``, ``defenses``, ``attacks`` and ``prompts``, which load no model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import CounterattackError
from .flags import cli_value, entries
from .options import flag


def list_datasets(args: argparse.Namespace) -> None:
    from .data import DATASETS, is_present

    rows = [
        {"name": info.name, "num_classes": info.num_classes, "test_size": info.test_size, "split": info.split,
         "present": is_present(info, Path(args.data_root)), "downloadable": info.downloadable}
        for info in DATASETS.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'dataset':15} {'classes':>7} {'images':>7}  {'split':20} {'present':8} download")
    for r in rows:
        print(f"{r['name']:15} {r['num_classes']:>7} {r['test_size']:>7}  {r['split']:20} "
              f"{'yes' if r['present'] else 'no':8} {'automatic' if r['downloadable'] else 'manual (see README)'}")
    print(f"{'imagefolder:DIR':15} {'folders':>7} {'files':>7}  {'all':20} {'-':8} yours")
    print(f"\n(under --data-root {args.data_root})")


def list_registered(args: argparse.Namespace, kind: str) -> None:
    """``counterattack defenses`` and ``counterattack attacks``: every one with its flags and defaults."""
    listing = {
        name: {"summary": entry.summary,
               "options": {flag(name, spec.name): cli_value(spec.default, spec.unit) for spec in entry.options},
               **({"paper_precision": entry.paper_precision} if kind == "defense" else {})}
        for name, entry in entries(kind).items()
    }
    if args.json:
        print(json.dumps(listing, indent=2))
        return
    for name, entry in listing.items():
        print(f"{name}: {entry['summary']}")
        if "paper_precision" in entry:
            print(f"    (--precision paper: {entry['paper_precision']}, as its authors' code)")
        for flag_name, value in entry["options"].items():
            print(f"    {flag_name} {value}")
    print(f"\nBudgets and step sizes are in 1/255. Use --{kind} NAME,NAME,... with eval.")


def print_prompts(args: argparse.Namespace) -> None:
    from .data import DATASETS
    from .data.prompts import class_prompts

    if args.dataset not in DATASETS:
        raise CounterattackError(f"Unknown dataset {args.dataset!r}. Available: {', '.join(DATASETS)}.")
    names, templates = class_prompts(args.dataset, args.prompts)
    for name in names:
        print(" | ".join(template.format(name) for template in templates))
