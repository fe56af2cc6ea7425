"""How good is `counterattack reproduce --list`'s estimate? Against a measured run of the same preset.

In one process: the estimate ``--list`` prints (each attack step's and defense's cost measured on random
images, composed per image and scaled to the preset's images, plus loading the model and the prompts' text embeddings),
then the measured wall time of ``counterattack reproduce PRESET --limit N`` on the same machine,
model and datasets. The datasets are fake EuroSAT and DTD layouts of random JPEGs (the pipeline's
cost does not depend on what the pixels show), so nothing is downloaded. Ends with one line:

    RATIOS estimate/measured=R target=0.70..1.30

Usage::

    python benchmarks/bench_reproduce.py                          # cola-table1 on the tiny CLIP, 40 images
    python benchmarks/bench_reproduce.py --limit 100 --model local-dir:DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from counterattack.cli import config_from_args, build_parser, main  # noqa: E402
from counterattack.commands.reproduce import _Timer, _timing_model, estimate  # noqa: E402
from counterattack.data.prompts import class_prompts, raw_classes  # noqa: E402
from counterattack.models import resolve_device  # noqa: E402
from counterattack.presets import PRESETS  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "shared" / "models" / "tiny-clip-cifar10"


def jpeg(rng: np.random.Generator, side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def fake_layouts(root: Path, per_class: int) -> None:
    """EuroSAT (64 px, as the real one) and DTD (its partition-1 test list) with ``per_class`` images per class."""
    rng = np.random.default_rng(0)
    for c in raw_classes("eurosat"):
        folder = root / "eurosat" / "2750" / c
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{c}_{i}.jpg").write_bytes(jpeg(rng, 64))
    base = root / "dtd" / "dtd"
    (base / "labels").mkdir(parents=True)
    lines = []
    for c in raw_classes("dtd"):
        (base / "images" / c).mkdir(parents=True)
        for i in range(per_class):
            (base / "images" / c / f"{c}_{i:04d}.jpg").write_bytes(jpeg(rng, 300))
            lines.append(f"{c}/{c}_{i:04d}.jpg")
    (base / "labels" / "test1.txt").write_text("\n".join(lines) + "\n")


def fake_descriptions(folder: Path, datasets: tuple[str, ...], per_class: int = 50) -> Path:
    """A descriptions folder (one DATASET.json each) of plain sentences, for the presets that run COLA or DBD."""
    folder.mkdir()
    for dataset in datasets:
        names, _ = class_prompts(dataset)
        sentences = {name: [f"A photo of {name}, view number {i}." for i in range(per_class)] for name in names}
        (folder / f"{dataset}.json").write_text(json.dumps(sentences))
    return folder


def main_(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cola-table1", choices=list(PRESETS))
    parser.add_argument("--model", default=f"local-dir:{TINY}")
    parser.add_argument("--limit", type=int, default=40, help="images per dataset")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        fake_layouts(root, per_class=max(1, -(-args.limit // 10)))
        descriptions = fake_descriptions(Path(tmp) / "descriptions", ("eurosat", "dtd"))
        run = ["reproduce", args.preset, "--skip-missing", "--data-root", str(root), "--model", args.model, "--limit",
               str(args.limit), "--workers", "0", "--no-progress", "--descriptions", str(descriptions), "--out",
               str(Path(tmp) / "out")]
        config = config_from_args(build_parser().parse_args(run))
        present = tuple(d for d in PRESETS[args.preset].datasets if (root / d).exists())
        preset = dataclasses.replace(PRESETS[args.preset], datasets=present)
        device = resolve_device("auto")
        start = time.perf_counter()
        clip = _timing_model(config, device)
        found = estimate(preset, config, _Timer(clip, config, device), time.perf_counter() - start)
        print(f"estimate: {found.seconds:.1f} s for {found.images} images of {', '.join(present)} "
              f"({found.seconds_per_image:.3f} s per image, {found.setup_seconds:.1f} s setup)")
        start = time.perf_counter()
        assert main(run) == 0
        measured = time.perf_counter() - start
        print(f"measured: {measured:.1f} s for `counterattack {' '.join(run[:2])} --limit {args.limit}`")
        print(f"RATIOS estimate/measured={found.seconds / measured:.2f} target=0.70..1.30")


if __name__ == "__main__":
    main_()
