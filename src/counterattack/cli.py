"""The ``counterattack`` command line: parses into one frozen ``RunConfig``, then runs a command with it.

Every flag is left unset when not given (``None``), so that its default lives in ``config`` alone; the
help texts read the defaults from there. The commands that run something are in ``commands/``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ATTACK_LABELS, QUANTIZE_MODES, RunConfig, build_config, default
from .errors import CounterattackError
from .flags import (
    COUNT, PIXELS, POSITIVE, add_registered_options, entries, given_flags, names_of, number,
    registered_settings,
)
from .listings import list_datasets, list_registered, print_prompts
from .options import PIXEL, large_budgets_meant

SEED = number(int, 0, 2**63 - 1)
BATCH = number(int, 1, sys.maxsize)  # beyond the machine's integers no loader can count


def _seeds(text: str) -> tuple[int, ...]:
    seeds = tuple(SEED(part) for part in _names(text))
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds like 0,1,2, got {text!r}")
    return seeds


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _noise(text: str) -> tuple[float, ...]:
    budgets = tuple(PIXELS(part) for part in _names(text))
    if not budgets:
        raise argparse.ArgumentTypeError(f"expected noise budgets in 1/255 like 1,4,8,16, got {text!r}")
    if len(set(budgets)) != len(budgets):
        logging.getLogger("counterattack").warning("--noise %s gives a budget twice: each is measured once", text)
    return tuple(dict.fromkeys(budgets))


def _out(text: str) -> Path:
    """An output folder: an empty name would write into the working folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty --out would write into the working folder: give a folder name")
    return Path(text)


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported in one line (and the way to the help) instead of the usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "none"
    return str(value)


