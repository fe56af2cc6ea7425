"""What every command that runs shares, each built or read once: the model, the datasets and the images chosen
from them, the attacks (crafted, or a stored set's), the defenses and the run settings.

``open_run`` checks everything cheap before anything loads (names, settings, templates, a stored set's
configuration, datasets that must be fetched by hand), so a typo fails in seconds rather than after
the model and the data have loaded.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..adaptive import AdaptiveAttack, check_adaptive
from ..claims import apply_verdict, check_masking, leakage_warnings
from ..defenses.base import ADAPTIVE_METHODS
from ..adversarial import AdversarialSet
from ..attacks import Attack, build_attacks
from ..backbones import load_clip, tensors_fingerprint, weights_identity
from ..classifier import ImageEncoder, ZeroShotClassifier
from ..config import RunConfig
from ..data import (
    EvalDataset, balanced_subset, check_manual_datasets, find_unreadable, load_dataset,
)
from ..defenses import DEFENSES, Defense, build_defenses
from ..descriptions import RunDescriptions, check_coverage, for_run
from .checks import check_stored_attacks, stored_attacks
from .estimate import Estimate
from ..distributed import ProcessGroup
from ..errors import CounterattackError
from ..gallery import write_batch as write_gallery_batch
from ..gallery import write_index as write_gallery_index
from ..fingerprints import resolved_location
from ..identity import adversarial_set_description, inputs_identity
from ..evaluate import PROBE_IMAGES, RunSettings, craft_dataset, evaluate_dataset
from ..summary import average_records, combine_seeds, summarize
from ..loading import LoadedCLIP
from ..models import load_vision_checkpoint
from ..report import TABLE_KEY, format_table, paper_tables, warnings_of, write_report
from ..records import BatchRecord, Record, Results, RunDescription
from ..results import ResultsStore
from ..store import fill, write_json_atomically


@dataclass
class Evaluation:
    """A finished evaluation: every batch's per-image results, and the summary records."""

    batches: list[BatchRecord]
    records: list[Record]


@dataclass
class Selection:
    """One dataset and the images a run evaluates of it (less undecodable files skipped on request)."""

    data: EvalDataset
    chosen: list[int]
    skipped: list[dict]

    @property
    def ids(self) -> list:
        return [self.data.image_ids[i] for i in self.chosen]


