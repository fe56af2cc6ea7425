"""Fixtures and hooks only: the helpers the tests import live in testkit.py."""

import os

# Before anything imports huggingface_hub: a failed hub look-up must not wait for time-outs.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch

from counterattack import ZeroShotClassifier, load_clip

from testkit import (
    CIFAR10_CLASSES, IN_CI, RANDOM_CLIP_CFG, SHARED, SHARED_PRESENT, TINY_CLIP_DIR, first_of_each_class,
    skip_unless_shared, write_local_dir,
)


def pytest_sessionstart(session) -> None:
    if IN_CI and not SHARED_PRESENT:
        raise pytest.UsageError(f"CI is set but the test assets are missing at {SHARED}: CI must provide ../shared.")


@pytest.fixture(scope="session")
def random_clip_dir(tmp_path_factory) -> Path:
    return write_local_dir(tmp_path_factory.mktemp("random-clip"), RANDOM_CLIP_CFG, seed=0)


@pytest.fixture(scope="session")
def random_classifier(random_clip_dir) -> ZeroShotClassifier:
    clip = load_clip(f"local-dir:{random_clip_dir}")
    return ZeroShotClassifier.from_clip(clip, CIFAR10_CLASSES)


@pytest.fixture(scope="session")
def tiny_clip():
    skip_unless_shared()
    return load_clip(f"local-dir:{TINY_CLIP_DIR}")


@pytest.fixture(scope="session")
def tiny_classifier(tiny_clip) -> ZeroShotClassifier:
    return ZeroShotClassifier.from_clip(tiny_clip, CIFAR10_CLASSES)


@pytest.fixture(scope="session")
def cifar10_first():
    """``cifar10_first(per_class)``: the first ``per_class`` CIFAR-10 test images of each class (../shared),
    as [0, 1] pixels with their labels, class by class; each count is loaded once per session."""
    skip_unless_shared()
    return first_of_each_class


@pytest.fixture
def images() -> torch.Tensor:
    """Random images with saturated pixels too, so the [0, 1] box constraint is exercised."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 32, 32, generator=g)
    x[:, :, :4] = 0.0
    x[:, :, -4:] = 1.0
    return x
