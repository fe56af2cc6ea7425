"""The ``counterattack`` command line: parses, validates, then calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .attacks import ATTACKS
from .commands import run_attack, run_calibrate, run_eval, run_sanity_command, run_sweep, with_group
from .data import DATASETS, PROMPT_SETS, TRANSFORMS, is_present
from .data.prompts import class_prompts
from .defenses import ADAPTIVE_METHODS, DEFENSES, PIXEL_UNIT, options_of
from .errors import CounterattackError
from .flags import REGISTRIES, cli_value, flag, number, option_parser
from .models import DEFAULT_MODEL, DEFAULT_PRETRAINED
from .precision import PRECISIONS
from .report import write_report

PIXELS = number(float, 0, 255)  # a budget or step size in 1/255: at most the whole [0, 1] range
COUNT = number(int, 0)
POSITIVE = number(int, 1)


def _seeds(text: str) -> list[int]:
    parse = number(int, 0, 2**63 - 1)
    seeds = [parse(part) for part in _names(text)]
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds like 0,1,2, got {text!r}")
    return seeds


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _defense_names(text: str) -> list[str]:
    names = _names(text)
    if not names:
        raise argparse.ArgumentTypeError(f"no defense in {text!r}; available: {', '.join(DEFENSES)}")
    return names


def _attack_names(text: str) -> list[str]:
    names = _names(text)
    if not names:
        raise argparse.ArgumentTypeError(f"no attack in {text!r}; available: {', '.join(ATTACKS)}")
    try:
        ATTACKS.check_names(names)
    except CounterattackError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def _add_registered_options(command: argparse.ArgumentParser, kind: str, registry: Mapping[str, type]) -> None:
    """``--NAME-SETTING`` for every option of every registered defense (or attack), from its dataclass."""
    for name, cls in registry.items():
        settings = options_of(cls)
        if not settings:
            continue
        group = command.add_argument_group(f"{kind} {name}", REGISTRIES[kind].summary(name))
        for setting in settings:
            meta = setting.metadata
            unit = f", in {PIXEL_UNIT}" if meta["unit"] == PIXEL_UNIT else ""
            integer = isinstance(setting.default, int) and not isinstance(setting.default, bool)
            group.add_argument(flag(name, setting.name), *meta["aliases"], dest=f"{kind}:{name}:{setting.name}",
                               type=option_parser(setting), default=argparse.SUPPRESS,
                               metavar="{" + ",".join(meta["choices"]) + "}" if meta["choices"] else ("N" if integer else "X"),
                               help=f"{meta['help']}{unit} (default {cli_value(setting.default, meta)})")


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported in one line (and the way to the help) instead of the usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_common_arguments(command: argparse.ArgumentParser, sanity: bool = False, defenses: bool = True) -> None:
    """The options eval, sanity, attack, sweep and calibrate share: model, data, attack, defense (unless not
    ``defenses``) and run."""
    model = command.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, help="open_clip name, local-dir:PATH or hf-hub:org/name")
    model.add_argument("--pretrained", default=DEFAULT_PRETRAINED, help="pretrained tag or weights file (built-in names only)")
    model.add_argument("--vision-checkpoint", type=Path,
                       help="fine-tuned vision weights (e.g. TeCoA, PMG-AFT, FARE) swapped into --model's vision tower")
    model.add_argument("--tau-model", help="encoder for TTC's tau: 'defended', or a model like --model "
                       "(default: the base model when --vision-checkpoint is given, else the defended one)")
    model.add_argument("--tau-pretrained", default=DEFAULT_PRETRAINED, help="pretrained tag for --tau-model")
    model.add_argument("--prompts", default="paper", choices=PROMPT_SETS,
                       help="class names and templates of the benchmark datasets: paper (as the TTC code builds them) "
                       "or openai (curated names, 'This is a photo of a {}.')")
    model.add_argument("--templates", nargs="+", help="prompt templates, '{}' is the class name (overrides --prompts' templates)")
    data = command.add_argument_group("data")
    if sanity:
        data.add_argument("--dataset", default="cifar10", help="a name from `counterattack datasets`, or imagefolder:DIR")
    else:
        data.add_argument("--dataset", action="append",
                          help="a name from `counterattack datasets`, all, or imagefolder:DIR (repeatable; default cifar10)")
    data.add_argument("--data-root", default="data", help="where datasets live or are downloaded to")
    data.add_argument("--limit", type=POSITIVE, default=200 if sanity else None,
                      help="class-balanced subset of N images (first images of each class)")
    data.add_argument("--transform", default="model", choices=TRANSFORMS,
                      help="imagefolder: preprocessing: the model's own eval transform, or the paper's Resize 256, CenterCrop 224")
    data.add_argument("--skip-unreadable", action="store_true",
                      help="skip image files that cannot be decoded (listed in results.json) instead of stopping")
    attack = command.add_argument_group("attack", "Every attack's own options are below (--pgd-steps, --cw-kappa, ...); "
                                        "--eps, --attack-steps and --attack-step-size set them for every attack that has them.")
    attacks = ["pgd", "cw"] if sanity else list(ATTACKS)
    if sanity:
        attack.add_argument("--attack", default="pgd", choices=attacks, help="; ".join(f"{k}: {ATTACKS.summary(k)}" for k in attacks))
    else:
        attack.add_argument("--attack", type=_attack_names, default=None,
                            help="comma-separated (default pgd); several give a worst-case record too. "
                            + "; ".join(f"{k}: {ATTACKS.summary(k)}" for k in attacks))
    attack.add_argument("--eps", type=PIXELS, help="L-inf budget of every attack, in 1/255 (None: each attack's own, 1)")
    attack.add_argument("--attack-steps", type=COUNT,
                        help="iterations of every attack (None: each attack's own, 10 for pgd and cw, 100 for AutoAttack's APGD)")
    attack.add_argument("--attack-step-size", type=PIXELS, help="step size of every attack that has one, in 1/255 (None: each attack's own, 1)")
    attack.add_argument("--threat", default="paper", choices=["paper", "adaptive"],
                        help="paper: crafted against the undefended model; adaptive: through each defense")
    attack.add_argument("--adaptive-method", default="exact", choices=list(ADAPTIVE_METHODS),
                        help="exact: differentiate the unrolled defense; bpda: straight-through")
    attack.add_argument("--eot-samples", type=POSITIVE, default=1, help="adaptive: draws of the defense's randomness per step")
    attack.add_argument("--gate-weight", type=number(float, 0), default=0.0,
                        help="adaptive: weight of the term pushing TTC's tau above its threshold")
    _add_registered_options(command, "attack", {name: ATTACKS[name] for name in attacks})
    if not defenses:
        _add_run_arguments(command, sanity)
        return
    defense = command.add_argument_group("defense")
    if sanity:
        defense.add_argument("--defense", default="none", choices=list(DEFENSES), help="the defense to check")
    else:
        defense.add_argument("--defense", type=_defense_names, default=["none", "ttc"], help=f"comma-separated: {', '.join(DEFENSES)}")
    _add_registered_options(command, "defense", DEFENSES)
    _add_run_arguments(command, sanity)


def _add_run_arguments(command: argparse.ArgumentParser, sanity: bool) -> None:
    run = command.add_argument_group("run")
    run.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                     help="of the attacks' and the defenses' encoder passes: fp32, tf32 (CUDA matrix products), bf16 or "
                     "fp16 autocast, or paper (fp16 autocast for both, as the TTC code ran); gates and the logit head stay fp32")
    run.add_argument("--attack-precision", choices=list(PRECISIONS), help="the attacks' precision (default: --precision)")
    run.add_argument("--defense-precision", choices=list(PRECISIONS), help="the defenses' precision (default: --precision)")
    run.add_argument("--batch-size", type=POSITIVE, default=128)
    run.add_argument("--seed", type=number(int, 0, 2**63 - 1), help="of every random draw (default 0)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run.add_argument("--workers", type=COUNT, default=min(8 if torch.cuda.is_available() else 4, os.cpu_count() or 1),
                     help="data loading processes (more on a GPU machine, to keep the GPU busy)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if not sanity:
        run.add_argument("--dist-timeout", type=number(float, 1), default=60.0,
                         help="torchrun: minutes a process waits for the others at a synchronisation point")


def _add_seeds(command: argparse.ArgumentParser) -> None:
    command.add_argument("--seeds", type=_seeds, metavar="S,S,...",
                         help="repeat the run once per seed (attack starts, defense noise) under --out/seed-S and report "
                         "mean and sample standard deviation (instead of --seed)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="counterattack", description="Test-time Counterattacks for CLIP: defend and evaluate."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ev = commands.add_parser(
        "eval",
        help="attack a zero-shot CLIP and measure defenses",
        description="Craft adversarial images (against the undefended CLIP under --threat paper, through each "
        "defense under --threat adaptive), then apply every defense to the same clean and adversarial images. "
        "Budgets and step sizes are in units of 1/255.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_common_arguments(ev)
    ev.add_argument("--out", type=Path, default=Path("runs/latest"),
                    help="folder for the results; running the same command again resumes there")
    ev.add_argument("--adversarial", type=Path, metavar="ADV",
                    help="evaluate on the adversarial images stored by `counterattack attack --out ADV` instead of attacking "
                    "(its attacks and their settings are the set's; model, data and prompt flags must match it)")
    _add_seeds(ev)
    attack = commands.add_parser(
        "attack",
        help="craft adversarial images once and store them, for eval/sweep/calibrate --adversarial",
        description="Craft the paper protocol's adversarial images (against the undefended CLIP) and store them "
        "losslessly (float32 safetensors shards with image ids, labels and the full configuration). Running the "
        "same command again resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_common_arguments(attack, defenses=False)
    attack.add_argument("--out", type=Path, required=True, metavar="ADV", help="folder for the adversarial set")
    sweep = commands.add_parser(
        "sweep",
        help="evaluate a grid of one defense's settings on one adversarial set, with a Pareto plot",
        description="Every combination of --grid values (any option of the defense; budgets in 1/255) is evaluated on "
        "the same adversarial images: --adversarial ADV, or crafted once into --out/adversarial. Writes one record "
        "per setting (and the undefended model), a table and pareto.png. Resumable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    calibrate = commands.add_parser(
        "calibrate",
        help="a gate's score on clean and adversarial images: histograms, ROC AUC, threshold at a target FPR",
        description="Computes a gated defense's score (TTC's tau, MAC's d, DOC's s, CSR's consistency) on clean and "
        "adversarial images, its ROC AUC as a detector of adversarial images, and the threshold that flags "
        "--target-fpr of the clean images, with the clean and robust accuracy the defense gets there. Resumable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for study in (sweep, calibrate):
        _add_common_arguments(study)
        study.add_argument("--adversarial", type=Path, metavar="ADV", help="a set from `counterattack attack` (default: craft one)")
        study.add_argument("--out", type=Path, required=True, help="folder for the results; the same command again resumes")
    for study in (sweep, calibrate):
        study.set_defaults(defense=["ttc"])
    _add_seeds(sweep)
    sweep.add_argument("--grid", action="append", required=True, metavar="OPTION=V1,V2,...",
                       help="values of one option of the defense (repeatable: the cartesian product is swept)")
    calibrate.add_argument("--target-fpr", type=number(float, 0, 1), default=0.05,
                           help="fraction of clean images the chosen threshold judges attacked")
    sanity = commands.add_parser(
        "sanity",
        help="check an evaluation for gradient masking",
        description="Robust accuracy against eps and against attack steps, and AutoAttack's checks, for one "
        "model, dataset and defense. Exits with 1 when a check fails.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_common_arguments(sanity, sanity=True)
    sanity.add_argument("--out", type=Path, help="also write sanity.json here")
    listing = commands.add_parser("datasets", help="list the benchmark's datasets and whether they are under --data-root")
    listing.add_argument("--data-root", default="data", help="where datasets live or are downloaded to")
    listing.add_argument("--json", action="store_true", help="print JSON: [{name, num_classes, present, ...}]")
    for kind in ("defense", "attack"):
        listing = commands.add_parser(f"{kind}s", help=f"list every {kind} with its options and defaults")
        listing.add_argument("--json", action="store_true", help="print JSON: {name: {summary, options: {flag: default}}}")
    prompts = commands.add_parser("prompts", help="print a benchmark dataset's zero-shot prompts, one a line")
    prompts.add_argument("dataset", help="a name from `counterattack datasets`")
    prompts.add_argument("--prompts", default="paper", choices=PROMPT_SETS, help="the prompt set")
    report = commands.add_parser("report", help="write Markdown/CSV tables and PNG plots of a run folder")
    report.add_argument("folder", type=Path, help="an --out folder of counterattack eval")
    return parser


def list_datasets(args: argparse.Namespace) -> None:
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
        name: {"summary": REGISTRIES[kind].summary(name),
               "options": {flag(name, f.name): cli_value(f.default, f.metadata) for f in options_of(cls)}}
        for name, cls in REGISTRIES[kind].items()
    }
    if args.json:
        print(json.dumps(listing, indent=2))
        return
    for name, entry in listing.items():
        print(f"{name}: {entry['summary']}")
        for flag_name, default in entry["options"].items():
            print(f"    {flag_name} {default}")
    print(f"\nBudgets and step sizes are in 1/255. Use --{kind} NAME,NAME,... with eval.")


def print_prompts(args: argparse.Namespace) -> None:
    if args.dataset not in DATASETS:
        raise CounterattackError(f"Unknown dataset {args.dataset!r}. Available: {', '.join(DATASETS)}.")
    names, templates = class_prompts(args.dataset, args.prompts)
    for name in names:
        print(" | ".join(template.format(name) for template in templates))


def _not_from_open_clip(record: logging.LogRecord) -> bool:
    """open_clip logs download failures on the root logger; our own error message says more."""
    return not (record.levelno >= logging.ERROR and f"{os.sep}open_clip{os.sep}" in record.pathname)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_from_open_clip)
    args = build_parser().parse_args(argv)
    if getattr(args, "seeds", None) and args.seed is not None:
        build_parser().exit(2, f"counterattack {args.command}: error: --seed and --seeds together: give one\n")
    if hasattr(args, "seed"):
        args.seed = 0 if args.seed is None else args.seed
    if isinstance(getattr(args, "attack", ""), (list, type(None))):  # eval, attack, sweep, calibrate
        args.attack_given = args.attack is not None
        args.attack = args.attack or ["pgd"]
    try:
        if args.command == "eval":
            run_eval(args)
        elif args.command == "sweep":
            run_sweep(args)
        elif args.command in ("attack", "calibrate"):
            with_group(args, {"attack": run_attack, "calibrate": run_calibrate}[args.command])
        elif args.command == "sanity":
            return 0 if run_sanity_command(args) else 1
        elif args.command == "datasets":
            list_datasets(args)
        elif args.command == "prompts":
            print_prompts(args)
        elif args.command in ("defenses", "attacks"):
            list_registered(args, args.command[:-1])
        elif args.command == "report":
            for path in write_report(args.folder):
                print(path)
    except CounterattackError as exc:
        print(f"counterattack: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("counterattack: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
