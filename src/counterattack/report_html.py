"""``counterattack report DIR --html``: one page that shows what a run measured and what each defense did.

``DIR/report.html`` reads only the run folder: results.json (configuration, identity, records, warnings), the
figures already drawn there, and the gallery the run kept (``gallery.read_gallery``). The gallery's images become
8-bit PNG files in ``DIR/report_files/`` (named by their content, so an image shown in many rows is one file); the
lossless tensors stay in ``gallery/``. The page loads nothing from elsewhere: its style and script are inline, its
images files beside it, so it opens offline and from a copied folder.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import torch
from PIL import Image

from .data import short_name
from .gallery import Item, View, read_gallery
from .records import Record, Results, RunDescription
from .report import READING, gate_thresholds, warnings_of
from .report_assets import SCRIPT, STYLE
from .store import config_hash, write_atomically

FILES = "report_files"
# Every figure a command of this library draws into a run folder, in the order the page shows them.
FIGURES = ("accuracy.png", "gate_hist_*.png", "calibration*.png", "pareto*.png", "comparison.png", "stability*.png")
GAP = 10  # pixels between pictures
SHOWN = 160  # images narrower than this are scaled up by a whole factor, pixel by pixel; wider ones shown this wide
THUMB = SHOWN // 2  # the same rule for a defense's views, shown as thumbnails


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _inline(text: str) -> str:
    """Escaped text whose `backticks` become code (the report's Markdown sentences, read as HTML)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(text))


@dataclass
class _Gate:
    score: str
    threshold: float
    above: bool  # a score above the threshold flags the image (else one below it does)


def _gates(described: Sequence[dict] | None) -> dict[str, _Gate]:
    """Each gated defense's gate, by the name its views carry."""
    from .defenses import DEFENSES

    thresholds = gate_thresholds(described or [])
    found = {}
    for entry in described or []:
        name = entry.get("name", entry["defense"])
        defense = DEFENSES.rebuild(entry)
        if name in thresholds and defense is not None:
            found[name] = _Gate(defense.gate.score, thresholds[name], defense.gate.flags_above)
    return found


# --- images ----------------------------------------------------------------------------------------------------


class _Pictures:
    """Writes each distinct 8-bit PNG once, named by its content, and remembers which files the page uses."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.used: set[str] = set()

    def add(self, pixels: torch.Tensor) -> str:
        array = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        data = buffer.getvalue()
        name = hashlib.sha256(data).hexdigest()[:20] + ".png"
        if name not in self.used and not (self.folder / name).is_file():
            write_atomically(self.folder / name, lambda tmp: tmp.write_bytes(data))
        self.used.add(name)
        return f"{FILES}/{name}"

    def prune(self) -> None:
        """Remove the PNGs an earlier report wrote that this one no longer shows."""
        for path in self.folder.glob("*.png"):
            if path.name not in self.used:
                path.unlink(missing_ok=True)


def _magnification(changes: Iterable[torch.Tensor]) -> int:
    """The largest of 1, 2, 5, 10, 20, 50, ... that keeps every change within mid-grey ± 0.5: the page's factor."""
    largest = max((float(c.abs().max()) for c in changes if c.numel()), default=0.0)
    factors = [m * 10**e for e in range(5) for m in (1, 2, 5)]
    return max((f for f in factors if f * largest <= 0.5), default=1)


def _magnified(change: torch.Tensor, factor: int) -> torch.Tensor:
    return (0.5 + change * factor).clamp(0, 1)


# --- the gallery -------------------------------------------------------------------------------------------------


def _flag_of(view: View) -> bool:
    # A defense that gates each view (MAC) flags an image when any view is flagged.
    return any(view.flagged) if isinstance(view.flagged, list) else bool(view.flagged)


def _gate_words(view: View, gate: _Gate | None) -> str:
    """The gate's score against its threshold, and its decision ("tau 0.031 < 0.2 (threshold; flags below): ...")."""
    if view.score is None:
        return ""
    name = _e(gate.score if gate else "score")
    if isinstance(view.score, list):  # a defense that gates each view (MAC)
        shown = f"{name} per view {', '.join(f'{s:.4g}' for s in view.score)};"
    else:
        shown = f"{name} {view.score:.4g}"
    if gate is None:
        return shown
    if not isinstance(view.score, list):
        shown += " &lt;" if view.score < gate.threshold else " &gt;" if view.score > gate.threshold else " ="
    flags = view.flagged if isinstance(view.flagged, list) else [bool(view.flagged)]
    verdict = "not flagged" if not any(flags) else (
        f"flagged ({sum(flags)} of {len(flags)} views)" if len(flags) > 1 else "flagged")
    return (f"{shown} {gate.threshold:.4g} (threshold; flags {'above' if gate.above else 'below'}): "
            f"<b class='{'flag' if any(flags) else 'pass'}'>{verdict}</b>")


def _name(names: Sequence[str], k: int) -> str:
    return names[k] if 0 <= k < len(names) else f"class {k}"


def _prediction(who: str, pred: int, prob: float, label: int, names: Sequence[str]) -> str:
    right = pred == label
    mark = "✓" if right else "✗"
    return (f"<span class='{'right' if right else 'wrong'}'>{_e(who)}: {mark} {_e(_name(names, pred))} "
            f"{prob:.2f}</span>")


def _size(pixels: torch.Tensor, shown: int) -> tuple[int, int, bool]:
    """(width, height, small): an image narrower than ``shown`` scaled up by a whole factor (pixelated), a wider one
    shown ``shown`` wide."""
    height, width = pixels.shape[-2:]
    small = width < shown
    wide = width * max(1, shown // width) if small else shown
    return wide, round(height * wide / width), small


def _degrees(angle: float) -> str:
    return f"{angle:.3g}°"


def _views_cell(view: View, pictures: _Pictures, caption: str) -> str:
    """A defense's kept views as a row of thumbnails, two pictures wide, labelled how many of how many."""
    shown = view.views or []
    count = view.view_count if view.view_count is not None else len(shown)
    thumbs = []
    for k, pixels in enumerate(shown):
        width, height, small = _size(pixels, THUMB)
        thumbs.append(f"<img src='{_e(quote(pictures.add(pixels)))}' width='{width}' height='{height}' "
                      f"alt='a view {_e(view.defense)} classified ({k + 1} of {len(shown)} shown)'"
                      f"{' class=px' if small else ''}>")
    return (f"<figure class='cell span'><div class='thumbs'>{''.join(thumbs)}</div><figcaption><b>its views "
            f"({len(shown)} of {count})</b><br>{caption}</figcaption></figure>")


def _cell(title: str, src: str | None, size: tuple[int, int, bool], alt: str, caption: str, span: int = 1) -> str:
    """One picture with its caption; without a picture, a marked blank ``span`` pictures wide saying why."""
    width, height, small = size
    width = width * span + GAP * (span - 1)
    if src is None:  # its aspect ratio keeps it as tall as the pictures beside it when the columns narrow
        picture = f"<div class='blank' style='aspect-ratio:{width}/{height}'><span>{_e(alt)}</span></div>"
    else:
        picture = (f"<img src='{_e(quote(src))}' width='{width}' height='{height}' alt='{_e(alt)}'"
                   f"{' class=px' if small else ''}>")
    return f"<figure class='cell{' span' if span > 1 else ''}'>{picture}<figcaption><b>{_e(title)}</b><br>" \
           f"{caption}</figcaption></figure>"


@dataclass
class _Page:
    """What every row of the gallery shares."""

    class_names: dict[str, list[str]]
    gates: dict[str, dict[str, _Gate]]
    pictures: _Pictures
    factors: dict[str, int]
    pixel_defenses: set[str]


def _seen(view: View, item: Item) -> torch.Tensor:
    return view.image if view.image is not None else item.clean


def _row(item: Item, view: View, page: _Page, clean_cell: str, size: tuple[int, int, bool]) -> str:
    names, factors, add = page.class_names.get(item.dataset, []), page.factors, page.pictures.add
    image = _seen(view, item)
    fixed = view.bare_pred != item.label and view.pred == item.label
    broken = view.bare_pred == item.label and view.pred != item.label
    flagged = _flag_of(view)
    component = f" ({view.component})" if view.component else ""
    tags = "".join(f"<span class='tag {k}'>{w}</span>" for k, w, on in (
        ("fixed", "fixed by the defense", fixed), ("broken", "broken by the defense", broken),
        ("flag", "flagged by the gate", flagged)) if on)
    cells = [clean_cell]
    if view.input != "clean":
        cells += [_cell(f"{view.input}{component}", add(image), size, f"the {view.input} image",
                        _prediction("undefended", view.bare_pred, view.bare_prob, item.label, names)),
                  _cell(f"perturbation ×{factors['attack']}", add(_magnified(image - item.clean, factors["attack"])),
                        size, "the perturbation, magnified", "adversarial − clean")]
    else:
        cells.append(_cell("no attack", None, size, "the defense saw the clean image", "", span=2))
    verdict = f"{_prediction(view.defense, view.pred, view.prob, item.label, names)}<br>p(true) {view.label_prob:.2f}"
    moved = "" if view.feature_shift is None else f"feature moved by {_degrees(view.feature_shift)}"
    if view.defended is not None:
        cells += [_cell(f"{view.defense}'s image", add(view.defended), size, f"the image {view.defense} classified",
                        verdict),
                  _cell(f"its change ×{factors['defense']}", add(_magnified(view.defended - image, factors["defense"])),
                        size, "the defense's change, magnified", "defended − input")]
    if view.views:  # a defense that classifies views of the image (beside its changed pixels, if it has both)
        cells.append(_views_cell(view, page.pictures, verdict if view.defended is None else ""))
    elif view.defended is None:
        if moved:
            why = f"it changed no pixel: it moved the image's feature by {_degrees(view.feature_shift)}"
        elif view.defense in page.pixel_defenses:
            why = "it left these pixels unchanged"
        else:
            why = "no pixel changed (it changes none, or works on features)"
        cells.append(_cell(view.defense, None, size, why, verdict, span=2))
    gate_line = _gate_words(view, page.gates.get(item.dataset, {}).get(view.defense))
    return (f"<article class='row' style='--w:{size[0]}px' data-dataset='{_e(item.dataset)}' "
            f"data-image='{_e(item.image_id)}' data-defense='{_e(view.defense)}' data-input='{_e(view.input)}' "
            f"data-fixed='{int(fixed)}' data-broken='{int(broken)}' data-flagged='{int(flagged)}'><div class='info'>"
            f"<h3>{_e(short_name(item.dataset))} · {_e(item.image_id)}</h3>"
            f"<p>true class <b>{_e(_name(names, item.label))}</b></p>"
            f"<p>{_e(view.defense)} on {_e(view.input)}{_e(component)}</p>"
            + (f"<p class='gate'>{gate_line}</p>" if gate_line else "")
            + (f"<p class='shift'>{_e(moved)}</p>" if moved else "") + f"<p>{tags}</p></div>"
            + "".join(cells) + "</article>")


def _gallery_rows(items: Sequence[Item], class_names: dict[str, list[str]], gates: dict[str, dict[str, _Gate]],
                  pictures: _Pictures) -> tuple[list[str], dict[str, int]]:
    """One row per image, defense and input; the page's two magnification factors."""
    factors = {
        "attack": _magnification(_seen(v, i) - i.clean for i in items for v in i.views if v.input != "clean"),
        "defense": _magnification(v.defended - _seen(v, i) for i in items for v in i.views if v.defended is not None),
    }
    # The gallery keeps a defense's pixels only where they differ from its input: a defense that changed some
    # image's pixels left the others as they were, one that changed none may work on features.
    pixel_defenses = {v.defense for i in items for v in i.views if v.defended is not None}
    page = _Page(class_names, gates, pictures, factors, pixel_defenses)
    rows = []
    for item in items:
        size = _size(item.clean, SHOWN)
        bare = next((v for v in item.views if v.input == "clean"), None)
        caption = "" if bare is None else _prediction("undefended", bare.bare_pred, bare.bare_prob, item.label,
                                                      class_names.get(item.dataset, []))
        clean_cell = _cell("clean", pictures.add(item.clean), size, "the clean image", caption)
        rows += [_row(item, view, page, clean_cell, size) for view in item.views]
    return rows, factors


def _controls(items: Sequence[Item]) -> str:
    def select(key: str, label: str, values: Iterable[str], words=lambda v: v) -> str:
        options = "".join(f"<option value='{_e(v)}'>{_e(words(v))}</option>" for v in dict.fromkeys(values))
        return f"<label>{label} <select id='f-{key}'><option value=''>all</option>{options}</select></label>"

    views = [(item, view) for item in items for view in item.views]
    checks = "".join(f"<label><input type='checkbox' id='f-{k}'> {w} (<span id='n-{k}'>0</span>)</label>"
                     for k, w in (("fixed", "fixed by the defense"), ("broken", "broken by the defense"),
                                  ("flagged", "flagged by the gate")))
    return ("<div class='filters' role='group' aria-label='gallery filters'>"
            + select("dataset", "Dataset", (i.dataset for i in items), short_name)
            + select("defense", "Defense", (v.defense for _, v in views))
            + select("input", "Input", (v.input for _, v in views)) + checks
            + f"<p id='shown' role='status' aria-live='polite'>{len(views)} of {len(views)} rows shown</p></div>")


# --- the page ------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, interval: tuple[float, float] | None = None, std: float | None = None) -> str:
    if value is None:
        return "–"
    text = f"{value:.2f}" + ("" if std is None else f" ± {std:.2f}")
    return text + ("" if interval is None else f" <small>({interval[0]:.1f}–{interval[1]:.1f})</small>")


def _results_table(records: Sequence[Record]) -> str:
    head = ("dataset", "attack", "defense", "n", "clean % (95% CI)", "robust % (95% CI)", "fixed by attack %",
            "masking", "gate", "flagged clean", "flagged adv", "fwd/img", "bwd/img", "ms/img")
    rows = []
    for r in records:
        share = [("–" if v is None else f"{v:.0%}") for v in (r.counterattacked_clean, r.counterattacked_adv)]
        cells = [_e(short_name(r.dataset)), _e(r.attack), _e(r.defense), str(r.n),
                 _fmt(r.clean_acc, r.clean_ci95, r.clean_acc_std), _fmt(r.robust_acc, r.robust_ci95, r.robust_acc_std),
                 _fmt(r.fixed_by_attack), _e(r.masking or "–"), _e(r.gate_score or "–"), *share,
                 *(_fmt(v) for v in (r.forwards_per_image, r.backwards_per_image, r.ms_per_image))]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<div class='scroll'><table class='results'><thead><tr>"
            + "".join(f"<th scope='col'>{h}</th>" for h in head) + "</tr></thead><tbody>" + "".join(rows)
            + "</tbody></table></div>")


def _configuration(config: RunDescription, run_hash: str) -> str:
    run = config.run or {}
    rows = [("run (configuration hash)", _e(run_hash)), ("model", _e(config.model))]
    source = (run.get("weights_from") or {}).get("model")
    if source:
        rows.append(("weights loaded from", _e(source)))
    rows.append(("weights (digest of the loaded tensors)", _e(config.weights or "–")))
    rows.append(("datasets", "<ul>" + "".join(
        f"<li>{_e(short_name(d.get('name', '?')))}: {_e(d.get('name', '?'))}, {_e(d.get('images', '?'))} images, "
        f"{_e(d.get('classes', '?'))} classes, fingerprint <code>{_e(d.get('fingerprint', '–'))}</code></li>"
        for d in config.datasets) + "</ul>"))
    for key, entries in (("attacks", config.attacks), ("defenses", config.defenses or [])):
        rows.append((key, "<ul>" + "".join(f"<li><code>{_e(json.dumps(e))}</code></li>" for e in entries) + "</ul>"))
    shown = {"model", "weights", "datasets", "attacks", "defenses", "run"}
    for key, value in config.to_json().items():
        if key not in shown and value is not None:
            rows.append((key.replace("_", " "), _e(value if isinstance(value, str) else json.dumps(value))))
    for key in ("device", "batch_size", "processes", "versions"):
        if key in run:
            rows.append((key.replace("_", " "), _e(run[key] if isinstance(run[key], str) else json.dumps(run[key]))))
    return "<table class='config'>" + "".join(f"<tr><th scope='row'>{k}</th><td>{v}</td></tr>" for k, v in rows) \
        + "</table>"


def _figures(folder: Path) -> str:
    paths = list(dict.fromkeys(p for pattern in FIGURES for p in sorted(folder.glob(pattern))))
    if not paths:
        return "<p>No figures in this folder (<code>counterattack report DIR</code> draws them).</p>"
    return "<div class='figures'>" + "".join(
        f"<figure><img src='{_e(quote(p.name))}' alt='{_e(p.stem.replace('_', ' '))}'><figcaption>{_e(p.name)}"
        "</figcaption></figure>" for p in paths) + "</div>"


def _comparison(folder: Path) -> str:
    path = folder / "comparison.md"
    if not path.is_file():
        return ""
    return ("<h2 id='comparison'>Comparison with published numbers</h2><details><summary>comparison.md "
            f"(<a href='comparison.md'>file</a>)</summary><pre>{_e(path.read_text(encoding='utf-8'))}</pre></details>")


def _masking_lines(records: Sequence[Record], warnings: Sequence[str]) -> list[str]:
    """Each distinct masking verdict (per defense and dataset: every attack's record, the worst case's too, carries
    the same one) once, unless a record's warning already says it."""
    lines = {}
    for r in records:
        if r.masking in (None, "none"):
            continue
        said = f"{r.defense} on {short_name(r.dataset)}: {r.masking}"
        if not any(said in w for w in warnings):
            lines[f"{r.defense} on {short_name(r.dataset)}: gradient masking: {r.masking}"] = None
    return list(lines)


def write_html_report(folder: Path) -> Path:
    """Write ``folder/report.html`` (and its images in ``folder/report_files/``) from a run folder; its path."""
    folder = Path(folder)
    results = Results.read(folder)
    config, records = results.config, results.records
    class_names, items = read_gallery(folder)
    per_dataset = config.defenses_per_dataset or {}
    gates = {d.get("name"): _gates(per_dataset.get(d.get("name"), config.defenses)) for d in config.datasets}
    pictures = _Pictures(folder / FILES)
    rows, factors = _gallery_rows(items, class_names, gates, pictures)
    pictures.prune()
    run_hash = config_hash(config.to_json())
    warnings = warnings_of(records)
    warned = "".join(f"<p class='warn'>{_inline(w)}</p>" for w in warnings) + "".join(
        f"<p class='warn'>{_e(line)}</p>" for line in _masking_lines(records, warnings))
    if rows:
        gallery = (f"<p>Each row: one image, one defense, one input (clean or attacked). Predictions are green (✓) "
                   f"where right, red (✗) where wrong; 'undefended' is the bare model on the same input. Perturbation "
                   f"= (adversarial − clean) × {factors['attack']} around mid-grey; the defense's change = (defended − "
                   f"its input) × {factors['defense']}. <i>Fixed</i>: the undefended model wrong on that input, the "
                   f"defense right; <i>broken</i>: the reverse. Checked filters combine (a row shows when it meets "
                   f"all); the counts are the rows the selectors keep that meet each filter. A defense that "
                   f"classifies views of the image rather than one changed image shows a few of those views (how many "
                   f"of how many); one that moves the image's feature, the angle between the feature it classified "
                   f"with and the input's.</p>"
                   + _controls(items) + "<div id='rows'>" + "".join(rows) + "</div>"
                   + "<p id='none' hidden>No row matches these filters.</p>")
    else:
        gallery = ("<p>This run kept no gallery: run it with <code>--gallery N</code> (N images per dataset) to see "
                   "what each defense did to a few images.</p>")
    links = " · ".join(f"<a href='{n}'>{n}</a>" for n in ("results.json", "report.md", "report.csv")
                       if (folder / n).is_file())
    source = (config.run.get("weights_from") or {}).get("model") or config.model
    datasets = ", ".join(short_name(d.get("name", "?")) for d in config.datasets)
    identity = (f"{_e(source)} (weights <code>{_e(config.weights or '–')}</code>) on {_e(datasets)} · run "
                f"<code>{_e(run_hash)}</code>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><title>counterattack report: {_e(config.model)}</title><style>{STYLE}</style></head>
<body><nav aria-label="sections">{"<a href='#warnings'>Warnings</a>" if warned else ""}<a href="#results">Results</a>
<a href="#figures">Figures</a><a href="#gallery">Gallery</a><a href="#configuration">Configuration</a></nav>
<h1>Evaluation report</h1><p>{identity} · {links}</p>
{f"<h2 id='warnings'>Warnings</h2>{warned}" if warned else ""}
<h2 id="results">Results</h2>{_results_table(records)}<p>{_inline(READING)}</p>
<h2 id="figures">Figures</h2>{_figures(folder)}{_comparison(folder)}
<h2 id="gallery">Gallery</h2>{gallery}
<h2 id="configuration">Configuration and identity</h2>{_configuration(config, run_hash)}
{f"<script>{SCRIPT}</script>" if rows else ""}</body></html>
"""
    return write_atomically(folder / "report.html", lambda tmp: tmp.write_text(page, encoding="utf-8"))