def _add_common_arguments(command: argparse.ArgumentParser, name: str, defenses: bool = True) -> None:
    """The options every running command shares: model, data, attack, defense (unless not ``defenses``) and run."""

    def helped(text: str, key: str, shown: str | None = None) -> str:
        return f"{text} (default: {shown if shown is not None else _shown(default(name, key))})"

    model = command.add_argument_group("model")
    model.add_argument("--model", help=helped("open_clip name, local-dir:PATH, hf-hub:ORG/NAME or "
                                              "transformers:ORG/NAME|PATH", "model.name"))
    model.add_argument("--pretrained",
                       help=helped("pretrained tag or weights file (built-in names only)", "model.pretrained"))
    model.add_argument("--vision-checkpoint", type=Path,
                       help="fine-tuned vision weights (e.g. TeCoA, PMG-AFT, FARE) swapped into --model's vision tower")
    model.add_argument("--backbone", metavar="NAME",
                       help="what published tables call --vision-checkpoint's weights (tecoa, fare, pmg; -eps1/-eps4 "
                       "where a source tells them apart), recorded so that `report --compare published` can match the "
                       "run")
    model.add_argument("--tau-model", help="encoder for TTC's tau: 'defended', or a model like --model "
                       "(default: the base model when --vision-checkpoint is given, else the defended one)")
    model.add_argument("--tau-pretrained", help=helped("pretrained tag for --tau-model", "model.tau_pretrained"))
    model.add_argument("--prompts", choices=("paper", "openai"),
                       help=helped("class names and templates of the benchmark datasets: paper (as the TTC code builds "
                                   "them) or openai (curated names, 'This is a photo of a {}.')", "model.prompts"))
    model.add_argument("--templates", nargs="+",
                       help="prompt templates, '{}' is the class name (overrides --prompts' templates)")
    model.add_argument("--descriptions", type=Path, metavar="PATH",
                       help="class descriptions for the defenses that read them (DBD, COLA): a JSON file mapping class "
                       "names to lists of sentences (CuPL's or AWT's layout), or a folder of one such file per dataset "
                       "(DATASET.json); not shipped: see the README")
    data = command.add_argument_group("data")
    data.add_argument("--dataset", action="append",
                      help=helped("a name from `counterattack datasets`, all, or imagefolder:DIR (repeatable)",
                                  "data.datasets"))
    data.add_argument("--data-root", type=Path, help=helped("where datasets live or are downloaded to", "data.root"))
    data.add_argument("--limit", type=POSITIVE, help=helped("class-balanced subset of N images (first images of each "
                                                            "class)", "data.limit", "all images"))
    data.add_argument("--transform", choices=("model", "paper"),
                      help=helped("imagefolder: preprocessing: the model's own eval transform, or the paper's Resize "
                                  "256, CenterCrop 224", "data.transform"))
    data.add_argument("--skip-unreadable", action="store_true", default=None,
                      help="skip image files that cannot be decoded (listed in results.json) instead of stopping")
    attack = command.add_argument_group("attack", "Every attack's own options are below (--pgd-steps, --cw-kappa, "
                                        "...); --eps, --attack-steps and --attack-step-size set them for every attack "
                                        "that has them.")
    attack.add_argument("--attack", type=names_of("attack"),
                        help=helped("comma-separated; several give a worst-case record too. "
                                    + "; ".join(f"{k}: {e.summary}" for k, e in entries("attack").items()),
                                    "attack.names"))
    attack.add_argument("--eps", type=PIXELS,
                        help="L-inf budget of every attack, in 1/255 (default: each attack's own)")
    attack.add_argument("--attack-steps", type=COUNT, help="iterations of every attack (default: each attack's own)")
    attack.add_argument("--attack-step-size", type=PIXELS,
                        help="step size of every attack that has one, in 1/255 (default: each attack's own)")
    attack.add_argument("--threat", choices=("paper", "adaptive"),
                        help=helped("paper: crafted against the undefended model; adaptive: through each defense",
                                    "attack.threat"))
    attack.add_argument("--attack-labels", choices=ATTACK_LABELS,
                        help="what every attack is crafted against: true (the papers' protocol) or predicted (the "
                        "undefended model's clean prediction: a defense that walks the image back along the attack "
                        "then gains nothing it was not given); accuracy is always against the true labels (default: "
                        "true, or a stored set's)")
    attack.add_argument("--convergence-images", type=COUNT, metavar="N",
                        help=helped("--threat adaptive: images on which the adaptive attacks run again with twice the "
                                    "steps and EOT draws, to check that the reported number has converged (0: skip)",
                                    "attack.convergence_images"))
    attack.add_argument("--quantize-adversarial", nargs="?", const="round", choices=QUANTIZE_MODES, metavar="MODE",
                        help="adversarial images to 8 bits before any defense sees them: round (k/255, the default "
                        "MODE: CSR's and R-TPT's published robust numbers went through PIL) or floor (a PNG written by "
                        "truncation, as DBD's and AGC's code saves them); TTC's, DOC's and MAC's stayed in float")
    add_registered_options(command, "adaptive")
    add_registered_options(command, "attack")
    if defenses:
        group = command.add_argument_group("defense")
        group.add_argument("--defense", type=names_of("defense"),
                           help=helped(f"comma-separated: {', '.join(entries('defense'))}", "defense.names"))
        add_registered_options(command, "defense")
    run = command.add_argument_group("run")
    precisions = ("fp32", "tf32", "bf16", "fp16", "paper")
    run.add_argument("--precision", choices=precisions,
                     help=helped("of the attacks' and the defenses' encoder passes: fp32, tf32 (CUDA matrix products), "
                                 "bf16 or fp16 autocast, or paper (fp16 autocast for both, as the TTC code ran); gates "
                                 "and the logit head stay fp32", "run.precision"))
    run.add_argument("--attack-precision", choices=precisions, help="the attacks' precision (default: --precision)")
    run.add_argument("--defense-precision", choices=precisions, help="the defenses' precision (default: --precision)")
    run.add_argument("--batch-size", type=BATCH, help=helped("images per batch", "run.batch_size"))
    run.add_argument("--seed", type=SEED, help=helped("of every random draw", "run.seed"))
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), help=helped("where to compute", "run.device"))
    run.add_argument("--workers", type=COUNT,
                     help="data loading processes (default: 4, or 8 with a GPU, at most the CPU count)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--dist-timeout", type=number(float, 1),
                     help=helped("torchrun: minutes a process waits for the others at a synchronisation point",
                                 "run.dist_timeout_minutes"))


def _add_seeds(command: argparse.ArgumentParser) -> None:
    command.add_argument("--seeds", type=_seeds, metavar="S,S,...",
                         help="repeat the run once per seed (attack starts, defense noise) under --out/seed-S and "
                         "report mean and sample standard deviation (instead of --seed)")


def _add_gallery(command: argparse.ArgumentParser, name: str) -> None:
    command.add_argument("--gallery", type=COUNT, metavar="N",
                         help="images per dataset whose pictures (clean, adversarial, defended) and predictions the "
                         "run keeps for `counterattack report DIR --html`; 0: none (default: "
                         f"{default(name, 'run.gallery')})")


