"""What each command does with its parsed arguments: validate the cheap things, load, run, write results.

``eval``, ``attack``, ``sweep`` and ``calibrate`` share one context (the model, the datasets and the
images chosen from them) and two resumable stores: results (``results.ResultsStore``) and stored
adversarial images (``adversarial.AdversarialSet``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from . import __version__, distributed
from .adversarial import AdversarialSet
from .attacks import ATTACKS, PGD, PIXEL, AdaptiveAttack, Attack, AutoAttack, build_attacks
from .attacks.autoattack import import_pyautoattack
from .calibration import flagged_fraction, plot_pareto, plot_score_histograms, roc_auc, threshold_at_fpr
from .classifier import ImageEncoder, ZeroShotClassifier
from .data import (
    EvalDataset, balanced_subset, check_manual_datasets, dataset_names, find_unreadable, load_dataset, short_name,
)
from .defenses import DEFENSES, PIXEL_UNIT, Defense, NoDefense, build_defenses, check_defense_names, options_of
from .errors import CounterattackError
from .evaluate import RunSettings, average_records, combine_seeds, craft_dataset, evaluate_dataset, summarize
from .flags import cli_value, flag, option_parser, registered_settings
from .models import LoadedCLIP, load_clip, load_vision_checkpoint
from .report import format_table, paper_tables, safe_file_name, write_report
from .results import ResultsStore, write_json_atomically
from .sanity import format_report, run_sanity


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


def with_group(args: argparse.Namespace, run: Callable[..., Any]) -> Any:
    """``run(args, group, device)`` inside a process group (a torchrun group, or this process alone)."""
    group, device = distributed.start(_device(args.device), timedelta(minutes=args.dist_timeout))
    try:
        return run(args, group, device)
    finally:
        group.close()


def over_seeds(args: argparse.Namespace, run: Callable[..., dict | None],
               write: Callable[[argparse.Namespace, dict], None]) -> dict | None:
    """``run(args, group, device)`` once, or with ``--seeds`` once per seed under ``--out/seed-S``; then the
    mean and sample standard deviation of every accuracy, written by ``write(args, results)`` into ``--out``.
    Returns the results on the main process (None on the others of a torchrun group)."""
    if not args.seeds:
        return with_group(args, run)
    runs = with_group(args, lambda args, group, device: [
        run(argparse.Namespace(**{**vars(args), "seed": seed, "out": args.out / f"seed-{seed}"}), group, device)
        for seed in args.seeds])
    if runs[0] is None:
        return None
    records = combine_seeds([one["records"] for one in runs], args.seeds)
    config = {**runs[0]["config"], "seed": None, "seeds": args.seeds}
    results = {"config": config, "records": records, "average": average_records(records), "unreadable": runs[0]["unreadable"]}
    print(f"\nmean over seeds {', '.join(map(str, args.seeds))} (± sample standard deviation):")
    write(args, results)
    return results


def _write_results(args: argparse.Namespace, results: dict, also: str = "") -> None:
    """results.json, the table on the terminal, and the report, in ``--out``."""
    write_json_atomically(args.out / "results.json", results)
    records = results["records"]
    print(format_table(records))
    if len({r["dataset"] for r in records}) > 1:
        print("\n" + paper_tables(records))
    written = write_report(args.out)
    print(f"\nresults: {args.out / 'results.json'}; report: {written[0]}{also}")


def run_eval(args: argparse.Namespace) -> dict | None:
    """Evaluate, appending each batch to ``--out`` as it finishes; resume what is already there (``--seeds``:
    once per seed, see ``over_seeds``)."""
    return over_seeds(args, _run_eval, _write_results)


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


def attacks_of(args: argparse.Namespace, names: Sequence[str]) -> list[Attack]:
    """The attacks: each one's own flags, else the shared --eps/--attack-steps/--attack-step-size, else its defaults."""
    def pixels(value: float | None) -> float | None:
        return None if value is None else value * PIXEL

    return build_attacks(names, {name: registered_settings(args, "attack", name) for name in names},
                         eps=pixels(args.eps), steps=args.attack_steps, step_size=pixels(args.attack_step_size))


def _setup(args: argparse.Namespace, names: Sequence[str], attack_names: Sequence[str], device: torch.device):
    """Validate the cheap things first, then load the model; return it, its tau model's name, and the defenses."""
    check_defense_names(names)  # before the model loads: a typo fails in seconds
    attacks = attacks_of(args, attack_names)
    for attack in attacks:
        _attack_for(args, NoDefense(), attack)
    if args.command == "sanity" or any(isinstance(a, AutoAttack) for a in attacks):
        import_pyautoattack()  # a missing dependency fails now, not after hours of other attacks
    for template in args.templates or ():
        if template.count("{}") != 1:
            raise CounterattackError(f"Template {template!r} must contain '{{}}' exactly once.")
    clip = load_clip(args.model, args.pretrained, device=device)
    tau_encoder, tau_model = _tau_encoder(args, clip, device)
    settings = {name: registered_settings(args, "defense", name) for name in names}
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
    unknown = [d["attack"] for d in adversarial.config["attacks"] if d["attack"] not in ATTACKS]
    if unknown:
        raise CounterattackError(f"{adversarial.folder} holds images of {', '.join(unknown)}, which this installation "
                                 f"does not have (attacks: {', '.join(ATTACKS)}).")
    built = []
    for described in adversarial.config["attacks"]:
        fields_of = {f.name for f in dataclass_fields(ATTACKS[described["attack"]])}
        built.append(build_attacks([described["attack"]], {described["attack"]: {
            k: v for k, v in described.items() if k in fields_of}})[0])
    return built


