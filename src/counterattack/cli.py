"""The ``counterattack`` command line: parses, validates, then calls the library."""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import math
import os
import sys
from dataclasses import Field, dataclass, replace
from dataclasses import fields as dataclass_fields
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from . import __version__, distributed
from .attacks import ATTACKS, PGD, PIXEL, AdaptiveAttack, Attack, AutoAttack, build_attacks
from .attacks.autoattack import import_pyautoattack
from .classifier import ImageEncoder, ZeroShotClassifier
from .data import (
    DATASETS, PROMPT_SETS, TRANSFORMS, EvalDataset, balanced_subset, check_manual_datasets, dataset_names, find_unreadable,
    is_present, load_dataset,
)
from .data.prompts import class_prompts
from .defenses import (
    ADAPTIVE_METHODS, DEFENSES, PIXEL_UNIT, Defense, NoDefense, build_defenses, check_defense_names, options_of,
)
from .errors import CounterattackError
from .adversarial import AdversarialSet
from .evaluate import RunSettings, average_records, combine_seeds, craft_dataset, evaluate_dataset, summarize
from .models import DEFAULT_MODEL, DEFAULT_PRETRAINED, LoadedCLIP, load_clip, load_vision_checkpoint
from .calibration import flagged_fraction, plot_pareto, plot_score_histograms, roc_auc, threshold_at_fpr
from .data import short_name
from .report import _file_name, format_table, paper_tables, write_report
from .precision import PRECISIONS
from .results import ResultsStore, write_json_atomically
from .sanity import format_report, run_sanity



def _number(kind: type, low: float | None = None, high: float | None = None) -> Callable[[str], float | int]:
    """An argparse type: a finite ``kind`` (int or float) within [low, high]."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value

    return parse


PIXELS = _number(float, 0, 255)  # a budget or step size in 1/255: at most the whole [0, 1] range
COUNT = _number(int, 0)
POSITIVE = _number(int, 1)


def _seeds(text: str) -> list[int]:
    parse = _number(int, 0, 2**63 - 1)
    seeds = [parse(part) for part in _names(text)]
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds like 0,1,2, got {text!r}")
    return seeds


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _attack_names(text: str) -> list[str]:
    names = _names(text)
    if not names:
        raise argparse.ArgumentTypeError(f"no attack in {text!r}; available: {', '.join(ATTACKS)}")
    try:
        ATTACKS.check_names(names)
    except CounterattackError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def _cli_value(value: Any, meta: Mapping[str, Any]) -> Any:
    """An option's value as the command line writes it (budgets in 1/255)."""
    return round(value * 255, 6) if meta.get("unit") == PIXEL_UNIT and isinstance(value, float) else value


def _flag(name: str, setting: str) -> str:
    return f"--{name}-{setting.replace('_', '-')}"


def _option_parser(setting: Field) -> Callable[[str], Any]:
    """How the command line reads one option: its choices, or a number within its bounds (in 1/255 for budgets)."""
    meta = setting.metadata
    if meta["choices"] is not None:
        def choice(text: str) -> str:
            if text not in meta["choices"]:
                raise argparse.ArgumentTypeError(f"must be one of {', '.join(meta['choices'])}, got {text!r}")
            return text
        return choice
    high = None if meta["high"] is None else _cli_value(float(meta["high"]), meta)
    integer = isinstance(setting.default, int) and not isinstance(setting.default, bool)
    return _number(int if integer else float, meta["low"], high)


def _add_registered_options(command: argparse.ArgumentParser, kind: str, registry: Mapping[str, type]) -> None:
    """``--NAME-SETTING`` for every option of every registered defense (or attack), from its dataclass."""
    for name, cls in registry.items():
        settings = options_of(cls)
        if not settings:
            continue
        group = command.add_argument_group(f"{kind} {name}", _REGISTRIES[kind].summary(name))
        for setting in settings:
            meta = setting.metadata
            unit = f", in {PIXEL_UNIT}" if meta["unit"] == PIXEL_UNIT else ""
            integer = isinstance(setting.default, int) and not isinstance(setting.default, bool)
            group.add_argument(_flag(name, setting.name), *meta["aliases"], dest=f"{kind}:{name}:{setting.name}",
                               type=_option_parser(setting), default=argparse.SUPPRESS,
                               metavar="{" + ",".join(meta["choices"]) + "}" if meta["choices"] else ("N" if integer else "X"),
                               help=f"{meta['help']}{unit} (default {_cli_value(setting.default, meta)})")