class RunContext:
    """The loaded model, datasets, attacks and defenses of one run, and its settings."""

    def __init__(self, config: RunConfig, group: ProcessGroup, device: torch.device, clip: LoadedCLIP,
                 tau_encoder: ImageEncoder | None, tau_model: str, tau_identity: dict | None,
                 selections: list[Selection], attacks: list[Attack], defenses: dict[str, Defense],
                 adversarial: AdversarialSet | None):
        self.config, self.group, self.device, self.clip = config, group, device, clip
        self.tau_encoder, self.tau_model = tau_encoder, tau_model  # TTC's tau encoder (None: the defended one)
        self.selections, self.attacks, self.defenses, self.adversarial = selections, attacks, defenses, adversarial
        self._classifiers: dict[str, ZeroShotClassifier] = {}
        self.descriptions: RunDescriptions | None = None  # the class descriptions read, per dataset
        model = config.model
        # By the tensors loaded, once per run: another path to the same weights is the same run, new weights behind a
        # path are not, and a file beside them changes nothing.
        self.weights = weights_identity(model.name, model.pretrained_tag, clip)
        if model.vision_checkpoint is not None:
            self.weights["vision_checkpoint"] = tensors_fingerprint(clip.model.visual)
        self.weights_location = resolved_location(model.name, model.pretrained_tag, model.vision_checkpoint)
        separate = model.tau_model not in (None, "defended")  # another model's weights: by content too
        self.tau_identity = tau_identity if separate else tau_model
        self.tau_location = resolved_location(model.tau_model, model.tau_pretrained, None) if separate else None
        run = config.run
        workers = run.workers
        if workers is None:  # more loader processes keep a GPU busy
            import os

            workers = min(8 if device.type == "cuda" else 4, os.cpu_count() or 1)
        stored = None if adversarial is None else adversarial.config
        self.settings = RunSettings(run.seed, config.data.limit, run.batch_size, workers, device, run.progress,
                                    group.rank, group.world_size, config.precisions["attack"],
                                    config.precisions["defense"], config.attack.quantize,
                                    attack_labels=config.attack.labels or (stored.attack_labels if stored else "true"))

    def with_seed(self, seed: int) -> RunContext:
        """The same loaded run under another seed (``--seeds``), writing under ``out/seed-S``."""
        other = copy.copy(self)
        other.config = self.config.for_seed(seed)
        other.settings = replace(self.settings, seed=seed)
        return other

    def classifier(self, data: EvalDataset) -> ZeroShotClassifier:
        """The zero-shot classifier of a dataset's classes (built once per dataset)."""
        if data.name not in self._classifiers:
            descriptions = None if self.descriptions is None else self.descriptions.by_dataset[data.name]
            self._classifiers[data.name] = ZeroShotClassifier.from_clip(
                self.clip, data.class_names, self.config.model.templates or data.templates, descriptions=descriptions)
        return self._classifiers[data.name]

    def expected(self) -> dict[str, list]:
        return {s.data.name: s.ids for s in self.selections}

    def unreadable(self) -> list[dict]:
        return [entry for s in self.selections for entry in s.skipped]

    def gallery_sample(self, selection: Selection) -> list:
        """The ids of the images a run keeps for its gallery, in the run's order: a class-balanced sample of
        ``--gallery`` of the chosen images (none for 0), the same whatever the batching."""
        wanted = self.config.run.gallery
        if not wanted:
            return []
        data, chosen = selection.data, selection.chosen
        return [data.image_ids[chosen[i]] for i in balanced_subset([data.targets[j] for j in chosen], wanted)]

    def probing(self, attacks: Sequence[Attack]) -> RunSettings:
        """The run settings with a small first batch, for an estimate within seconds, where batching changes no
        result (an attack seeded per batch makes it matter)."""
        seeded = any(getattr(a, "seeded_per_batch", False) for a in attacks)
        return replace(self.settings, probe=0 if seeded else PROBE_IMAGES)

    def adaptive_attacks(self, attack: Attack, defense: Defense) -> dict[str, Attack]:
        """The attacks a defense faces besides ``attack`` itself (crafted against the undefended model): none under the
        paper's protocol, else ``attack`` through the defense, exact and straight-through (both, so that a masked
        gradient shows as the straight-through attack being the stronger)."""
        if self.config.attack.threat == "paper":
            return {}
        return {method: AdaptiveAttack(defense, attack, method=method, **self.config.attack.adaptive)
                for method in ADAPTIVE_METHODS}

    def results(self, described: RunDescription, records: list[Record]) -> Results:
        """What results.json holds: the run's description, the records, their averages, the images left out."""
        return Results(described, records, average_records(records), self.unreadable())

    def evaluate_into(self, out: Path, defenses: Mapping[str, Defense], attacks: Sequence[Attack],
                      described: RunDescription) -> Evaluation | None:
        """Evaluate ``defenses`` (the name records carry -> defense) into the results store ``out``, resuming what is
        there; on the main process, its per-batch results and summary records (None on the others)."""
        store = ResultsStore(out, self.group.rank)
        threat = self.config.attack.threat

        gallery = {s.data.name: self.gallery_sample(s) for s in self.selections}

        def keep(dataset: str, items: list) -> None:  # written before the batch's line: a rerun writes them again
            write_gallery_batch(out, self.group.rank, store.digest, dataset, items)

        def evaluate_my_share(done: dict[str, set]) -> None:
            settings = self.probing(attacks)
            estimate = Estimate(self, done, settings.probe)
            for selection in self.selections:
                data = selection.data
                on_data = {name: defense.for_dataset(data.name) for name, defense in defenses.items()}
                for batch in evaluate_dataset(self.classifier(data), data, attacks, on_data, settings,
                                              done.get(data.name, ()), self.adaptive_attacks, selection.chosen,
                                              self.adversarial, gallery[data.name], keep):
                    store.append(batch)
                    estimate.after(len(batch.ids))
                settings = replace(settings, probe=0)  # one probe per run

        batches = fill(store, described, self.expected(), self.group, evaluate_my_share)
        if not self.group.is_main:
            return None
        if any(gallery.values()):
            write_gallery_index(out, store.digest, {s.data.name: s.data.class_names for s in self.selections},
                                [(name, image_id) for name, ids in gallery.items() for image_id in ids])
        adaptive = None
        if threat == "adaptive":
            settings = described.adaptive
            adaptive = (f"exact and bpda, eot {settings['eot_samples']}, "
                        f"gate weight {settings['gate_weight']:g}, {settings['select']}-draw selection")
        records = summarize(batches, list(self.expected()), list(defenses), [a.name for a in attacks], threat, adaptive,
                            described.attack_labels)
        if threat == "adaptive":
            self._judge_masking(defenses, attacks, batches, records)
        leakage_warnings(records)
        return Evaluation(batches, records)

    def _judge_masking(self, defenses: Mapping[str, Defense], attacks: Sequence[Attack],
                       batches: list[BatchRecord], records: list[Record]) -> None:
        """Each dataset and defense's gradient-masking verdict, into its records (on the main process)."""
        for selection in self.selections:
            data = selection.data
            for name, defense in defenses.items():
                verdict = check_masking(self.classifier(data), data, selection.chosen, name,
                                        defense.for_dataset(data.name), attacks, self.config.attack.adaptive,
                                        self.settings, batches, records, self.config.attack.convergence_images,
                                        self.adversarial)
                apply_verdict(records, data.name, name, verdict,
                              f"`counterattack sanity --threat adaptive --defense {name}` with this run's model, "
                              "one dataset and one attack")

    def craft_into(self, folder: Path, attacks: Sequence[Attack]) -> AdversarialSet:
        """Craft the paper protocol's adversarial images of every chosen image into ``folder``, resuming what is
        there."""
        described = adversarial_set_description(self, attacks)
        adversarial = AdversarialSet(folder, self.group.rank)

        def craft_my_share(done: dict[str, set]) -> None:
            settings = self.probing(attacks)
            estimate = Estimate(self, done, settings.probe)
            for selection in self.selections:
                data = selection.data
                for ids, labels, targets, images in craft_dataset(self.classifier(data), data, attacks, settings,
                                                                  done.get(data.name, ()), selection.chosen):
                    adversarial.append(data.name, ids, labels, images,
                                       None if settings.attack_labels == "true" else targets)
                    estimate.after(len(ids))
                settings = replace(settings, probe=0)

        fill(adversarial, described, self.expected(), self.group, craft_my_share)
        return AdversarialSet.open(folder)

    def adversarial_set(self) -> AdversarialSet:
        """The stored set a study reads: ``--adversarial``, else the paper protocol's images crafted once into
        ``out/adversarial`` (and read back, so every study judges the stored images)."""
        if self.adversarial is None:
            self.adversarial = self.craft_into(self.config.out / "adversarial", self.attacks)
            self.attacks = stored_attacks(self.adversarial)
        return self.adversarial


