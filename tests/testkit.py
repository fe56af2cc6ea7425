"""Helpers the test modules share, importable under any pytest import mode (``pythonpath`` holds tests/).

conftest.py keeps the fixtures and hooks; everything a test module imports by name lives here, so no test
module imports conftest or another test module."""

from __future__ import annotations

import functools
import io
import json
import os
import socket
import sys
import zlib
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from counterattack import PGD, AdaptiveAttack, ImageRandomness
from counterattack.data.prompts import raw_classes

# --- the assets beside the project (../shared) and the one rule for their absence ---------------------------

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY_CLIP_DIR = SHARED / "models" / "tiny-clip-cifar10"
CIFAR10_TEST_DIR = SHARED / "data" / "cifar10" / "test"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

SHARED_PRESENT = TINY_CLIP_DIR.is_dir() and CIFAR10_TEST_DIR.is_dir()
# Under CI the assets are always there: a missing ../shared must fail (conftest's session start), not skip.
IN_CI = bool(os.environ.get("CI"))
SHARED_MISSING = f"test assets not found at {SHARED} (the tiny CLIP and CIFAR-10 images live beside the project)"

needs_shared = pytest.mark.skipif(not SHARED_PRESENT and not IN_CI, reason=SHARED_MISSING)


def skip_unless_shared() -> None:
    """In a fixture: the same rule as ``needs_shared``, for every test that asks for the fixture."""
    if not SHARED_PRESENT and not IN_CI:
        pytest.skip(SHARED_MISSING)


@functools.cache
def first_of_each_class(per_class: int, folder: Path = CIFAR10_TEST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images of each class folder (in file order), as [0, 1] pixels, and their labels."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import to_tensor

    data = ImageFolder(str(folder))
    by_class = [[i for i, y in enumerate(data.targets) if y == c] for c in range(len(data.classes))]
    picks = [i for indices in by_class for i in indices[:per_class]]
    return torch.stack([to_tensor(data[i][0]) for i in picks]), torch.tensor([data.targets[i] for i in picks])


# --- small models and data written by the tests ------------------------------------------------------------

RANDOM_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_local_dir(directory: Path, model_cfg: dict, seed: int, image_size: int = 32) -> Path:
    """An open_clip local-dir model with seeded random weights."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    save_file(model.state_dict(), str(directory / "open_clip_model.safetensors"))
    preprocess = {"size": image_size, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                  "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    return directory


def write_image_folder(root: Path, classes: dict[str, int], size=(32, 32), seed: int = 0) -> Path:
    """``root/<class>/0000.png, ...``: seeded random RGB images, ``classes[name]`` of each."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:04d}.png")
    return root


def small_eval_argv(model_dir: Path, folder: Path, out: Path, *extra) -> list[str]:
    """``eval`` on an image folder with one attack step, none and TTC, batches of 4: the quickest real run."""
    return ["eval", "--no-progress", "--workers", "0", "--model", f"local-dir:{model_dir}", "--dataset",
            f"imagefolder:{folder}", "--attack-steps", "1", "--defense", "none,ttc", "--batch-size", "4",
            "--out", str(out), *map(str, extra)]


def write_descriptions(path: Path, class_names: list[str], per_class: int = 50) -> Path:
    """A class-descriptions file in CuPL's and AWT's layout, written by the test (no LLM text ships with the project):
    plain sentences naming each class."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({name: [f"A photo of a {name}, picture number {i}." for i in range(per_class)]
                                for name in class_names}))
    return path


def jpeg(seed: int, mode: str = "RGB") -> bytes:
    """A small seeded random JPEG, in ``mode``."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG")
    return buffer.getvalue()


def put(path: Path, data: bytes = b"") -> None:
    """Write ``data`` to ``path``, by default a JPEG seeded by the file's name (crc32: the same in every process,
    unlike ``hash``, which Python salts per process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data or jpeg(zlib.crc32(path.name.encode("utf-8"))))


def build_eurosat(root: Path, monkeypatch) -> list[int]:
    """EuroSAT's on-disk layout with one image per class; returns the labels it should load, in order."""
    for i, c in enumerate(raw_classes("eurosat")):
        put(root / "eurosat" / "2750" / c / f"{c}_1.jpg", jpeg(i))
    return list(range(10))


