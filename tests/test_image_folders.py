"""An image folder (``imagefolder:DIR``) is identified by its images' bytes, cannot hold two classes the text
encoder reads as one, and counts every image once however its folders are linked."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from counterattack import CounterattackError, load_clip, load_dataset
from counterattack.fingerprints import CONTENT_PREFIX, cache_path, files_content_digest

from testkit import write_image_folder


@pytest.fixture(scope="module")
def clip(random_clip_dir):
    return load_clip(f"local-dir:{random_clip_dir}")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own fingerprint cache, so what it counts there is its own doing."""
    monkeypatch.setenv("COUNTERATTACK_CACHE", str(tmp_path / "cache"))


def bitmap_folder(root, classes: dict[str, int], seed: int = 0):
    """Seeded random 16x16 BMPs: a BMP's size depends only on its dimensions, so any two files have the same size."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.bmp")
    return root


def names_and_sizes_key(folder) -> str:
    """The image folder's random-stream key as it always was: the digest of "<relative path>\\t<size>\\t<label>"
    lines, files in ImageFolder's order, labels by sorted class folder."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    lines = [f"{c}/{f.name}\t{f.stat().st_size}\t{label}\n" for label, c in enumerate(classes)
             for f in sorted((folder / c).iterdir())]
    return "imagefolder:" + hashlib.sha256("".join(lines).encode()).hexdigest()[:16]


def content_entries() -> int:
    return sum(key.startswith(CONTENT_PREFIX) for key in json.loads(cache_path().read_text()))


def keep_times(path, stat) -> None:
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_swapping_two_same_size_images_changes_the_identity_not_the_random_streams(tmp_path, clip):
    folder = bitmap_folder(tmp_path / "images", {"cat": 2, "dog": 2})
    before = load_dataset(f"imagefolder:{folder}", clip)
    assert before.randomness_key == names_and_sizes_key(folder)  # published numbers were drawn with this key

    # Swap by renaming, each file's times carried along: names, sizes and mtimes are all as they were.
    first, second = folder / "cat" / "0.bmp", folder / "cat" / "1.bmp"
    first_stat, second_stat = first.stat(), second.stat()
    assert first_stat.st_size == second_stat.st_size
    os.rename(first, tmp_path / "swap.bmp")
    os.rename(second, first)
    os.rename(tmp_path / "swap.bmp", second)
    keep_times(first, first_stat)
    keep_times(second, second_stat)
    after = load_dataset(f"imagefolder:{folder}", clip)
    assert after.randomness_key == before.randomness_key == names_and_sizes_key(folder)
    assert after.fingerprint != before.fingerprint  # a resume would mix the two: the lead's check refuses it
    assert after.targets == before.targets and after.image_ids == before.image_ids


def test_a_same_size_rewrite_with_its_mtime_put_back_is_hashed_again(tmp_path, clip):
    """The cache is keyed by ctime and inode too: size and mtime alone would hand back the old digest."""
    folder = bitmap_folder(tmp_path / "images", {"cat": 1, "dog": 1})
    image = folder / "dog" / "0.bmp"
    before = load_dataset(f"imagefolder:{folder}", clip)
    stat = image.stat()
    image.write_bytes(image.read_bytes()[:-3] + b"\x01\x02\x03")  # the last pixel's bytes: same size
    keep_times(image, stat)
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert load_dataset(f"imagefolder:{folder}", clip).fingerprint != before.fingerprint


def test_touching_a_file_keeps_the_identity_and_an_unchanged_folder_is_one_cache_hit(tmp_path, clip):
    folder = bitmap_folder(tmp_path / "images", {"cat": 2, "dog": 1})
    first = load_dataset(f"imagefolder:{folder}", clip)
    assert content_entries() == 1
    assert load_dataset(f"imagefolder:{folder}", clip).fingerprint == first.fingerprint
    assert content_entries() == 1  # the same files in the same state: read from the cache, nothing hashed
    os.utime(folder / "cat" / "1.bmp")  # touched: new times, the same bytes
    assert load_dataset(f"imagefolder:{folder}", clip).fingerprint == first.fingerprint
    assert content_entries() == 2  # hashed again (the key saw the new times), and found the same content