def _select(config: RunConfig, data: EvalDataset) -> Selection:
    """The images to evaluate: the class-balanced subset, less undecodable files under ``skip_unreadable``.

    Every selected file is decoded once before any compute, so a corrupt image stops the run in
    seconds, naming the file, rather than hours in with a traceback.
    """
    chosen = balanced_subset(data.targets, config.data.limit)
    unreadable = find_unreadable(data, chosen, progress=config.run.progress)
    if unreadable and not config.data.skip_unreadable:
        first = next(iter(unreadable))
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise CounterattackError(
            f"cannot decode {data.files[first]}: {unreadable[first]}{more}. Replace or remove the file(s), "
            "or pass --skip-unreadable to leave them out (they are then listed in results.json)."
        )
    skipped = [{"dataset": data.name, "id": data.image_ids[i], "file": data.files[i], "error": reason}
               for i, reason in unreadable.items()]
    return Selection(data, [i for i in chosen if i not in unreadable], skipped)


def _tau_encoder(config: RunConfig, clip: LoadedCLIP,
                 device: torch.device) -> tuple[ImageEncoder | None, str, dict | None]:
    """Swap in the vision checkpoint, if any; return TTC's tau encoder (None: the defended one), its name and, for
    another model, its weights' identity."""
    model = config.model
    base = None
    if model.vision_checkpoint:
        base = ImageEncoder.from_clip(clip)
        base.visual = copy.deepcopy(base.visual)  # the original weights, before the swap
        load_vision_checkpoint(clip, model.vision_checkpoint)
    if model.tau_model == "defended" or (model.tau_model is None and base is None):
        return None, "defended", None
    if model.tau_model is None:
        return base, f"base ({model.name})", None
    other = load_clip(model.tau_model, model.tau_pretrained, device=device)
    name = model.tau_model if ":" in model.tau_model else f"{model.tau_model} ({model.tau_pretrained})"
    return ImageEncoder.from_clip(other), name, weights_identity(model.tau_model, model.tau_pretrained, other)