def fake_hub_cache(cache_dir: Path, repo: str) -> Path:
    """Lay out a Hugging Face cache entry, as `hf download` leaves it; return its snapshot folder."""
    repo_dir = cache_dir / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


class RunsCode:
    """Unpickling this would create the file ``marker``: the kind of checkpoint a loader must refuse."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def free_port() -> str:
    """A TCP port nobody listens on now, for torchrun: a fixed one clashes when two test runs share a machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


# --- comparing runs -----------------------------------------------------------------------------------------

# The computation's cost depends on how images were batched (fast TTC reuses a batch's graph when
# most of it is counterattacked), and timings on the machine: records are compared without them.
COST = ("ms_per_image", "peak_memory_mb", "forwards_per_image", "backwards_per_image")
TAU = ("mean_score_clean", "mean_score_adv")


class Records(list):
    """Records without their cost, equal when all else is equal and the mean taus agree to float noise
    (a batch's shape changes the last bits of its embeddings)."""

    def __eq__(self, other) -> bool:
        return len(self) == len(other) and all(
            a.keys() == b.keys()
            and all(a[k] == (pytest.approx(b[k], rel=1e-5) if k in TAU and b[k] is not None else b[k]) for k in a)
            for a, b in zip(self, other, strict=True)
        )


def comparable_gallery(out: Path) -> list[tuple]:
    """A run folder's gallery, comparable across batch sizes and process counts: each kept image's id, label and
    clean pixels, and every view's decisions (probabilities to float noise; defended pixels up to sign flips)."""
    from counterattack.gallery import read_gallery

    _, items = read_gallery(out)
    return [(item.dataset, item.image_id, item.label, item.clean.tolist(),
             [(v.defense, v.input, v.pred, v.bare_pred, pytest.approx(v.prob, abs=1e-4), v.flagged, v.component)
              for v in item.views]) for item in items]


def part_batches(out: Path) -> list[dict]:
    """The batches a run folder's parts files hold, as their JSON (each file's first line names the run instead)."""
    lines = [json.loads(line) for path in sorted((out / "parts").glob("rank-*.jsonl"))
             for line in path.read_text().splitlines()]
    return [line["batch"] for line in lines if "batch" in line]


def comparable_records(out: Path) -> Records:
    """A run folder's records, comparable across batch sizes and process counts."""
    records = json.loads((out / "results.json").read_text())["records"]
    return Records({k: v for k, v in r.items() if k not in COST} for r in records)


# --- defenses against the transfer attack and the adaptive one ----------------------------------------------


def right_over_draws(defense, classifier, adversarial: torch.Tensor, labels: torch.Tensor, draws: int = 4) -> int:
    """How many of ``adversarial`` the defense classifies right, summed over ``draws`` seeded test-time draws of
    its randomness, the same draws for whatever images are compared. On a single draw a random defense's
    borderline image is a coin toss, which would drown an attack's gain of a few images."""
    right = 0
    for seed in range(draws):
        logits = defense(classifier, adversarial, ImageRandomness.from_seed(seed, len(adversarial), "defense")).logits
        right += int((logits.argmax(-1) == labels).sum())
    return right


def transfer_and_adaptive(defense, classifier, images, labels, budget: dict, rng) -> dict:
    """A defense against PGD crafted on the undefended model (transfer), and against PGD going on from those
    images through the defense for as many steps again (adaptive): how many each leaves right over four
    test-time draws, and at the transfer images the gradient of the loss through the defense's exact view
    beside the undefended one. ``rng(n, seed=...)`` makes the attacks' streams."""
    transfer = PGD(**budget)(classifier, images, labels, rng(len(images)))
    adaptive = AdaptiveAttack(defense, PGD(**budget))(classifier, images, labels, rng(len(images)), start=transfer)
    assert (adaptive - images).abs().max() <= budget["eps"] + 1e-6
    x = transfer.clone().requires_grad_(True)
    view = defense.attack_view(classifier, x, rng(len(images), seed=1), "exact")
    (through,) = torch.autograd.grad(F.cross_entropy(view.logits, labels, reduction="sum"), x)
    (undefended,) = torch.autograd.grad(F.cross_entropy(classifier.logits(x), labels, reduction="sum"), x)
    return {"transfer": right_over_draws(defense, classifier, transfer, labels),
            "adaptive": right_over_draws(defense, classifier, adaptive, labels),
            "through": through, "undefended": undefended}


