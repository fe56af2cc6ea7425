"""Claims that cannot hide: label leakage and gradient masking, checked on every run.

**Label leakage.** An attack crafted with the true label moves the image away from that class; a defense that pushes
the image back along the perturbation walks it towards the true class, and can then be "right" on images the model
gets wrong when clean. Every record carries ``fixed_by_attack`` (the share of images wrong when clean, right when
attacked); a record whose robust accuracy is above its clean accuracy, or whose ``fixed_by_attack`` is large against
the undefended model's, gets a warning naming the check: the same run with ``--attack-labels predicted``.

**Gradient masking** (Athalye et al., ICML 2018; Croce et al., ICML 2022). Under ``--threat adaptive``, per dataset
and defense: (a) the input gradient through the defense (its exact view, at the attacks' precision) against the
undefended model's: zero, or below ``VANISHING`` of it, is masked; (b) the straight-through (bpda) attack clearly
stronger than the exact one: the exact gradient is masked; (c) the transfer attack clearly stronger than the attacks
through the defense: their gradient misleads them; (d) the adaptive attacks again with twice the steps and twice the
EOT draws on a subset: more than a point lower means the number is not converged. The verdict (``masking``: "none",
or the reasons) goes into every record of that dataset and defense; its robust accuracy is already the worst case
over transfer, exact and bpda.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from scipy.stats import binomtest

from .adaptive import AdaptiveAttack
from .adversarial import AdversarialSet
from .attacks import Attack
from .classifier import ZeroShotClassifier
from .data import EvalDataset, balanced_subset, short_name
from .defenses import Defense
from .evaluate import RunSettings, attack_targets, evaluate_dataset, image_batches
from .inputs import checked_inputs
from .precision import precision_context
from .records import BatchRecord, Record
from .summary import WORST_CASE

VANISHING = 1e-3  # an input gradient below this share of the undefended model's (median over images) is masked
CLEARLY = 2.0  # points by which one attack must beat another to say so (and at least MIN_IMAGES images)
MIN_IMAGES = 3
CONVERGED = 1.0  # points a doubled attack may take off before the number is not converged
LEAKING_P = 0.01  # robust above clean beyond chance: a one-sided sign test on the images fixed and broken
LEAKING_SHARE = 0.5  # the share of clean-wrong images the attack fixes: at least this, and twice the undefended's


# --- label leakage ------------------------------------------------------------------------------------------------


def _counts(record: Record) -> tuple[int, int, int]:
    """(fixed, broken, wrong when clean) image counts of a record: robust - clean = fixed - broken."""
    n = record.n
    fixed = round(record.fixed_by_attack * n / 100)
    return fixed, fixed - round((record.robust_acc - record.clean_acc) * n / 100), n - round(record.clean_acc * n / 100)


def leakage_warnings(records: Sequence[Record]) -> None:
    """Add, to each record that shows it, a warning that the attack's labels may leak through the defense: robust
    accuracy above clean beyond chance (a sign test on the images the attack fixed and broke), or an attack that
    makes most of the images wrong when clean right, twice as often as on the undefended model."""
    undefended = {(r.dataset, r.attack): r for r in records if r.defense == "none"}
    for record in records:
        if record.defense == "none" or record.fixed_by_attack is None:
            continue
        fixed, broken, wrong = _counts(record)
        reasons = []
        if fixed > broken and binomtest(fixed, fixed + broken, alternative="greater").pvalue < LEAKING_P:
            reasons.append(f"robust {record.robust_acc:.1f}% is above clean {record.clean_acc:.1f}% ({fixed} images "
                           f"fixed by the attack, {broken} broken)")
        share = fixed / wrong if wrong else 0.0
        baseline = undefended.get((record.dataset, record.attack))
        known = baseline is not None and baseline.fixed_by_attack is not None
        base_fixed, _, base_wrong = _counts(baseline) if known else (0, 0, 0)
        base_share = base_fixed / base_wrong if base_wrong else 0.0
        # At least MIN_IMAGES fixed images: on a handful (2 of 2 clean-wrong images) the share is noise.
        if fixed >= MIN_IMAGES and share >= LEAKING_SHARE and share >= 2 * base_share:
            reasons.append(f"the attack makes {share:.0%} of the images wrong when clean right (undefended: "
                           f"{base_share:.0%})" if baseline else f"the attack makes {share:.0%} of the images wrong "
                           "when clean right")
        if not reasons:
            continue
        check = ("the attacks used the true labels: run the same command with --attack-labels predicted, under which "
                 "a defense that reads the answer off the perturbation gains nothing" if record.attack_labels == "true"
                 else "the attacks used the clean predictions already")
        _warn(record, f"label leakage? {record.defense} on {short_name(record.dataset)} under {record.attack}: "
                      f"{' and '.join(reasons)}; {check}.")


def _warn(record: Record, text: str) -> None:
    record.warnings = [*(record.warnings or []), text]


# --- gradient masking ---------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """Why a defense's gradient looks masked (no reasons: it does not), with what was measured."""

    reasons: list[str]
    gradient_ratio: float | None = None
    convergence_drop: float | None = None

    @property
    def masking(self) -> str:
        return "; ".join(self.reasons) or "none"


