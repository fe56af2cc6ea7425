"""``counterattack stability``: the TTC paper's preliminary experiment, "adversarial images are falsely stable".

For each dataset and each uniform-noise budget of ``--noise``, TTC's tau (the relative shift of the
image embedding under one draw of that noise, on TTC's tau encoder) on clean and on adversarial
images: its mean and quantiles, its ROC AUC as a detector of adversarial images (a low tau flags),
and the paper's bar chart, beside the poster's values where the dataset is one it charted.

Each budget is evaluated as TTC that never counterattacks (``tau_thres`` 0), so the run is an
ordinary evaluation: the same data, model, seed, results store, resumption and torchrun as ``eval``,
and ``--adversarial`` reuses a stored set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..calibration import roc_auc
from ..config import RunConfig
from ..data import short_name
from ..defenses import TTC
from ..distributed import ProcessGroup
from ..identity import evaluation_description
from ..options import PIXEL
from ..plots import plot_stability, safe_file_name
from ..published import load_published
from ..records import BatchRecord, RunDescription
from ..store import write_atomically, write_json_atomically
from .context import RunContext, open_run

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def budget_label(budget: float) -> str:
    return f"noise {budget / PIXEL:g}/255"


def _summary(scores: Sequence[float]) -> dict:
    values = np.asarray(scores, dtype=np.float64)
    return {"mean": float(values.mean()),
            "quantiles": dict(zip(map(str, QUANTILES), np.quantile(values, QUANTILES).tolist(), strict=True))}


def summarize_stability(batches: Sequence[BatchRecord], budgets: Sequence[float], attack: str) -> list[dict]:
    """Per dataset and budget: tau's mean and quantiles on clean and adversarial images, and its ROC AUC as a
    detector (a lower tau is "more likely adversarial", the paper's falsely stable images)."""
    rows = []
    for dataset in dict.fromkeys(batch.dataset for batch in batches):
        for budget in budgets:
            label = budget_label(budget)
            clean, adv = [], []
            for batch in batches:
                if batch.dataset == dataset:
                    clean += batch.defenses[label].clean.gate_scores()
                    adv += batch.defenses[label].adv[attack].gate_scores()
            auc = roc_auc([-x for x in clean], [-x for x in adv])
            rows.append({"dataset": dataset, "attack": attack, "noise_eps": round(budget / PIXEL, 6), "n": len(clean),
                         "clean": _summary(clean), "adversarial": _summary(adv), "auc": auc})
    return rows


def _published_tau(dataset: str) -> dict[float, tuple[float, float]]:
    """The poster's chart values for this dataset (noise budget in 1/255 -> mean tau clean, adversarial), if any."""
    return {entry.noise_eps: (entry.tau_clean, entry.tau_adv) for entry in load_published().tau
            if entry.dataset == dataset}


def _markdown(rows: Sequence[dict], config: RunDescription) -> str:
    tau_model = config.tau_model
    if isinstance(tau_model, dict):  # another model, identified by its weights: name where they were read from
        tau_model = config.run.get("tau_weights_from", {}).get("model") or tau_model.get("model")
    lines = ["# Stability of the image embedding under uniform noise (TTC's tau)", "",
             f"Model {config.model}, tau from the {tau_model} encoder; attack {rows[0]['attack']} "
             f"({config.threat} protocol); seed {config.seed}. tau = ||f(x + delta0) - f(x)|| / ||f(x)|| with "
             "delta0 ~ U[-noise, noise]; AUC: tau as a detector of adversarial images, a low tau flagging "
             "(0.5: no better than chance).", ""]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        published = _published_tau(dataset)
        lines += [f"## {short_name(dataset)}", "",
                  "| noise | n | tau clean: mean (5/25/50/75/95%) | tau adversarial: mean (5/25/50/75/95%) | AUC |"
                  + (" poster (clean / adversarial) |" if published else ""),
                  "|---|---|---|---|---|" + ("---|" if published else "")]
        for r in (r for r in rows if r["dataset"] == dataset):
            def cell(summary: dict) -> str:
                return f"{summary['mean']:.4f} ({' / '.join(f'{q:.4f}' for q in summary['quantiles'].values())})"

            poster = published.get(r["noise_eps"])
            extra = (f" {poster[0]:.3f} / {poster[1]:.3f} |" if poster else " - |") if published else ""
            lines.append(f"| {r['noise_eps']:g}/255 | {r['n']} | {cell(r['clean'])} | {cell(r['adversarial'])} | "
                         f"{r['auc']:.3f} |{extra}")
        if published:
            lines += ["", "Poster values: the TTC poster's chart, read by pixel measurement (about +-0.003), ViT-B/32."]
        lines.append("")
    return "\n".join(lines)


def write_stability(out: Path, rows: list[dict], config: RunDescription) -> list[Path]:
    write_json_atomically(out / "stability.json", {"config": config.to_json(), "stability": rows})
    text = _markdown(rows, config)
    write_atomically(out / "stability.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    plots = []
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    for dataset in datasets:
        these = [r for r in rows if r["dataset"] == dataset]
        name = "stability.png" if len(datasets) == 1 else f"stability-{safe_file_name(short_name(dataset))}.png"
        plots.append(plot_stability(these, _published_tau(dataset), out / name,
                                    f"{short_name(dataset)}: tau under uniform noise ({these[0]['n']} images, "
                                    f"{these[0]['attack']})"))
    return [out / "stability.json", out / "stability.md", *plots]


def measure(context: RunContext) -> list[dict] | None:
    """Evaluate every noise budget into ``--out`` (resuming), then summarize on the main process."""
    config = context.config
    adversarial = context.adversarial
    load_published()  # the poster's values: a damaged package is found before the run, not after it
    budgets = config.study.noise
    probes = {budget_label(b): TTC(eps=b, tau_thres=0.0, tau_encoder=context.tau_encoder) for b in budgets}
    described = replace(evaluation_description(context, probes, context.attacks), stability={"noise": list(budgets)})
    evaluation = context.evaluate_into(config.out, probes, context.attacks, described)
    if evaluation is None:
        return None
    rows = [row for attack in context.attacks for row in summarize_stability(evaluation.batches, budgets, attack.name)]
    written = write_stability(config.out, rows, described)
    for r in rows:
        print(f"{short_name(r['dataset'])} {r['attack']} noise {r['noise_eps']:g}/255: "
              f"tau clean {r['clean']['mean']:.4f}, adversarial {r['adversarial']['mean']:.4f}, "
              f"AUC {r['auc']:.3f} ({r['n']} images)")
    print(f"\n{', '.join(map(str, written))}"
          + ("" if adversarial is None else f" (adversarial images from {adversarial.folder})"))
    return rows


def run(config: RunConfig, group: ProcessGroup, device: torch.device) -> list[dict] | None:
    return measure(open_run(config, group, device))