def _check_adversarial_flags(args: argparse.Namespace) -> None:
    """Before anything loads: ``--adversarial`` is a set, and no flag asks for what its stored attacks cannot be."""
    if not args.adversarial:
        return
    if args.threat != "paper":
        raise CounterattackError("--adversarial holds images crafted against the undefended model (the paper's protocol); "
                                 "adaptive attacks are crafted through each defense and cannot be stored once for all.")
    attacks = _stored_attacks(AdversarialSet.open(args.adversarial))
    given = [f"--{name}".replace("_", "-") for name in ("eps", "attack_steps", "attack_step_size", "attack_precision")
             if getattr(args, name) is not None]
    given += [flag(a, s) for a in ATTACKS for s in registered_settings(args, "attack", a)]
    if args.attack_given and sorted(args.attack) != sorted(a.name for a in attacks):
        given.insert(0, f"--attack {','.join(args.attack)}")
    if given:
        raise CounterattackError(f"{args.adversarial} holds {', '.join(a.name for a in attacks)} with their own settings "
                                 f"(see its config.json); {', '.join(given)} cannot apply to it: drop them, or craft "
                                 "another set with `counterattack attack`.")


def _open_adversarial(ctx: _Context, folder: Path) -> tuple[AdversarialSet, list[Attack]]:
    """The stored set, once it is known to be complete and made for this model, data and preprocessing."""
    adversarial = AdversarialSet.open(folder)
    adversarial.check_identity(ctx.identity())
    adversarial.complete(ctx.expected())
    return adversarial, _stored_attacks(adversarial)


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
    _check_adversarial_flags(args)
    ctx, defense_list = _context(args, group, device, args.defense, args.attack)
    defenses = {d.name: d for d in defense_list}
    adversarial = None
    if args.adversarial:
        adversarial, attacks = _open_adversarial(ctx, args.adversarial)
    else:
        attacks = attacks_of(args, args.attack)
    attack_for = {(a.name, d.name): _attack_for(args, d, a) for a in attacks for d in defense_list}
    config = _evaluation_config(ctx, defenses, attacks, adversarial)
    records = _evaluate_into(ctx, args.out, defenses, attacks, config, adversarial,
                             lambda attack, defense: attack_for[(attack.name, defense.name)])
    if records is None:
        return None
    results = {"config": config, "records": records, "average": average_records(records), "unreadable": ctx.unreadable()}
    _write_results(args, results)
    return results


def run_attack(args: argparse.Namespace, group: distributed.ProcessGroup, device: torch.device) -> AdversarialSet | None:
    """``counterattack attack``: craft and store the paper protocol's adversarial images, resumable."""
    if args.threat != "paper":
        raise CounterattackError("counterattack attack stores the paper protocol's images (crafted against the undefended "
                                 "model); adaptive attacks go through each defense: use `counterattack eval --threat adaptive`.")
    ctx, _ = _context(args, group, device, [], args.attack)
    adversarial = _craft_into(ctx, args.out, attacks_of(args, args.attack))
    if group.is_main:
        count = sum(len(ids) for ids in ctx.expected().values())
        print(f"{count} images x {len(args.attack)} attack(s) stored in {args.out}; evaluate them with "
              f"`counterattack eval --adversarial {args.out} ...` (same model and data flags).")
    return adversarial


def parse_grid(texts: Sequence[str], defense: str) -> list[dict[str, Any]]:
    """``["tau_thres=0,0.1", "eps=2,4"]`` -> every combination, as settings in the library's units (cartesian product)."""
    by_name = {f.name: f for f in options_of(DEFENSES[defense])}
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
        parse, setting = option_parser(by_name[name]), by_name[name]
        try:
            parsed = [parse(v.strip()) for v in values.split(",") if v.strip()]
        except argparse.ArgumentTypeError as exc:
            raise CounterattackError(f"--grid {name}: {exc}.") from None
        if not parsed:
            raise CounterattackError(f"--grid {name}: no values.")
        axes[name] = [v * PIXEL if setting.metadata["unit"] == PIXEL_UNIT else v for v in parsed]
    return [dict(zip(axes, combination)) for combination in itertools.product(*axes.values())]


def _cli_setting(defense: str, setting: Mapping[str, Any]) -> dict[str, Any]:
    """A sweep point's values as the command line writes them (budgets in 1/255)."""
    fields_by_name = {f.name: f for f in dataclass_fields(DEFENSES[defense])}
    return {k: cli_value(v, fields_by_name[k].metadata) for k, v in setting.items()}


