"""Time fast TTC against plain zero-shot inference and the paper's straightforward loop.

In one run, on the same inputs, for each model: plain inference, the reference loop
(``counterattack.defenses.reference``) and the fast path, in the two regimes that bound every
real batch: every image judged clean (tau_thres 0) and every image counterattacked (tau_thres
above every tau). It checks that fast and reference agree (same deltas within float tolerance,
same predictions) and ends with one line:

    RATIOS fast/plain(clean)=A fast/reference(clean)=B fast/reference(adv)=C agree=yes|no

(the ratios of the last model measured). Usage::

    python benchmarks/bench_ttc.py                       # ViT-B/32 (random weights) and the tiny CLIP
    python benchmarks/bench_ttc.py --model tiny --n 512 --device cuda
    python benchmarks/bench_ttc.py --quick               # a run of seconds
    python benchmarks/bench_ttc.py --precision bf16      # plain and fast under the precision policy

Timings under ``--precision`` apply the policy (``counterattack.precision``) to plain inference and
to the fast path; the agreement check always compares fp32 runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402

from counterattack import TTC, ImageRandomness, LoadedCLIP, ZeroShotClassifier, count_encoder_passes, load_clip  # noqa: E402
from counterattack.defenses.reference import reference_ttc  # noqa: E402
from counterattack.precision import PRECISIONS, precision_context  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "shared" / "models" / "tiny-clip-cifar10"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load(name: str, device: torch.device) -> LoadedCLIP:
    if name == "vit-b-32":
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32-quickgelu")  # OpenAI's architecture, random weights
        return LoadedCLIP.from_model(model.to(device), open_clip.get_tokenizer("ViT-B-32"), "ViT-B-32 (random)")
    path = TINY if name == "tiny" else Path(name.removeprefix("local-dir:"))
    return load_clip(f"local-dir:{path}", device=device)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` runs after one warm-up."""
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(name: str, n: int, batch: int, repeats: int, device: torch.device,
                precision: str = "fp32") -> dict[str, float | bool]:
    clip = load(name, device)
    classifier = ZeroShotClassifier.from_clip(clip, CLASSES)
    images = torch.rand(n, 3, *clip.image_size, generator=torch.Generator().manual_seed(0)).to(device)
    batches = [images[i : i + batch] for i in range(0, n, batch)]

    def streams(i: int, b: torch.Tensor) -> ImageRandomness:
        return ImageRandomness.for_images(0, "bench", range(i * batch, i * batch + len(b)), "ttc")

    def plain() -> None:
        with torch.no_grad(), precision_context(device, precision):
            for b in batches:
                classifier.logits(b)

    def reference(ttc: TTC) -> None:
        for i, b in enumerate(batches):
            reference_ttc(ttc, classifier, b, streams(i, b))

    def fast(ttc: TTC) -> None:
        with precision_context(device, precision):
            for i, b in enumerate(batches):
                ttc(classifier, b, streams(i, b))

    print(f"\n== {clip.description}: {n} images of {clip.image_size[0]}px, batch {batch}, {device}, "
          f"precision {precision}")
    t_plain = timed(plain, repeats, device)
    print(f"plain zero-shot        {1000 * t_plain / n:8.3f} ms/img")
    result: dict[str, float | bool] = {"agree": True}
    for regime, threshold in (("clean", 0.0), ("adv", float("inf"))):
        ttc = TTC(tau_thres=threshold)
        t_ref = timed(partial(reference, ttc), repeats, device)
        t_fast = timed(partial(fast, ttc), repeats, device)
        with count_encoder_passes() as ref_passes:
            ref_images, ref_out = reference_ttc(ttc, classifier, batches[0], streams(0, batches[0]))
        with count_encoder_passes() as fast_passes:
            fast_out = ttc(classifier, batches[0], streams(0, batches[0]))
        fast_images = ttc.counterattack(classifier, batches[0], streams(0, batches[0])).images
        agree = bool(
            torch.allclose(fast_images, ref_images, atol=1e-5)
            and torch.equal(fast_out.logits.argmax(-1), ref_out.logits.argmax(-1))
            and torch.equal(fast_out.counterattacked, ref_out.counterattacked)
        )
        result["agree"] = bool(result["agree"]) and agree
        m = len(batches[0])
        print(
            f"[{regime:5}] reference {1000 * t_ref / n:8.3f} ms/img "
            f"({ref_passes.forwards / m:.0f} fwd, {ref_passes.backwards / m:.0f} bwd)"
            f" | fast {1000 * t_fast / n:8.3f} ms/img "
            f"({fast_passes.forwards / m:.0f} fwd, {fast_passes.backwards / m:.0f} bwd)"
            f" | fast/reference {t_fast / t_ref:.3f} fast/plain {t_fast / t_plain:.3f} agree={'yes' if agree else 'no'}"
        )
        result[f"fast/reference({regime})"] = t_fast / t_ref
        result[f"fast/plain({regime})"] = t_fast / t_plain
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append",
                        help="vit-b-32 (random weights), tiny, or local-dir:PATH (repeatable)")
    parser.add_argument("--n", type=int, help="images per model (default 64 for ViT-B/32, 512 for small models)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="few images, one repeat: seconds")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="policy for plain and fast")
    args = parser.parse_args()
    device = torch.device(args.device)
    models = args.model or (["vit-b-32", "tiny"] if TINY.is_dir() else ["vit-b-32"])
    result: dict[str, float | bool] = {}
    agree = True
    for name in models:
        n = args.n or (8 if args.quick else 64 if name == "vit-b-32" else 512)
        result = bench_model(name, n, min(args.batch_size, n), 1 if args.quick else args.repeats, device,
                             args.precision)
        agree = agree and bool(result["agree"])
    print(
        f"RATIOS fast/plain(clean)={result['fast/plain(clean)']:.3f} "
        f"fast/reference(clean)={result['fast/reference(clean)']:.3f} "
        f"fast/reference(adv)={result['fast/reference(adv)']:.3f} agree={'yes' if agree else 'no'}"
    )


if __name__ == "__main__":
    main()
