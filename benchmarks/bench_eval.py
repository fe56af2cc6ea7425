"""Time the paper-default evaluation end to end: data loading, PGD-10 at 1/255, no defense and TTC.

On N images of an image folder (default: the CIFAR-10 test images beside the project), it runs the
library's own evaluation loop (``evaluate_dataset``) and plain zero-shot inference on the same
images, both in this run, and prints images per second, the share of the time spent in the attack,
the defenses and the rest (data loading, transfers, bookkeeping), and the hours the paper's
16-dataset table would take at this speed (its image counts are the registry's). The last line::

    RATIOS eval/plain=A attack=B defenses=C other=D projected_hours_16=E

Usage::

    python benchmarks/bench_eval.py                         # the tiny CLIP, 500 images, this machine
    python benchmarks/bench_eval.py --model vit-b-32 --n 256 --device cuda --precision bf16
    python benchmarks/bench_eval.py --quick                 # a run of seconds

``--model vit-b-32`` is OpenAI's ViT-B/32 architecture with random weights (the cost is the
architecture's); its images are resized to 224 px inside the model, as the paper's are cropped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ttc import CLASSES, TINY, load, timed  # noqa: E402

from counterattack import PGD, ZeroShotClassifier, build_defenses, load_dataset  # noqa: E402
from counterattack.data import PAPER_AVERAGE_DATASETS, DATASETS  # noqa: E402
from counterattack.evaluate import RunSettings, evaluate_dataset  # noqa: E402
from counterattack.precision import PRECISIONS, precision_context  # noqa: E402

CIFAR10 = TINY.parents[1] / "data" / "cifar10" / "test"


def paper_table_images() -> int:
    """The images of the paper's 16 datasets, with its 999-class ImageNet (50 images fewer)."""
    return sum(DATASETS[name].test_size for name in PAPER_AVERAGE_DATASETS) - 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, vit-b-32 (random weights) or local-dir:PATH")
    parser.add_argument("--data", type=Path, default=CIFAR10, help="an image folder (one sub-folder per class)")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--quick", action="store_true", help="40 images: seconds")
    args = parser.parse_args()
    device = torch.device(args.device)
    n = 40 if args.quick else args.n
    clip = load(args.model, device)
    data = load_dataset(f"imagefolder:{args.data}", clip)
    classifier = ZeroShotClassifier.from_clip(clip, data.class_names if len(data.class_names) > 1 else CLASSES)
    settings = RunSettings(seed=0, limit=n, batch_size=args.batch_size, workers=args.workers, device=device,
                           progress=False, attack_precision=args.precision, defense_precision=args.precision)
    attack = PGD(eps=1 / 255, steps=10, step_size=1 / 255)
    defenses = build_defenses(["none", "ttc"])

    start = time.perf_counter()
    batches = list(evaluate_dataset(classifier, data, [attack], defenses, settings))
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    images = sum(len(b.ids) for b in batches)
    attack_seconds = sum(b.defenses["none"].attack_seconds["pgd"] for b in batches)
    defense_seconds = sum(b.defenses[d.name].seconds for b in batches for d in defenses)
    other = total - attack_seconds - defense_seconds

    pixels = torch.stack([data.dataset[i][0] for i in range(images)]).to(device)

    def plain() -> None:
        with torch.no_grad(), precision_context(device, args.precision):
            for i in range(0, images, args.batch_size):
                classifier.logits(pixels[i : i + args.batch_size])

    t_plain = timed(plain, 1 if args.quick else 3, device)
    hours = total / images * paper_table_images() / 3600
    print(f"{clip.description}: {images} images, batch {args.batch_size}, {device}, precision {args.precision}")
    print(f"evaluation {images / total:8.1f} img/s ({1000 * total / images:.3f} ms/img); plain inference "
          f"{1000 * t_plain / images:.3f} ms/img")
    print(f"time: attack {attack_seconds / total:.1%}, defenses {defense_seconds / total:.1%}, "
          f"data and the rest {other / total:.1%}")
    print(f"the paper's 16 datasets ({paper_table_images():,} images) at this speed: {hours:.2f} h")
    print(f"RATIOS eval/plain={total / t_plain:.3f} attack={attack_seconds / total:.3f} "
          f"defenses={defense_seconds / total:.3f} other={other / total:.3f} projected_hours_16={hours:.3f}")


if __name__ == "__main__":
    main()