def _setting_label(defense: str, setting: Mapping[str, Any]) -> str:
    """``ttc tau_thres=0.1 eps=2``: a sweep point's name, budgets in 1/255."""
    return " ".join([defense, *(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                for k, v in _cli_setting(defense, setting).items())])


def _single_defense(args: argparse.Namespace) -> str:
    """The one defense a sweep or a calibration studies, checked with the other cheap things before anything loads."""
    names = args.defense
    check_defense_names(names)
    _check_adversarial_flags(args)
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
    adversarial = _craft_into(ctx, ctx.args.out / "adversarial", attacks_of(ctx.args, attack_names))
    return adversarial, _stored_attacks(adversarial)


def run_sweep(args: argparse.Namespace) -> dict | None:
    """``counterattack sweep``: every setting of a grid over one defense's options, on one adversarial set
    (``--seeds``: once per seed, see ``over_seeds``)."""
    return over_seeds(args, _run_sweep, _write_sweep)


def _run_sweep(args: argparse.Namespace, group: distributed.ProcessGroup, device: torch.device) -> dict | None:
    name = _single_defense(args)
    grid = parse_grid(args.grid, name)
    settings = {_setting_label(name, setting): setting for setting in grid}
    if len(settings) != len(grid):
        raise CounterattackError(f"--grid repeats a setting ({len(grid)} combinations, {len(settings)} distinct at 6 digits).")
    ctx, (base,) = _context(args, group, device, [name], args.attack)
    defenses: dict[str, Defense] = {"none": NoDefense(), **{label: replace(base, **setting) for label, setting in settings.items()}}
    adversarial, attacks = _adversarial_for(ctx, args.attack)
    config = {**_evaluation_config(ctx, defenses, attacks, adversarial), "sweep": {"defense": name, "grid": args.grid}}
    records = _evaluate_into(ctx, args.out, defenses, attacks, config, adversarial)
    if records is None:
        return None
    for record in records:
        record["setting"] = _cli_setting(name, settings.get(record["defense"], {}))
    results = {"config": config, "records": records, "average": average_records(records), "unreadable": ctx.unreadable()}
    _write_sweep(args, results)
    return results


def _write_sweep(args: argparse.Namespace, results: dict) -> None:
    """A Pareto plot per dataset and attack, then what ``eval`` writes."""
    records, name = results["records"], results["config"]["sweep"]["defense"]
    plots = []
    pairs = list(dict.fromkeys((r["dataset"], r["attack"]) for r in records))
    for dataset, attack in pairs:
        these = [r for r in records if r["dataset"] == dataset and r["attack"] == attack]
        points = [{**r, "label": r["defense"].removeprefix(f"{name} ")} for r in these if r["defense"] != "none"]
        baseline = next(r for r in these if r["defense"] == "none")
        path = args.out / ("pareto.png" if len(pairs) == 1 else f"pareto-{safe_file_name(short_name(dataset))}-{attack}.png")
        seeds = f", mean of {len(results['config']['seeds'])} seeds" if results["config"].get("seeds") else ""
        plots.append(plot_pareto(points, path, baseline,
                                 title=f"{name} on {short_name(dataset)}, {attack} ({baseline['n']} images{seeds})"))
    _write_results(args, results, also=f"; Pareto plot(s): {', '.join(map(str, plots))}")


def _scores(batches: Sequence[dict], defense: str, attack: str) -> tuple[list[float], list[float]]:
    """Per image, the gate's score on the clean and on the adversarial images (one dataset)."""
    clean, adv = [], []
    for batch in batches:
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

    def evaluate(folder: str, defense: Defense) -> tuple[dict, dict[str, dict]]:
        """The run's configuration and, on the main process, its record per attack."""
        defenses = {name: defense}
        config = _evaluation_config(ctx, defenses, attacks, adversarial)
        records = _evaluate_into(ctx, args.out / folder, defenses, attacks, config, adversarial)
        group.barrier()
        return config, {r["attack"]: r for r in records or []}

    config, before = evaluate("current", current)
    dataset = ctx.loaded[0].name
    # Every process needs the threshold: each reads the scores the processes wrote.
    scored = ResultsStore(args.out / "current").complete_batches(ctx.expected())
    clean_scores, _ = _scores(scored, name, attacks[0].name)
    chosen_threshold = threshold_at_fpr(clean_scores, args.target_fpr, flagged_above)
    chosen = replace(current, tau_thres=chosen_threshold)
    chosen_folder = f"at-{chosen_threshold:.6g}"  # another --target-fpr adds a folder rather than clashing
    _, after = evaluate(chosen_folder, chosen)
    if not group.is_main:
        return None

    entries, plots = [], []
    for attack in attacks:
        clean, adv = _scores(scored, name, attack.name)
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
    results = {"config": config, "calibration": entries}
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


def run_sanity_command(args: argparse.Namespace) -> bool:
    device = _device(args.device)
    clip, _, (defense,) = _setup(args, [args.defense], [args.attack], device)
    (attack,) = attacks_of(args, [args.attack])
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