def gradient_ratio(classifier: ZeroShotClassifier, defense: Defense, attack: Attack, images: torch.Tensor,
                   targets: torch.Tensor, streams, precision: str) -> float:
    """The median over images of the input gradient's norm through the defense's exact view, divided by the
    undefended model's, for the attack's loss at the attacks' precision."""
    loss = getattr(attack, "loss", None) or (lambda logits, labels: torch.nn.functional.cross_entropy(
        logits, labels, reduction="none"))

    def norms(logits_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        x = images.detach().clone().requires_grad_(True)
        with torch.enable_grad(), precision_context(images.device, precision), checked_inputs():
            (grad,) = torch.autograd.grad(loss(logits_of(x), targets).sum(), x)
        return grad.flatten(1).norm(dim=1)

    through = norms(lambda x: defense.attack_view(classifier, x, streams, "exact").logits)
    bare = norms(classifier.logits)
    return float(statistics.median((through / bare.clamp(min=1e-30)).tolist()))


def _gap(better: float | None, worse: float | None, n: int) -> float | None:
    """How many points ``worse`` lies below ``better`` when that is clear (CLEARLY points and MIN_IMAGES images)."""
    if better is None or worse is None:
        return None
    gap = better - worse
    return gap if gap > CLEARLY and gap * n / 100 >= MIN_IMAGES else None


def masking_verdict(records: Sequence[Record], ratio: float | None, drop: float | None, subset: int) -> Verdict:
    """The verdict on one dataset and defense from its records' components, the gradient ratio and the convergence
    check's drop (points, on ``subset`` images)."""
    verdict = Verdict([], ratio, drop)
    if ratio is not None and ratio == 0.0:
        verdict.reasons.append("zero input gradient through the defense")
    elif ratio is not None and ratio < VANISHING:
        verdict.reasons.append(f"vanishing input gradient ({ratio:.1e} of the undefended model's)")
    for record in records:
        if record.attack == WORST_CASE:
            continue
        if (gap := _gap(record.robust_acc_exact, record.robust_acc_bpda, record.n)) is not None:
            verdict.reasons.append(f"bpda beats exact by {gap:.1f} points under {record.attack}")
        adaptive = min((v for v in (record.robust_acc_exact, record.robust_acc_bpda) if v is not None), default=None)
        if (gap := _gap(adaptive, record.robust_acc_transfer, record.n)) is not None:
            verdict.reasons.append(f"the transfer attack beats the adaptive ones by {gap:.1f} points under "
                                   f"{record.attack}")
    if drop is not None and drop > CONVERGED:
        verdict.reasons.append(f"not converged: twice the steps and EOT draws take {drop:.1f} points more on "
                               f"{subset} images")
    return verdict


def _robust_by_image(batches: Sequence[BatchRecord], defense: str, attack: str) -> dict:
    return {(b.dataset, i): p == y for b in batches for i, p, y in
            zip(b.ids, b.defenses[defense].adv[attack].pred, b.labels, strict=True)}


def check_masking(classifier: ZeroShotClassifier, data: EvalDataset, chosen: Sequence[int], name: str,
                  defense: Defense, attacks: Sequence[Attack], adaptive: Mapping, settings: RunSettings,
                  batches: Sequence[BatchRecord], records: Sequence[Record], subset: int,
                  adversarial: AdversarialSet | None = None) -> Verdict:
    """The masking verdict of one defense on one dataset of an adaptive run: (a) on the first images, (d) on a
    class-balanced ``subset`` of the chosen images (0: skipped), (b) and (c) from the records; (a) and (d) under
    every attack, the verdict taking the smallest gradient ratio and the largest drop. Run on one process (the
    verdict is the same under torchrun); the transfer images come from ``adversarial`` where the run read them from
    a stored set, so that the doubled attacks are compared with the run on the same starting images."""
    settings = replace(settings, rank=0, world_size=1, probe=0, progress=False)
    first = next(image_batches(data, replace(settings, batch_size=16), (), chosen[:16]))
    targets = attack_targets(classifier, first, settings)
    ratio = min(gradient_ratio(classifier, defense, attack, first.images, targets, first.streams("defense-adv"),
                               settings.attack_precision) for attack in attacks)
    drop = None
    picked = [chosen[i] for i in balanced_subset([data.targets[j] for j in chosen], subset)] if subset else []
    if picked:
        eot = 2 * adaptive.get("eot_samples", 1)
        doubled = {attack.name: {method: AdaptiveAttack(defense, replace(attack, steps=2 * attack.steps),
                                                        method=method, **{**adaptive, "eot_samples": eot})
                                 for method in ("exact", "bpda")} for attack in attacks}
        again = list(evaluate_dataset(classifier, data, attacks, {name: defense}, settings,
                                      adaptive_attacks=lambda a, d: doubled[a.name], indices=picked,
                                      adversarial=adversarial))
        drops = []
        for attack in attacks:
            before = _robust_by_image(batches, name, attack.name)
            after = _robust_by_image(again, name, attack.name)
            drops.append(100.0 * (sum(before[k] for k in after) - sum(after.values())) / len(after))
        drop = max(drops)
    return masking_verdict([r for r in records if r.dataset == data.name and r.defense == name], ratio, drop,
                           len(picked))


def apply_verdict(records: Sequence[Record], dataset: str, defense: str, verdict: Verdict,
                  confirm: str) -> None:
    """Write the verdict into every record of the dataset and defense, and a warning where it finds masking."""
    for record in records:
        if record.dataset == dataset and record.defense == defense:
            record.masking = verdict.masking
            if verdict.reasons:
                _warn(record, f"masked gradients? {defense} on {short_name(dataset)}: {verdict.masking}. Its robust "
                              f"accuracy is the worst case over the transfer, exact and bpda attacks; confirm with "
                              f"{confirm}.")
