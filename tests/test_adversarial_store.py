"""Stored adversarial images: bit-exact round trips, resume after a kill, several ranks, refused mixes."""

import random
from dataclasses import replace

import pytest
import torch

from counterattack.adversarial import AdversarialSet
from counterattack.errors import CounterattackError
from counterattack.records import ADVERSARIAL_SET, RunDescription

CONFIG = RunDescription(model="tiny", attacks=[{"attack": "pgd", "eps": 1 / 255}, {"attack": "apgd", "eps": 4 / 255}],
                        datasets=[{"name": "cifar10", "images": 6, "fingerprint": "abc"}], kind=ADVERSARIAL_SET,
                        run={"workers": 0})


def bound(folder, rank: int = 0) -> AdversarialSet:
    """A set bound to CONFIG's run, as a command's store is before it writes."""
    store = AdversarialSet(folder, rank)
    store.bind(CONFIG, write=rank == 0)
    return store


def batch(seed: int, n: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Seeded labels and images with full-precision values (not representable in fewer bits)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    return labels, {"pgd": torch.rand(n, 3, 8, 8, generator=g), "apgd": torch.rand(n, 3, 8, 8, generator=g) - 0.5}


def test_round_trip_is_bit_exact_in_any_order(tmp_path):
    store = AdversarialSet(tmp_path)
    store.bind(CONFIG, write=True)
    written = {}
    for dataset, ids, seed in (("cifar10", [0, 1, 2], 1), ("folder", ["b/x.png", "a/y.png", "c.png"], 2)):
        labels, images = batch(seed)
        store.append(dataset, ids, labels, images)
        for row, image_id in enumerate(ids):
            written[(dataset, image_id)] = (int(labels[row]), {k: v[row] for k, v in images.items()})

    opened = AdversarialSet.open(tmp_path)
    assert opened.config == CONFIG
    assert opened.done() == {"cifar10": {0, 1, 2}, "folder": {"b/x.png", "a/y.png", "c.png"}}
    for dataset in ("cifar10", "folder"):
        ids = [i for d, i in written if d == dataset]
        random.Random(0).shuffle(ids)
        assert opened.labels(dataset, ids) == [written[(dataset, i)][0] for i in ids]
        for attack in ("pgd", "apgd"):
            got = opened.images(dataset, ids, attack)
            assert got.dtype == torch.float32
            assert torch.equal(got, torch.stack([written[(dataset, i)][1][attack] for i in ids]))


def test_resume_continues_numbering_and_ignores_a_leftover_temp_file(tmp_path):
    first = AdversarialSet(tmp_path)
    first.bind(CONFIG, write=True)
    labels, images = batch(4)
    first.append("cifar10", [0, 1, 2], labels, images)
    # A run killed while writing its next shard leaves a temporary file, never a shard.
    (tmp_path / "shards" / ".rank-0-000001.safetensors.999.tmp").write_bytes(b"half a shard")

    second = AdversarialSet(tmp_path)
    second.bind(CONFIG, write=True)
    assert second.done() == {"cifar10": {0, 1, 2}}
    more_labels, more_images = batch(5)
    second.append("cifar10", [3, 4, 5], more_labels, more_images)
    assert sorted(p.name for p in (tmp_path / "shards").glob("rank-*")) == [
        "rank-0-000000.safetensors", "rank-0-000001.safetensors"]
    assert second.done() == {"cifar10": {0, 1, 2, 3, 4, 5}}
    second.check_complete({"cifar10": [0, 1, 2, 3, 4, 5]})
    expected = torch.stack([more_images["apgd"][1], images["apgd"][0]])
    assert torch.equal(second.images("cifar10", [4, 0], "apgd"), expected)


def test_a_second_rank_is_found(tmp_path):
    labels0, images0 = batch(6)
    labels1, images1 = batch(7)
    bound(tmp_path, rank=0).append("cifar10", [0, 2, 4], labels0, images0)
    bound(tmp_path, rank=1).append("cifar10", [1, 3, 5], labels1, images1)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "rank-0-000000.safetensors", "rank-1-000000.safetensors"]
    store = AdversarialSet.open(tmp_path)
    assert store.done() == {"cifar10": {0, 1, 2, 3, 4, 5}}
    assert torch.equal(store.images("cifar10", [3, 2], "pgd"), torch.stack([images1["pgd"][1], images0["pgd"][1]]))
    assert store.labels("cifar10", [5, 4]) == [int(labels1[2]), int(labels0[2])]


def test_complete_names_missing_doubled_and_foreign(tmp_path):
    store = bound(tmp_path)
    labels, images = batch(8)
    store.append("cifar10", [0, 1, 2], labels, images)
    store.append("cifar10", [2, 3, 9], labels, images)
    with pytest.raises(CounterattackError) as error:
        store.check_complete({"cifar10": [0, 1, 2, 3, 4, 5]})
    message = str(error.value)
    assert "\n" not in message
    assert "2 of 6 images of cifar10 are missing" in message
    assert "1 images of cifar10 are stored more than once" in message
    assert "1 stored images are not of this run's datasets" in message
    assert "counterattack attack" in message


def test_bind_refuses_another_configuration(tmp_path):
    store = AdversarialSet(tmp_path)
    store.bind(CONFIG, write=True)
    store.bind(CONFIG, write=False)
    store.bind(replace(CONFIG, run={"workers": 8}), write=True)  # run-only settings may change
    with pytest.raises(CounterattackError, match=r"differing: model\b.*another --out.*kept"):
        AdversarialSet(tmp_path).bind(replace(CONFIG, model="other"), write=True)
    assert AdversarialSet.open(tmp_path).config == CONFIG


def test_open_refuses_a_folder_that_is_not_a_set(tmp_path):
    with pytest.raises(CounterattackError, match=r"is not an adversarial set.*counterattack attack --out"):
        AdversarialSet.open(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CounterattackError, match="is not an adversarial set"):
        AdversarialSet.open(tmp_path)


def test_missing_id_or_attack_is_named(tmp_path):
    store = AdversarialSet(tmp_path)
    store.bind(CONFIG, write=True)
    labels, images = batch(9)
    store.append("cifar10", [0, 1, 2], labels, images)
    with pytest.raises(CounterattackError, match=r"image 7 of cifar10 is not in .*another subset"):
        store.images("cifar10", [0, 7], "pgd")
    with pytest.raises(CounterattackError, match=r"image 'a.png' of other is not in"):
        store.labels("other", ["a.png"])
    with pytest.raises(CounterattackError, match=r"attack 'cw' is not in .*it holds: apgd, pgd"):
        store.images("cifar10", [0], "cw")


def test_images_on_another_device_come_back_there(tmp_path):
    """Stored from the device they were crafted on, read onto the one asked for: "meta" is a device without
    memory that every machine has; CUDA too where there is one."""
    store = bound(tmp_path)
    labels, images = batch(10)
    gpu = torch.cuda.is_available()
    store.append("cifar10", [0, 1, 2], labels, {k: v.cuda() if gpu else v for k, v in images.items()})
    on_meta = store.images("cifar10", [2, 1], "pgd", device="meta")
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 3, 8, 8) and on_meta.dtype == torch.float32
    got = store.images("cifar10", [2, 1], "pgd", device="cuda" if gpu else "cpu")
    assert got.device.type == ("cuda" if gpu else "cpu")
    assert torch.equal(got.cpu(), images["pgd"][[2, 1]])