def open_run(config: RunConfig, group: ProcessGroup, device: torch.device,
             defenses: Mapping[str, Callable[[Defense], Defense]] | None = None) -> RunContext:
    """Check, then load: the model, the datasets (downloads on the main process first), the chosen images.

    ``defenses`` maps the name results are recorded under to how each is made from the built defense
    of ``config.defense.names`` (a sweep's settings of one defense); default: each under its own name.
    """
    DEFENSES.check_names(config.defense.names)
    built = build_defenses(config.defense.names, config.defense.settings)  # bad settings fail here, before loading
    adversarial = AdversarialSet.open(config.adversarial) if config.adversarial else None
    if adversarial is not None:
        attacks = stored_attacks(adversarial)
        check_stored_attacks(config, adversarial, attacks)
    else:
        attacks = build_attacks(config.attack.names, config.attack.settings, **config.attack.shared)
    if config.attack.threat == "adaptive":
        for attack in attacks:
            check_adaptive(attack, config.attack.adaptive)
    for template in config.model.templates or ():
        if template.count("{}") != 1:
            raise CounterattackError(f"Template {template!r} must contain '{{}}' exactly once.")
    # Every dataset is found before any work starts, so a missing one fails in seconds, not hours in.
    check_manual_datasets(config.data.datasets, config.data.root)
    descriptions = for_run(config.model.descriptions, config.data.datasets, built)

    clip = load_clip(config.model.name, config.model.pretrained, device=device)
    tau_encoder, tau_model, tau_identity = _tau_encoder(config, clip, device)
    if tau_encoder is not None:
        built = [d.with_score_encoder(tau_encoder) for d in built]
    by_name = {d.name: d for d in built}
    named = {name: make(by_name[config.defense.names[0]]) for name, make in defenses.items()} if defenses else by_name

    def load_all() -> list[EvalDataset]:
        return [load_dataset(spec, clip, config.data.root, prompts=config.model.prompts,
                             transform=config.data.transform, progress=config.run.progress)
                for spec in config.data.datasets]

    loaded = group.first_on_main(load_all)  # downloads once; the others then read what it fetched
    if descriptions is not None:  # keyed by the names given: a dataset's loaded name may be its resolved folder
        descriptions = RunDescriptions(*({data.name: mapping[spec] for spec, data in zip(config.data.datasets, loaded,
                                                                                            strict=True)}
                                         for mapping in (descriptions.by_dataset, descriptions.digests)))
        for data in loaded:
            check_coverage(descriptions, data.name, data.class_names, built)
    selections = group.together(lambda: [_select(config, data) for data in loaded])
    context = RunContext(config, group, device, clip, tau_encoder, tau_model, tau_identity, selections, attacks, named,
                         adversarial)
    context.descriptions = descriptions
    if adversarial is not None:
        adversarial.check_identity(inputs_identity(context))
        adversarial.check_complete(context.expected())
    return context


def write_results(out: Path, results: Results, also: str = "") -> None:
    """results.json, the table on the terminal, and the report, in ``out``."""
    write_json_atomically(out / "results.json", results.to_json())
    records = results.records
    print(format_table(records))
    print(TABLE_KEY)
    if len({r.dataset for r in records}) > 1:
        print("\n" + paper_tables(records))
    for warning in warnings_of(records):
        print(f"WARNING: {warning}", file=sys.stderr)
    written = write_report(out)
    print(f"\nresults: {out / 'results.json'}; report: {written[0]}{also}")


def over_seeds(context: RunContext, run: Callable[[RunContext], Results | None],
               write: Callable[[Path, Results], None]) -> Results | None:
    """``run(context)`` once, or with ``--seeds`` once per seed (each under ``out/seed-S``, the model and the data
    loaded once); then the mean and sample standard deviation of every accuracy, written by ``write(out, results)``.
    The results on the main process, None on the others of a torchrun group."""
    seeds = context.config.run.seeds
    if not seeds:
        return run(context)
    runs = [run(context.with_seed(seed)) for seed in seeds]
    if runs[0] is None:
        return None
    records = combine_seeds([one.records for one in runs], seeds)
    # One stored set only where --adversarial named it; otherwise each seed crafted its own.
    described = replace(runs[0].config, seed=None, seeds=list(seeds),
                        adversarial=runs[0].config.adversarial if context.config.adversarial else None)
    results = Results(described, records, average_records(records), runs[0].unreadable)
    print(f"\nmean over seeds {', '.join(map(str, seeds))} (± sample standard deviation):")
    write(context.config.out, results)
    return results