def test_the_same_images_elsewhere_are_the_same_dataset(tmp_path, clip):
    folder = write_image_folder(tmp_path / "images", {"cat": 2, "dog": 2})
    copy = shutil.copytree(folder, tmp_path / "elsewhere" / "copy")
    original, copied = (load_dataset(f"imagefolder:{f}", clip) for f in (folder, copy))
    assert copied.fingerprint == original.fingerprint and copied.randomness_key == original.randomness_key
    (copy / "dog" / "0001.png").unlink()
    assert load_dataset(f"imagefolder:{copy}", clip).fingerprint != original.fingerprint


def test_a_file_replaced_by_one_of_the_same_size_and_mtime_is_hashed_again(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"first")
    before = files_content_digest([image], progress=False)
    stat = image.stat()
    other = tmp_path / "b.png"
    other.write_bytes(b"other")  # the same size
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and mtime, as `cp -p` or an unpacked archive leave it
    os.replace(other, image)
    assert files_content_digest([image], progress=False) != before


@pytest.mark.parametrize("first, second", [("Cat", "cat"), ("sea_lion", "Sea  Lion"), ("tabby cat", "tabby_cat ")])
def test_class_folders_that_read_as_one_prompt_are_refused_naming_both(tmp_path, clip, first, second):
    folder = write_image_folder(tmp_path / "images", {first: 1, second: 1, "dog": 1})
    with pytest.raises(CounterattackError) as refused:
        load_dataset(f"imagefolder:{folder}", clip)
    message = str(refused.value)
    assert f"{first!r}" in message and f"{second!r}" in message and "\n" not in message
    assert "could never be predicted" in message


def test_a_symbolic_link_loop_in_a_class_folder_is_refused_in_one_line(tmp_path, clip):
    folder = write_image_folder(tmp_path / "images", {"cat": 3, "dog": 2})
    os.symlink("..", folder / "cat" / "up")  # cat/up/cat/up/... : ImageFolder counts cat's images again and again
    with pytest.raises(CounterattackError) as refused:
        load_dataset(f"imagefolder:{folder}", clip)
    message = str(refused.value)
    assert "\n" not in message and f"{folder / 'cat' / 'up'} leads back to {folder}" in message


def test_two_class_folders_that_are_one_folder_are_refused(tmp_path, clip):
    folder = write_image_folder(tmp_path / "images", {"cat": 2, "dog": 1})
    os.symlink(folder / "cat", folder / "kitten")
    with pytest.raises(CounterattackError, match=r"kitten leads back to .*/cat \(a symbolic link loop, or two names"):
        load_dataset(f"imagefolder:{folder}", clip)


def test_a_linked_class_folder_counts_its_images_once(tmp_path, clip):
    outside = write_image_folder(tmp_path / "outside", {"owl": 2})
    folder = write_image_folder(tmp_path / "images", {"cat": 2, "dog": 1})
    os.symlink(outside / "owl", folder / "owl")
    os.symlink(outside / "owl", folder / "cat" / "nested-owls")  # a second way into the same real folder
    with pytest.raises(CounterattackError, match=r"images/owl leads back to .*/cat/nested-owls"):
        load_dataset(f"imagefolder:{folder}", clip)
    (folder / "cat" / "nested-owls").unlink()
    data = load_dataset(f"imagefolder:{folder}", clip)
    assert data.image_ids == ["cat/0000.png", "cat/0001.png", "dog/0000.png", "owl/0000.png", "owl/0001.png"]
    assert data.targets == [0, 0, 1, 2, 2] and data.class_names == ["cat", "dog", "owl"]