_REGISTRIES = {"defense": DEFENSES, "attack": ATTACKS}


def _registered_settings(args: argparse.Namespace, kind: str, name: str) -> dict[str, Any]:
    """The options of ``name`` given on the command line, in the library's units."""
    cls = _REGISTRIES[kind][name]
    given = {}
    for setting in options_of(cls):
        value = getattr(args, f"{kind}:{name}:{setting.name}", None)
        if value is not None:
            given[setting.name] = value * PIXEL if setting.metadata["unit"] == PIXEL_UNIT else value
    return given


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
    attack.add_argument("--gate-weight", type=_number(float, 0), default=0.0,
                        help="adaptive: weight of the term pushing TTC's tau above its threshold")
    _add_registered_options(command, "attack", {name: ATTACKS[name] for name in attacks})
    if not defenses:
        _add_run_arguments(command, sanity)
        return
    defense = command.add_argument_group("defense")
    if sanity:
        defense.add_argument("--defense", default="none", choices=list(DEFENSES), help="the defense to check")
    else:
        defense.add_argument("--defense", type=_names, default=["none", "ttc"], help=f"comma-separated: {', '.join(DEFENSES)}")
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
    run.add_argument("--seed", type=_number(int, 0, 2**63 - 1), default=0)
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run.add_argument("--workers", type=COUNT, default=min(8 if torch.cuda.is_available() else 4, os.cpu_count() or 1),
                     help="data loading processes (more on a GPU machine, to keep the GPU busy)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if not sanity:
        run.add_argument("--dist-timeout", type=_number(float, 1), default=60.0,
                         help="torchrun: minutes a process waits for the others at a synchronisation point")


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
    ev.add_argument("--seeds", type=_seeds, metavar="S,S,...",
                    help="repeat the run once per seed (attack starts, defense noise) under --out/seed-S and report "
                    "mean and sample standard deviation")
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
    sweep.add_argument("--grid", action="append", required=True, metavar="OPTION=V1,V2,...",
                       help="values of one option of the defense (repeatable: the cartesian product is swept)")
    calibrate.add_argument("--target-fpr", type=_number(float, 0, 1), default=0.05,
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


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise CounterattackError("--device cuda was asked for, but PyTorch sees no CUDA GPU.")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _versions() -> dict[str, str]:
    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return {"clip-counterattack": __version__, **{pkg: installed(pkg) for pkg in ("torch", "torchvision", "open_clip_torch")}}


def _tau_encoder(args: argparse.Namespace, clip: LoadedCLIP, device: torch.device) -> tuple[ImageEncoder | None, str]:
    """Swap in the vision checkpoint, if any; return TTC's tau encoder (None: the defended one) and its name."""
    base = None
    if args.vision_checkpoint:
        base = ImageEncoder.from_clip(clip)
        base.visual = copy.deepcopy(base.visual)  # the original weights, before the swap
        load_vision_checkpoint(clip, args.vision_checkpoint)
    if args.tau_model == "defended" or (args.tau_model is None and base is None):
        return None, "defended"
    if args.tau_model is None:
        return base, f"base ({args.model})"
    other = load_clip(args.tau_model, args.tau_pretrained, device=device)
    name = args.tau_model if ":" in args.tau_model else f"{args.tau_model} ({args.tau_pretrained})"
    return ImageEncoder.from_clip(other), name


def _with_group(args: argparse.Namespace, run: Callable[..., Any]) -> Any:
    """``run(args, group, device)`` inside a process group (a torchrun group, or this process alone)."""
    group, device = distributed.start(_device(args.device), timedelta(minutes=args.dist_timeout))
    try:
        return run(args, group, device)
    finally:
        group.close()


def run_eval(args: argparse.Namespace) -> dict | None:
    """Evaluate, appending each batch to ``--out`` as it finishes; resume what is already there.

    With ``--seeds``, one run per seed under ``--out/seed-S``, then their mean and standard deviation.
    Returns the results on the main process (None on the others of a torchrun group).
    """
    if not args.seeds:
        return _with_group(args, _run_eval)
    runs = _with_group(args, lambda args, group, device: [
        _run_eval(argparse.Namespace(**{**vars(args), "seed": seed, "out": args.out / f"seed-{seed}"}), group, device)
        for seed in args.seeds])
    if runs[0] is None:
        return None
    records = combine_seeds([run["records"] for run in runs], args.seeds)
    config = {**runs[0]["config"], "seed": None, "seeds": args.seeds}
    results = {"config": config, "records": records, "average": average_records(records), "unreadable": runs[0]["unreadable"]}
    write_json_atomically(args.out / "results.json", results)
    print(f"\nmean over seeds {', '.join(map(str, args.seeds))} (± sample standard deviation):\n"
          + format_table(results["records"]))
    written = write_report(args.out)
    print(f"\nresults: {args.out / 'results.json'}; report: {written[0]}")
    return results


def _attack_for(args: argparse.Namespace, defense: Defense, attack: Attack) -> Attack:
    """The attack a defense faces: ``attack`` itself under the paper's protocol, else ``attack`` through it."""
    if args.threat == "paper":
        return attack
    if not isinstance(attack, PGD):
        raise CounterattackError("--threat adaptive runs the pgd or cw loop through the defense; "
                                 f"{attack.name} is for the paper's protocol.")
    return AdaptiveAttack(defense, attack, args.adaptive_method, args.eot_samples, args.gate_weight)


def _precisions(args: argparse.Namespace) -> dict[str, str]:
    """The precision of each part: its own flag, else --precision."""
    return {"attack": args.attack_precision or args.precision, "defense": args.defense_precision or args.precision}


def _attacks(args: argparse.Namespace, names: Sequence[str]) -> list[Attack]:
    """The attacks: each one's own flags, else the shared --eps/--attack-steps/--attack-step-size, else its defaults."""
    def pixels(value: float | None) -> float | None:
        return None if value is None else value * PIXEL

    return build_attacks(names, {name: _registered_settings(args, "attack", name) for name in names},
                         eps=pixels(args.eps), steps=args.attack_steps, step_size=pixels(args.attack_step_size))


def _setup(args: argparse.Namespace, names: Sequence[str], attack_names: Sequence[str], device: torch.device):
    """Validate the cheap things first, then load the model; return it, its tau model's name, and the defenses."""
    check_defense_names(names)  # before the model loads: a typo fails in seconds
    attacks = _attacks(args, attack_names)
    for attack in attacks:
        _attack_for(args, NoDefense(), attack)
    if args.command == "sanity" or any(isinstance(a, AutoAttack) for a in attacks):
        import_pyautoattack()  # a missing dependency fails now, not after hours of other attacks
    for template in args.templates or ():
        if template.count("{}") != 1:
            raise CounterattackError(f"Template {template!r} must contain '{{}}' exactly once.")
    clip = load_clip(args.model, args.pretrained, device=device)
    tau_encoder, tau_model = _tau_encoder(args, clip, device)
    settings = {name: _registered_settings(args, "defense", name) for name in names}
    return clip, tau_model, build_defenses(names, settings, tau_encoder=tau_encoder)


def _load(args: argparse.Namespace, spec: str, clip: LoadedCLIP) -> EvalDataset:
    return load_dataset(spec, clip, args.data_root, prompts=args.prompts, transform=args.transform)


def _classifier(args: argparse.Namespace, clip: LoadedCLIP, data: EvalDataset) -> ZeroShotClassifier:
    return ZeroShotClassifier.from_clip(clip, data.class_names, args.templates or data.templates)


def _select(args: argparse.Namespace, data: EvalDataset) -> tuple[list[int], list[dict]]:
    """The images to evaluate (the class-balanced subset, less undecodable files under --skip-unreadable) and those skipped.

    Every selected file is decoded once before any compute, so a corrupt image stops the run in
    seconds, naming the file, rather than hours in with a traceback.
    """
    chosen = balanced_subset(data.targets, args.limit)
    unreadable = find_unreadable(data, chosen, progress=not args.no_progress)
    if unreadable and not args.skip_unreadable:
        first = next(iter(unreadable))
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise CounterattackError(
            f"cannot decode {data.files[first]}: {unreadable[first]}{more}. Replace or remove the file(s), "
            "or pass --skip-unreadable to leave them out (they are then listed in results.json)."
        )
    skipped = [{"dataset": data.name, "id": data.image_ids[i], "file": data.files[i], "error": reason}
               for i, reason in unreadable.items()]
    return [i for i in chosen if i not in unreadable], skipped


@dataclass
class _Context:
    """What every command that evaluates shares: the model, the datasets and their chosen images, the run settings."""

    args: argparse.Namespace
    group: distributed.ProcessGroup
    clip: LoadedCLIP
    tau_model: str
    loaded: list[EvalDataset]
    selections: list[tuple[list[int], list[dict]]]
    settings: RunSettings

    def identity(self) -> dict:
        """What the images and the classifier are: a stored adversarial set must have been made for the same."""
        args = self.args
        return {
            "model": args.model,
            "pretrained": None if ":" in args.model else args.pretrained,
            "vision_checkpoint": str(args.vision_checkpoint) if args.vision_checkpoint else None,
            "prompts": args.prompts,
            "templates": args.templates,  # None: each dataset's own (the prompt set's)
            "transform": args.transform,
            "datasets": [data.describe() for data in self.loaded],
            "limit": args.limit,
            "skip_unreadable": args.skip_unreadable,
        }

    def run_config(self) -> dict:
        """Settings that change no result: a resumed run may differ in them."""
        return {"batch_size": self.args.batch_size, "device": str(self.settings.device), "processes": self.group.world_size,
                "data_root": str(self.args.data_root), "versions": _versions()}

    def expected(self) -> dict[str, list]:
        return {data.name: [data.image_ids[i] for i in chosen] for data, (chosen, _) in zip(self.loaded, self.selections)}

    def unreadable(self) -> list[dict]:
        return [entry for _, skipped in self.selections for entry in skipped]


def _context(args: argparse.Namespace, group: distributed.ProcessGroup, device: torch.device, defense_names: Sequence[str],
             attack_names: Sequence[str]) -> tuple[_Context, list[Defense]]:
    """Validate, load the model and the datasets (downloads on the main process first), choose the images."""
    datasets = dataset_names(args.dataset or ["cifar10"])
    clip, tau_model, defenses = _setup(args, defense_names, attack_names, device)
    # Every dataset is found before any work starts, so a typo fails in seconds, not hours in.
    check_manual_datasets(datasets, args.data_root)
    # Downloads happen once, on the main process; the others then read what it fetched.
    loaded = group.first_on_main(lambda: [_load(args, spec, clip) for spec in datasets])
    selections = group.together(lambda: [_select(args, data) for data in loaded])
    settings = RunSettings(args.seed, args.limit, args.batch_size, args.workers, device, not args.no_progress,
                           group.rank, group.world_size, **{f"{part}_precision": p for part, p in _precisions(args).items()})
    return _Context(args, group, clip, tau_model, loaded, selections, settings), defenses


def _batch_composition(ctx: _Context, attacks: Sequence[Attack]) -> dict:
    """AutoAttack seeds a whole batch at once: its results depend on which images share one."""
    if any(isinstance(a, AutoAttack) for a in attacks):
        return {"batch_composition": {"batch_size": ctx.args.batch_size, "processes": ctx.group.world_size}}
    return {}


def _craft_into(ctx: _Context, folder: Path, attacks: Sequence[Attack]) -> AdversarialSet:
    """Craft the paper protocol's adversarial images of every chosen image into ``folder``, resuming what is there."""
    config = {**ctx.identity(), "attacks": [a.describe() for a in attacks], "threat": "paper",
              "precision": {"attack": ctx.settings.attack_precision}, "seed": ctx.args.seed,
              **_batch_composition(ctx, attacks), "run": ctx.run_config()}
    group = ctx.group
    adversarial = AdversarialSet(folder, group.rank)
    group.first_on_main(lambda: adversarial.check_config(config, write=group.is_main))
    done = adversarial.done()
    group.barrier()

    def craft_my_share() -> None:
        for data, (chosen, _) in zip(ctx.loaded, ctx.selections):
            classifier = _classifier(ctx.args, ctx.clip, data)
            for ids, labels, images in craft_dataset(classifier, data, attacks, ctx.settings, done.get(data.name, ()), chosen):
                adversarial.append(data.name, ids, labels, images)

    group.together(craft_my_share)
    group.together(lambda: adversarial.complete(ctx.expected()) if group.is_main else None)
    return AdversarialSet.open(folder)


def _stored_attacks(adversarial: AdversarialSet) -> list[Attack]:
    """The attacks a stored set was made with, rebuilt from its configuration (their names and settings)."""
    built = []
    for described in adversarial.config["attacks"]:
        fields_of = {f.name for f in dataclass_fields(ATTACKS[described["attack"]])}
        built.append(build_attacks([described["attack"]], {described["attack"]: {
            k: v for k, v in described.items() if k in fields_of}})[0])
    return built


def _open_adversarial(ctx: _Context, folder: Path) -> tuple[AdversarialSet, list[Attack]]:
    if ctx.args.threat != "paper":
        raise CounterattackError("--adversarial holds images crafted against the undefended model (the paper's protocol); "
                                 "adaptive attacks are crafted through each defense and cannot be stored once for all.")
    adversarial = AdversarialSet.open(folder)
    adversarial.check_identity(ctx.identity())
    adversarial.complete(ctx.expected())
    attacks = _stored_attacks(adversarial)
    args = ctx.args
    given = [f"--{name}" for name in ("eps", "attack_steps", "attack_step_size") if getattr(args, name) is not None]
    given += [_flag(a, s) for a in ATTACKS for s in _registered_settings(args, "attack", a)]
    if args.attack_given and sorted(args.attack) != sorted(a.name for a in attacks):
        given.insert(0, f"--attack {','.join(args.attack)}")
    if given:
        raise CounterattackError(f"{folder} holds {', '.join(a.name for a in attacks)} with their own settings "
                                 f"(see its config.json); {', '.join(given)} cannot apply to it: drop them, or craft "
                                 "another set with `counterattack attack`.")
    return adversarial, attacks


def _evaluate_into(ctx: _Context, out: Path, defenses: Mapping[str, Defense], attacks: Sequence[Attack],
                   config: dict, adversarial: AdversarialSet | None = None,
                   attack_for: Callable[[Attack, Defense], Attack] | None = None) -> list[dict] | None:
    """Evaluate ``defenses`` (name -> defense) into the results store ``out``, resuming; the records on the main process."""
    group = ctx.group
    store = ResultsStore(out, group.rank)
    group.first_on_main(lambda: store.check_config(config, write=group.is_main))
    done = store.done()
    group.barrier()  # everyone has read what is done before anyone adds to it

    def evaluate_my_share() -> None:
        for data, (chosen, _) in zip(ctx.loaded, ctx.selections):
            classifier = _classifier(ctx.args, ctx.clip, data)
            for batch in evaluate_dataset(classifier, data, attacks, defenses, ctx.settings, done.get(data.name, ()),
                                          attack_for, chosen, adversarial):
                store.append(batch)

    group.together(evaluate_my_share)
    expected = ctx.expected()
    # The merge check runs on the main process; its failure ends the others too, with its message.
    batches = group.together(lambda: store.complete_batches(expected) if group.is_main else None)
    if not group.is_main:
        return None
    adaptive = None
    if ctx.args.threat == "adaptive":
        adaptive = f"{ctx.args.adaptive_method}, eot {ctx.args.eot_samples}, gate weight {ctx.args.gate_weight:g}"
    return summarize(batches, list(expected), list(defenses), [a.name for a in attacks], ctx.args.threat, adaptive)


def _evaluation_config(ctx: _Context, defenses: Mapping[str, Defense], attacks: Sequence[Attack],
                       adversarial: AdversarialSet | None) -> dict:
    args = ctx.args
    config = {
        **ctx.identity(),
        "tau_model": ctx.tau_model,
        "attacks": [attack.describe() for attack in attacks],
        "threat": args.threat,
        "adaptive": {"method": args.adaptive_method, "eot_samples": args.eot_samples, "gate_weight": args.gate_weight}
        if args.threat == "adaptive" else None,
        "defenses": [{**d.describe(), "name": name} if name != d.name else d.describe() for name, d in defenses.items()],
        "units": "eps and step sizes in [0, 1] pixel units",
        "precision": _precisions(args),
        "seed": args.seed,
        "run": ctx.run_config(),
    }
    if adversarial is None:
        config.update(_batch_composition(ctx, attacks))
    else:  # the attacks' own settings are the set's
        stored = adversarial.config
        config["precision"]["attack"] = stored["precision"]["attack"]
        config["adversarial"] = {"hash": adversarial.hash, "seed": stored["seed"], "folder": str(adversarial.folder)}
        config["run"]["adversarial_folder"] = config["adversarial"].pop("folder")  # a moved set is the same set
    return config


def _run_eval(args: argparse.Namespace, group: distributed.ProcessGroup, device: torch.device) -> dict | None:
    ctx, defense_list = _context(args, group, device, args.defense, args.attack)
    defenses = {d.name: d for d in defense_list}
    adversarial = None
    if args.adversarial:
        adversarial, attacks = _open_adversarial(ctx, args.adversarial)
    else:
        attacks = _attacks(args, args.attack)
    attack_for = {(a.name, d.name): _attack_for(args, d, a) for a in attacks for d in defense_list}
    config = _evaluation_config(ctx, defenses, attacks, adversarial)
    records = _evaluate_into(ctx, args.out, defenses, attacks, config, adversarial,
                             lambda attack, defense: attack_for[(attack.name, defense.name)])
    if records is None:
        return None
    results = {"config": config, "records": records, "average": average_records(records), "unreadable": ctx.unreadable()}
    write_json_atomically(args.out / "results.json", results)
    print(format_table(records))
    if len(ctx.loaded) > 1:
        print("\n" + paper_tables(records))
    written = write_report(args.out)
    print(f"\nresults: {args.out / 'results.json'}; report: {written[0]}")
    return results


def run_attack(args: argparse.Namespace, group: distributed.ProcessGroup, device: torch.device) -> AdversarialSet | None:
    """``counterattack attack``: craft and store the paper protocol's adversarial images, resumable."""
    if args.threat != "paper":
        raise CounterattackError("counterattack attack stores the paper protocol's images (crafted against the undefended "
                                 "model); adaptive attacks go through each defense: use `counterattack eval --threat adaptive`.")
    ctx, _ = _context(args, group, device, [], args.attack)
    adversarial = _craft_into(ctx, args.out, _attacks(args, args.attack))
    if group.is_main:
        count = sum(len(ids) for ids in ctx.expected().values())
        print(f"{count} images x {len(args.attack)} attack(s) stored in {args.out}; evaluate them with "
              f"`counterattack eval --adversarial {args.out} ...` (same model and data flags).")
    return adversarial


def parse_grid(texts: Sequence[str], defense: str) -> list[dict[str, Any]]:
    """``["tau_thres=0,0.1", "eps=2,4"]`` -> every combination, as settings in the library's units (cartesian product)."""
    by_name = {f.name: f for f in options_of(DEFENSES[defense])}
    axes: dict[str, list[Any]] = {}
    for text in texts:
        name, sep, values = text.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in by_name:
            raise CounterattackError(f"--grid {text!r}: expected OPTION=V1,V2,... with an option of {defense}: "
                                     f"{', '.join(by_name) or 'none'}.")
        if name in axes:
            raise CounterattackError(f"--grid gives {name} twice.")
        parse, setting = _option_parser(by_name[name]), by_name[name]
        try:
            parsed = [parse(v.strip()) for v in values.split(",") if v.strip()]
        except argparse.ArgumentTypeError as exc:
            raise CounterattackError(f"--grid {name}: {exc}.") from None
        if not parsed:
            raise CounterattackError(f"--grid {name}: no values.")
        axes[name] = [v * PIXEL if setting.metadata["unit"] == PIXEL_UNIT else v for v in parsed]
    return [dict(zip(axes, combination)) for combination in itertools.product(*axes.values())]


def _setting_label(defense: str, setting: Mapping[str, Any]) -> str:
    """``ttc tau_thres=0.1 eps=2``: a sweep point's name, budgets in 1/255."""
    fields_by_name = {f.name: f for f in dataclass_fields(DEFENSES[defense])}
    return " ".join([defense, *(f"{k}={_cli_value(v, fields_by_name[k].metadata):g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                for k, v in setting.items())])


def _single_defense(args: argparse.Namespace) -> str:
    names = args.defense
    if len(names) != 1:
        raise CounterattackError(f"{args.command} studies one defense; got {', '.join(names)}.")
    if args.threat != "paper":
        raise CounterattackError(f"{args.command} judges every setting on one stored adversarial set (the paper's protocol); "
                                 "use `counterattack eval --threat adaptive` for adaptive attacks.")
    return names[0]


def _adversarial_for(ctx: _Context, attack_names: Sequence[str]) -> tuple[AdversarialSet, list[Attack]]:
    """``--adversarial`` if given, else the paper protocol's images crafted once into ``--out/adversarial``."""
    if ctx.args.adversarial:
        return _open_adversarial(ctx, ctx.args.adversarial)
    adversarial = _craft_into(ctx, ctx.args.out / "adversarial", _attacks(ctx.args, attack_names))
    return adversarial, _stored_attacks(adversarial)


def run_sweep(args: argparse.Namespace, group: distributed.ProcessGroup, device: torch.device) -> dict | None:
    """``counterattack sweep``: every setting of a grid over one defense's options, on one adversarial set."""
    name = _single_defense(args)
    grid = parse_grid(args.grid, name)
    ctx, (base,) = _context(args, group, device, [name], args.attack)
    settings = {_setting_label(name, setting): setting for setting in grid}
    if len(settings) != len(grid):
        raise CounterattackError(f"--grid repeats a setting ({len(grid)} combinations, {len(settings)} distinct at 6 digits).")
    defenses: dict[str, Defense] = {"none": NoDefense(), **{label: replace(base, **setting) for label, setting in settings.items()}}
    adversarial, attacks = _adversarial_for(ctx, args.attack)
    config = {**_evaluation_config(ctx, defenses, attacks, adversarial), "sweep": {"defense": name, "grid": args.grid}}
    records = _evaluate_into(ctx, args.out, defenses, attacks, config, adversarial)
    if records is None:
        return None
    for record in records:
        record["setting"] = dict(settings.get(record["defense"], {}))
    plots = []
    single = len({r["dataset"] for r in records}) == 1 and len(attacks) == 1
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        for attack in dict.fromkeys(r["attack"] for r in records):
            these = [r for r in records if r["dataset"] == dataset and r["attack"] == attack]
            points = [{**r, "label": r["defense"].removeprefix(f"{name} ")} for r in these if r["defense"] != "none"]
            baseline = next(r for r in these if r["defense"] == "none")
            path = args.out / ("pareto.png" if single else f"pareto-{_file_name(short_name(dataset))}-{attack}.png")
            plots.append(plot_pareto(points, path, baseline, title=f"{name} on {short_name(dataset)}, {attack} "
                                     f"({baseline['n']} images)"))
    results = {"config": config, "records": records, "unreadable": ctx.unreadable()}
    write_json_atomically(args.out / "results.json", results)
    print(format_table(records))
    print(f"\nresults: {args.out / 'results.json'}; Pareto plot(s): {', '.join(map(str, plots))}")
    return results


def _scores(store: ResultsStore, expected: dict[str, list], defense: str, attack: str) -> tuple[list[float], list[float]]:
    """Per image, the gate's score on the clean and on the adversarial images (one dataset)."""
    clean, adv = [], []
    for batch in store.complete_batches(expected):
        result = batch["defenses"][defense]
        clean += result["clean"]["tau"]
        adv += result["adv"][attack]["tau"]
    return clean, adv


def run_calibrate(args: argparse.Namespace, group: distributed.ProcessGroup, device: torch.device) -> dict | None:
    """``counterattack calibrate``: the gate's score on clean and adversarial images, its ROC AUC, and the
    threshold that flags ``--target-fpr`` of the clean images, with the accuracy it gives."""
    name = _single_defense(args)
    cls = DEFENSES[name]
    if "tau_thres" not in {f.name for f in options_of(cls)}:
        gated = [n for n, c in DEFENSES.items() if "tau_thres" in {f.name for f in options_of(c)}]
        raise CounterattackError(f"{name} has no gate to calibrate; defenses with one: {', '.join(gated)}.")
    if len(dataset_names(args.dataset or ["cifar10"])) != 1:
        raise CounterattackError("calibrate works on one --dataset: a threshold is chosen per backbone and dataset.")
    ctx, (current,) = _context(args, group, device, [name], args.attack)
    adversarial, attacks = _adversarial_for(ctx, args.attack)
    flagged_above = getattr(cls, "gate_flags_above", False)

    def evaluate(folder: str, defense: Defense) -> None:
        defenses = {name: defense}
        _evaluate_into(ctx, args.out / folder, defenses, attacks, _evaluation_config(ctx, defenses, attacks, adversarial),
                       adversarial)
        group.barrier()

    evaluate("current", current)
    expected, dataset = ctx.expected(), ctx.loaded[0].name
    clean_scores, _ = _scores(ResultsStore(args.out / "current"), expected, name, attacks[0].name)
    chosen_threshold = threshold_at_fpr(clean_scores, args.target_fpr, flagged_above)
    chosen = replace(current, tau_thres=chosen_threshold)
    chosen_folder = f"at-{chosen_threshold:.6g}"  # another --target-fpr adds a folder rather than clashing
    evaluate(chosen_folder, chosen)
    if not group.is_main:
        return None

    def accuracy(folder: str) -> dict[str, dict]:
        store = ResultsStore(args.out / folder)
        return {r["attack"]: r for r in summarize(store.complete_batches(expected), [dataset], [name], [a.name for a in attacks])}

    before, after = accuracy("current"), accuracy(chosen_folder)
    entries, plots = [], []
    for attack in attacks:
        clean, adv = _scores(ResultsStore(args.out / "current"), expected, name, attack.name)
        oriented = (lambda xs: xs) if flagged_above else (lambda xs: [-x for x in xs])
        entry = {
            "dataset": dataset, "attack": attack.name, "defense": name, "n": len(clean),
            "flagged": "above" if flagged_above else "below", "auc": roc_auc(oriented(clean), oriented(adv)),
            "target_fpr": args.target_fpr,
            "current": {"threshold": current.tau_thres, "flagged_clean": flagged_fraction(clean, current.tau_thres, flagged_above),
                        "flagged_adv": flagged_fraction(adv, current.tau_thres, flagged_above),
                        **{k: before[attack.name][k] for k in ("clean_acc", "robust_acc", "clean_ci95", "robust_ci95")}},
            "chosen": {"threshold": chosen_threshold, "flagged_clean": flagged_fraction(clean, chosen_threshold, flagged_above),
                       "flagged_adv": flagged_fraction(adv, chosen_threshold, flagged_above),
                       **{k: after[attack.name][k] for k in ("clean_acc", "robust_acc", "clean_ci95", "robust_ci95")}},
        }
        entries.append(entry)
        plots.append(plot_score_histograms(
            clean, adv, current.tau_thres, chosen_threshold, flagged_above,
            f"{name}'s gate score on {short_name(dataset)}, {attack.name} ({len(clean)} images)",
            args.out / (f"calibration-{attack.name}.png" if len(attacks) > 1 else "calibration.png")))
    results = {"config": _evaluation_config(ctx, {name: current}, attacks, adversarial), "calibration": entries}
    write_json_atomically(args.out / "calibration.json", results)
    for e in entries:
        side = ">" if flagged_above else "<"
        print(f"{name} on {short_name(dataset)}, {e['attack']} ({e['n']} images): ROC AUC of the score as a detector {e['auc']:.3f}")
        for key, what in (("current", "current"), ("chosen", f"at {args.target_fpr:g} FPR")):
            c = e[key]
            print(f"  {what:>10}: flagged if score {side} {c['threshold']:.6g}: {c['flagged_clean']:.1%} of clean, "
                  f"{c['flagged_adv']:.1%} of adversarial images flagged; clean {c['clean_acc']:.2f}%, robust {c['robust_acc']:.2f}%")
    print(f"\nuse it: --{name}-tau-thres {chosen_threshold:.6g}; details: {args.out / 'calibration.json'}; "
          f"histogram(s): {', '.join(map(str, plots))}")
    return results


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


def run_sanity_command(args: argparse.Namespace) -> bool:
    device = _device(args.device)
    clip, _, (defense,) = _setup(args, [args.defense], [args.attack], device)
    (attack,) = _attacks(args, [args.attack])
    data = _load(args, args.dataset, clip)
    chosen, _ = _select(args, data)
    classifier = _classifier(args, clip, data)
    settings = RunSettings(args.seed, args.limit, args.batch_size, args.workers, device, not args.no_progress,
                           **{f"{part}_precision": p for part, p in _precisions(args).items()})
    report = run_sanity(
        classifier, data, defense,
        lambda eps, steps, step: _attack_for(args, defense, replace(attack, eps=eps, steps=steps, step_size=step)),
        attack.eps / PIXEL, attack.steps, settings, chosen,
    )
    threat = "paper protocol" if args.threat == "paper" else f"adaptive ({args.adaptive_method})"
    text = format_report(report, f"{args.model} on {data.name}, defense {defense.name}, {args.attack} ({threat})")
    print(text, file=sys.stdout if report.passed else sys.stderr)
    if args.out:
        write_json_atomically(args.out / "sanity.json", {
            "eps_sweep": report.eps_sweep, "steps_sweep": report.steps_sweep,
            "checks": [vars(c) for c in report.checks], "autoattack_warnings": report.autoattack_warnings,
            "passed": report.passed})
    return report.passed


def list_registered(args: argparse.Namespace, kind: str) -> None:
    """``counterattack defenses`` and ``counterattack attacks``: every one with its flags and defaults."""
    listing = {
        name: {"summary": _REGISTRIES[kind].summary(name),
               "options": {_flag(name, f.name): _cli_value(f.default, f.metadata) for f in options_of(cls)}}
        for name, cls in _REGISTRIES[kind].items()
    }
    if args.json:
        print(json.dumps(listing, indent=2))
        return
    for name, entry in listing.items():
        print(f"{name}: {entry['summary']}")
        for flag, default in entry["options"].items():
            print(f"    {flag} {default}")
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
    if isinstance(getattr(args, "attack", ""), (list, type(None))):  # eval, attack, sweep, calibrate
        args.attack_given = args.attack is not None
        args.attack = args.attack or ["pgd"]
    try:
        if args.command == "eval":
            run_eval(args)
        elif args.command in ("attack", "sweep", "calibrate"):
            _with_group(args, {"attack": run_attack, "sweep": run_sweep, "calibrate": run_calibrate}[args.command])
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