def _running(commands, name: str, help: str, description: str, defenses: bool = True) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=description)
    _add_common_arguments(parser, name, defenses)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="counterattack", description="Test-time Counterattacks for CLIP: defend and evaluate.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ev = _running(commands, "eval", "attack a zero-shot CLIP and measure defenses",
                  "Craft adversarial images (against the undefended CLIP under --threat paper, through each defense "
                  "under --threat adaptive), then apply every defense to the same clean and adversarial images. "
                  "Budgets and step sizes are in units of 1/255.")
    ev.add_argument("--out", type=_out,
                    help="folder for the results; running the same command again resumes there (default: runs/latest)")
    ev.add_argument("--adversarial", type=Path, metavar="ADV",
                    help="evaluate on the adversarial images stored by `counterattack attack --out ADV` instead of "
                    "attacking (its attacks and their settings are the set's; model, data and prompt flags must "
                    "match it)")
    _add_seeds(ev)
    _add_gallery(ev, "eval")
    attack = _running(commands, "attack", "craft adversarial images once and store them, for eval/sweep/calibrate "
                      "--adversarial", "Craft the paper protocol's adversarial images (against the undefended CLIP) "
                      "and store them losslessly (float32 safetensors shards with image ids, labels and the full "
                      "configuration). Running the same command again resumes.", defenses=False)
    attack.add_argument("--out", type=_out, required=True, metavar="ADV", help="folder for the adversarial set")
    sweep = _running(commands, "sweep", "evaluate a grid of one defense's settings on one adversarial set, with a "
                     "Pareto plot", "Every combination of --grid values (any option of the defense; budgets in 1/255) "
                     "is evaluated on the same adversarial images: --adversarial ADV, or crafted once into "
                     "--out/adversarial. Writes one record per setting (and the undefended model), a table and "
                     "pareto.png. Resumable.")
    calibrate = _running(commands, "calibrate", "a gate's score on clean and adversarial images: histograms, ROC AUC, "
                         "threshold at a target FPR", "Computes a gated defense's score (TTC's tau, MAC's corruption "
                         "degree, DOC's sensitivity, CSR's spectral consistency) on clean and adversarial images, its "
                         "ROC AUC as a detector of adversarial images, and the threshold that flags --target-fpr of "
                         "the clean images, with the clean and robust accuracy the defense gets there. Resumable.")
    for study in (sweep, calibrate):
        study.add_argument("--adversarial", type=Path, metavar="ADV",
                           help="a set from `counterattack attack` (default: craft one)")
        study.add_argument("--out", type=_out, required=True,
                           help="folder for the results; the same command again resumes")
    _add_seeds(sweep)
    sweep.add_argument("--grid", action="append", required=True, metavar="OPTION=V1,V2,...",
                       help="values of one option of the defense (repeatable: the cartesian product is swept)")
    calibrate.add_argument("--target-fpr", type=number(float, 0, 1),
                           help=f"fraction of clean images the chosen threshold judges attacked "
                           f"(default: {default('calibrate', 'study.target_fpr')})")
    stability = _running(commands, "stability", "the paper's preliminary experiment: TTC's tau under uniform noise on "
                         "clean and adversarial images", "For each dataset and noise budget: tau (the relative shift "
                         "of the image embedding under one uniform draw, on TTC's tau encoder) on clean and "
                         "adversarial images, its mean, quantiles and ROC AUC as a detector, and the paper's bar chart "
                         "beside the TTC poster's values. Resumable.", defenses=False)
    stability.add_argument("--noise", type=_noise, metavar="B,B,...",
                           help=f"uniform noise budgets in 1/255 (default: "
                           f"{','.join(f'{b * 255:g}' for b in default('stability', 'study.noise'))})")
    stability.add_argument("--adversarial", type=Path, metavar="ADV",
                           help="a set from `counterattack attack` (default: attack)")
    stability.add_argument("--out", type=_out, required=True,
                           help="folder for the results; the same command again resumes")
    reproduce = _running(commands, "reproduce", "run a published table (a preset of eval) and compare it with the "
                         "published numbers", "Runs one published table through eval's own code (resumable, torchrun) "
                         "and writes comparison.md/.csv/.json/.png beside the results: ours against the published "
                         "numbers, with our 95% intervals. The preset fixes the table's datasets, defenses, attacks "
                         "and prompts: flags that would change them are refused. --list shows every preset with an "
                         "estimated cost.")
    reproduce.add_argument("preset", nargs="?", metavar="NAME", help="a preset of `counterattack reproduce --list`")
    reproduce.add_argument("--list", action="store_true", help="list the presets with their images, encoder passes and "
                           "an estimated time on this machine (a short warm-up of the real pipeline)")
    reproduce.add_argument("--skip-missing", action="store_true", default=None,
                           help="run the preset's datasets that are under --data-root, skip the others")
    reproduce.add_argument("--out", type=_out, help="folder for the results (default: runs/NAME)")
    _add_gallery(reproduce, "reproduce")
    for backbone in ("tecoa", "fare"):
        reproduce.add_argument(f"--{backbone}-checkpoint", type=Path, metavar="FILE",
                               help=f"the {backbone} ViT-B/32 vision weights, for presets on fine-tuned backbones")
    sanity = _running(commands, "sanity", "check an evaluation for gradient masking",
                      "Robust accuracy against eps and against attack steps, and AutoAttack's checks, for one model, "
                      "dataset, attack and defense. Exits with 1 when a check fails.")
    sanity.add_argument("--out", type=_out, help="also write sanity.json here")
    listing = commands.add_parser("datasets",
                                  help="list the benchmark's datasets and whether they are under --data-root")
    listing.add_argument("--data-root", type=Path, default=default("datasets", "data.root"),
                         help="where datasets live or are downloaded to")
    listing.add_argument("--json", action="store_true", help="print JSON: [{name, num_classes, present, ...}]")
    for kind in ("defense", "attack"):
        listing = commands.add_parser(f"{kind}s", help=f"list every {kind} with its options and defaults")
        listing.add_argument("--json", action="store_true",
                             help="print JSON: {name: {summary, options: {flag: default}}}")
    prompts = commands.add_parser("prompts", help="print a benchmark dataset's zero-shot prompts, one a line")
    prompts.add_argument("dataset", help="a name from `counterattack datasets`")
    prompts.add_argument("--prompts", default=default("prompts", "model.prompts"), choices=("paper", "openai"),
                         help="the prompt set")
    report = commands.add_parser("report", help="write Markdown/CSV tables and PNG plots of a run folder")
    report.add_argument("folder", type=Path, help="an --out folder of counterattack eval")
    report.add_argument("--compare", choices=("published",),
                        help="also compare the records with every number the TTC paper and its re-runs printed "
                        "(comparison.md/.csv/.json/.png in the folder)")
    report.add_argument("--html", action="store_true",
                        help="also write report.html: one offline page with the tables, the figures, the warnings and "
                        "the gallery the run kept (--gallery), with filters")
    return parser


