"""Every defense's time per image against plain inference, beside what its counted encoder passes predict.

In one run, on the same random images: plain zero-shot inference (one forward per image) gives the time of a
forward; each registered defense is then run on the clean images (after a warm-up call that also does its text-side
work, once per dataset), its image-encoder passes counted by the encoder, and its time set against the prediction
``forward time x (forwards + 2 x backwards)`` (a backward costs about two forwards). A defense that takes more than
``LIMIT`` times its prediction does work its counted passes do not show (per-image text-encoder work, host-side image
codecs, large per-image algebra). The last line::

    RATIOS defense=measured/predicted ... worst=R limit=1.5

Usage::

    python benchmarks/bench_defenses.py                               # ViT-B/32 architecture, random weights
    python benchmarks/bench_defenses.py --model tiny --n 32           # the tiny CLIP (32 px): overheads weigh more
    python benchmarks/bench_defenses.py --device cuda --n 64 --precision bf16
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ttc import CLASSES, load, timed  # noqa: E402

from counterattack import DEFENSES, ImageRandomness, ZeroShotClassifier, build_defense  # noqa: E402
from counterattack.classifier import count_encoder_passes  # noqa: E402
from counterattack.inputs import checked_inputs  # noqa: E402
from counterattack.precision import PRECISIONS, defense_precision, precision_context  # noqa: E402

LIMIT = 1.5


def descriptions(classes: list[str], per_class: int) -> dict[str, list[str]]:
    """Plain sentences standing in for LLM descriptions: their cost, not their content, is what is timed."""
    return {c: [f"A photo of a {c}, picture number {i}." for i in range(per_class)] for c in classes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-b-32", help="vit-b-32 (random weights), tiny, or local-dir:PATH")
    parser.add_argument("--n", type=int, default=4, help="images per timed call")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--defense", action="append", help="only these (repeatable; default: every registered one)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    clip = load(args.model, device)
    needed = max(build_defense(name).descriptions_needed for name in DEFENSES)
    classifier = ZeroShotClassifier.from_clip(clip, CLASSES, descriptions=descriptions(CLASSES, needed))
    images = torch.rand(args.n, 3, *clip.image_size, generator=torch.Generator().manual_seed(0)).to(device)
    rng = ImageRandomness.from_seed(0, args.n, "bench")

    def plain() -> None:
        with torch.no_grad(), precision_context(device, args.precision), checked_inputs():
            classifier.logits(images)

    forward = timed(plain, max(args.repeats, 5), device) / args.n  # the unit of every prediction: measured well
    print(f"{clip.description} on {device} ({args.precision}), {args.n} images per call; plain inference "
          f"{1000 * forward:.1f} ms per image")
    print(f"{'defense':16} {'fwd':>5} {'bwd':>5} {'ms/img':>9} {'predicted':>10} {'x plain':>8} "
          f"{'measured/predicted':>19}")
    ratios = {}
    for name in args.defense or list(DEFENSES):
        defense = build_defense(name)
        precision = defense_precision(args.precision, defense)

        def run(defense=defense, precision=precision) -> None:
            with precision_context(device, precision), checked_inputs():
                defense(classifier, images, rng)

        run()  # its text-side work, once per dataset, is not timed
        with count_encoder_passes() as passes:
            run()
        forwards, backwards = passes.forwards / args.n, passes.backwards / args.n
        seconds = timed(run, args.repeats, device) / args.n
        predicted = forward * (forwards + 2 * backwards)
        ratios[name] = seconds / predicted
        flag = "" if ratios[name] <= LIMIT else "  <- more than its passes show"
        print(f"{name:16} {forwards:5.1f} {backwards:5.1f} {1000 * seconds:9.1f} {1000 * predicted:10.1f} "
              f"{seconds / forward:8.1f} {ratios[name]:19.2f}{flag}")
    worst = max(ratios, key=ratios.get)
    print("RATIOS " + " ".join(f"{name}={ratio:.2f}" for name, ratio in ratios.items())
          + f" worst={ratios[worst]:.2f} ({worst}) limit={LIMIT}")


if __name__ == "__main__":
    main()