# --- gates --------------------------------------------------------------------------------------------------

# A gate threshold must sit this far (relative to the scores' scale) from every score, so that a score
# recomputed another way (alone instead of in a batch, another BLAS, another machine) stays on its side.
GATE_MARGIN = 1e-4


def threshold_between(scores: torch.Tensor, below: int | None = None) -> float:
    """A gate threshold halfway across a gap of the sorted ``scores``, never on a score.

    ``below``: how many scores lie under it; None picks the widest gap that leaves scores on both
    sides. A threshold equal to one image's score would compare that score with a recomputation of
    itself, and a last-bit difference between two code paths would flip its gate.
    """
    values = scores.detach().double().flatten().sort().values
    gaps = values[1:] - values[:-1]
    if below is None:
        below = int(gaps.argmax()) + 1
    if not 0 < below < len(values):
        raise ValueError(f"cannot put {below} of {len(values)} scores below a threshold between two of them")
    gap = float(gaps[below - 1])
    scale = float(values.abs().max())
    assert gap > 2 * GATE_MARGIN * scale, (
        f"the scores {values.tolist()} leave no clear gap after the {below} lowest: pick other test images")
    return float(values[below - 1] + gap / 2)


def assert_equal_up_to_sign_flips(first: torch.Tensor, second: torch.Tensor, share: float = 0.01) -> None:
    """Defended images computed two ways (alone and in a batch) agree, except where a sign step met a
    gradient element so near zero that the batch's rounding flipped it: at most ``share`` of the pixels.
    (A draw that depended on the batch would move nearly every pixel.)"""
    moved = (first - second).abs() > 1e-6
    assert moved.float().mean() <= share, f"{int(moved.sum())} of {moved.numel()} pixels differ"


def api_clean_accuracy(clip, images: Path, chosen: list[int]) -> float:
    """The clean accuracy (%) the Python API gives on ``chosen`` images of an image folder: what a command line
    run on the same images must report."""
    from counterattack import ZeroShotClassifier
    from counterattack.data import load_dataset

    data = load_dataset(f"imagefolder:{images}", clip)
    classifier = ZeroShotClassifier.from_clip(clip, data.class_names, data.templates)
    pixels = torch.stack([data.dataset[i][0] for i in chosen])
    labels = torch.tensor([data.targets[i] for i in chosen])
    with torch.no_grad():
        return (classifier.logits(pixels).argmax(-1) == labels).float().mean().item() * 100


def eval_none_and_ttc(model: str, images: Path, out: Path) -> tuple[dict, dict, dict]:
    """``counterattack eval`` of ``model`` on the first four images of a folder, undefended and with TTC (2 PGD
    steps): the results, and the two records, checked to be what ran."""
    from counterattack.cli import main

    code = main(["eval", "--no-progress", "--workers", "0", "--model", model, "--dataset", f"imagefolder:{images}",
                 "--limit", "4", "--attack-steps", "2", "--defense", "none,ttc", "--batch-size", "4",
                 "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    none, ttc = results["records"]
    assert (none["defense"], ttc["defense"]) == ("none", "ttc") and none["n"] == ttc["n"] == 4
    return results, none, ttc


# --- extensions written by a test --------------------------------------------------------------------------------


def one_more_file(tmp_path, monkeypatch, package, registry, module: str, source: str):
    """Put ``module`` (source text) in a folder on ``package``'s path, discover it, and remove it afterwards."""
    folder = tmp_path / f"more-{package.__name__}"
    folder.mkdir()
    (folder / f"{module}.py").write_text(source)
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    registry.discover(package.__name__, package.__path__)
    name = module.replace("_", "-")
    yield registry[name]
    registry.pop(name)
    sys.modules.pop(f"{package.__name__}.{module}")