# What a reproduce preset fixes: the table's datasets, attacks, defenses and prompts (flags and registered options).
PRESET_FIXED = ("dataset", "attack", "eps", "attack_steps", "attack_step_size", "threat", "defense", "prompts",
                "templates", "transform", "vision_checkpoint", "backbone", "tau_model", "tau_pretrained",
                "quantize_adversarial", "attack_labels")


def _refuse_fixed_flags(args: argparse.Namespace) -> None:
    fixed = [f"--{name.replace('_', '-')}" for name in PRESET_FIXED if getattr(args, name, None) is not None]
    fixed += given_flags(args)
    if fixed and args.preset:
        raise CounterattackError(f"{args.preset} fixes what its table measured; {', '.join(fixed)} cannot change it "
                                 "(run `counterattack eval` with those flags instead).")
    if args.preset and args.list:
        raise CounterattackError("give a preset NAME to run, or --list to see them all, not both.")
    if not args.preset and not args.list:
        raise CounterattackError("name a preset to run (see `counterattack reproduce --list`).")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's configuration from the parsed flags: what was given, in the library's units; the rest defaults."""
    def pixels(value: float | None) -> float | None:
        return None if value is None else value * PIXEL

    given: dict[str, Any] = {
        "model.name": args.model, "model.pretrained": args.pretrained,
        "model.vision_checkpoint": args.vision_checkpoint, "model.backbone": args.backbone,
        "model.tau_model": args.tau_model, "model.tau_pretrained": args.tau_pretrained, "model.prompts": args.prompts,
        "model.templates": tuple(args.templates) if args.templates else None,
        "model.descriptions": args.descriptions,
        "data.root": args.data_root, "data.limit": args.limit, "data.transform": args.transform,
        "data.skip_unreadable": args.skip_unreadable,
        "attack.names": tuple(args.attack) if args.attack else None, "attack.given": args.attack is not None,
        "attack.eps": pixels(args.eps), "attack.steps": args.attack_steps,
        "attack.step_size": pixels(args.attack_step_size), "attack.threat": args.threat,
        "attack.precision": args.attack_precision, "attack.quantize": args.quantize_adversarial,
        "attack.labels": args.attack_labels, "attack.convergence_images": args.convergence_images,
        "attack.adaptive": registered_settings(args, "adaptive", "adaptive"),
        "attack.settings": {name: registered_settings(args, "attack", name) for name in entries("attack")},
        "run.precision": args.precision, "run.batch_size": args.batch_size, "run.seed": args.seed,
        "run.seeds": getattr(args, "seeds", None), "run.device": args.device, "run.workers": args.workers,
        "run.progress": not args.no_progress, "run.dist_timeout_minutes": args.dist_timeout,
        "run.gallery": getattr(args, "gallery", None),
        "study.grid": tuple(getattr(args, "grid", None) or ()) or None,
        "study.target_fpr": getattr(args, "target_fpr", None),
        "study.noise": tuple(b * PIXEL for b in args.noise) if getattr(args, "noise", None) else None,
    }
    if args.dataset:
        from .data import dataset_names

        given["data.datasets"] = tuple(dataset_names(args.dataset))
    if hasattr(args, "defense"):
        given["defense.names"] = tuple(args.defense) if args.defense is not None else None
        given["defense.precision"] = args.defense_precision
        given["defense.settings"] = {name: registered_settings(args, "defense", name) for name in entries("defense")}
    if args.command == "reproduce":
        _refuse_fixed_flags(args)
        given.update({"study.preset": args.preset, "study.skip_missing": args.skip_missing,
                      "study.checkpoints": {b: getattr(args, f"{b}_checkpoint") for b in ("tecoa", "fare")
                                            if getattr(args, f"{b}_checkpoint") is not None}})
    given["attack.settings"] = {k: v for k, v in given["attack.settings"].items() if v}
    if "defense.settings" in given:
        given["defense.settings"] = {k: v for k, v in given["defense.settings"].items() if v}
    return build_config(args.command, given, out=getattr(args, "out", None),
                        adversarial=getattr(args, "adversarial", None))


def _not_from_open_clip(record: logging.LogRecord) -> bool:
    """open_clip logs download failures on the root logger; our own error message says more."""
    return not (record.levelno >= logging.ERROR and f"{os.sep}open_clip{os.sep}" in record.pathname)


def run_command(config: RunConfig) -> Any:
    """Run a command that computes, inside a process group (torchrun's, or this process alone)."""
    from datetime import timedelta

    from . import distributed
    from .commands import command
    from .commands.checks import check_distinct_names, check_out
    from .models import resolve_device
    from .store import hold

    check_out(config)
    check_distinct_names(config)

    group, device = distributed.start(resolve_device(config.run.device),
                                      timedelta(minutes=config.run.dist_timeout_minutes))
    try:
        with contextlib.ExitStack() as held:
            if config.out is not None:  # one run per folder: a second is refused at once, naming this one
                group.together(lambda: held.enter_context(hold(config.out)) if group.is_main else None)
            return command(config.command)(config, group, device)
    finally:
        group.close()


def _dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; its exit status."""
    if args.command == "datasets":
        list_datasets(args)
    elif args.command == "prompts":
        print_prompts(args)
    elif args.command in ("defenses", "attacks"):
        list_registered(args, args.command[:-1])
    elif args.command == "report":
        from .report import write_report

        written = write_report(args.folder)
        if args.compare == "published":
            from .compare_files import write_comparison

            written += write_comparison(args.folder)
        if args.html:  # after the figures and the comparison, which the page shows
            from .report_html import write_html_report

            written.append(write_html_report(args.folder))
        for path in written:
            print(path)
    else:
        outcome = run_command(config_from_args(args))
        if args.command == "sanity":
            return 0 if outcome else 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_from_open_clip)
    try:  # building it imports the registries: a broken extension is named in one line
        parser = build_parser()
    except CounterattackError as exc:
        print(f"counterattack: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if getattr(args, "seeds", None) and args.seed is not None:
        parser.exit(2, f"counterattack {args.command}: error: --seed and --seeds together: give one\n")
    try:
        with large_budgets_meant():  # budgets given in 1/255 are never a slip of the API's [0, 1] units
            return _dispatch(args)
    except CounterattackError as exc:
        print(f"counterattack: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("counterattack: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped early (`| head`): nothing went wrong, say nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 141  # what a tool stopped by SIGPIPE returns
    except OSError as exc:  # a full disk, a folder gone read-only: what is written stays whole
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"counterattack: error: {exc.strerror or exc}{where}. Finished work is kept (every file is written "
              "whole): fix this and run the same command again to go on.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
