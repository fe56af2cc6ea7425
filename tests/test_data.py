import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from counterattack import CounterattackError, balanced_subset, load_clip, load_dataset

from testkit import write_image_folder


def test_balanced_subset_takes_the_first_images_of_each_class_in_dataset_order():
    targets = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert balanced_subset(targets, 6) == [0, 1, 3, 4, 6, 7]
    # ceil(4/3) = 2 per class, cut to 4 in class order.
    assert balanced_subset(targets, 4) == [0, 1, 3, 6]
    assert balanced_subset(targets, None) == list(range(9))
    assert balanced_subset(targets, 100) == list(range(9))
    interleaved = [0, 1, 0, 1, 0, 1]
    assert balanced_subset(interleaved, 2) == [0, 1]
    with pytest.raises(CounterattackError):
        balanced_subset(targets, 0)


def test_imagefolder_names_classes_from_folders_and_keeps_model_sized_images(tmp_path, random_clip_dir):
    root = write_image_folder(tmp_path / "imgs", {"sea_lion": 2, "cat": 3})
    clip = load_clip(f"local-dir:{random_clip_dir}")
    data = load_dataset(f"imagefolder:{root}", clip)
    assert data.class_names == ["cat", "sea lion"]
    assert data.targets == [0, 0, 0, 1, 1]
    image, label = data.dataset[3]
    assert label == 1
    assert torch.equal(image, to_tensor(Image.open(root / "sea_lion" / "0000.png").convert("RGB")))


def test_imagefolder_resizes_and_center_crops_to_the_model_size(tmp_path, random_clip_dir):
    root = write_image_folder(tmp_path / "imgs", {"a": 1, "b": 1}, size=(64, 48))
    data = load_dataset(f"imagefolder:{root}", load_clip(f"local-dir:{random_clip_dir}"))
    image, _ = data.dataset[0]
    assert image.shape == (3, 32, 32)
    assert 0 <= image.min() and image.max() <= 1


def test_dataset_errors_are_clear(tmp_path, random_clip_dir):
    clip = load_clip(f"local-dir:{random_clip_dir}")
    with pytest.raises(CounterattackError, match="not found"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}", clip)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CounterattackError, match="one sub-folder per class"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}", clip)
    with pytest.raises(CounterattackError, match="Available: cifar10"):
        load_dataset("cifar11", clip)
    with pytest.raises(CounterattackError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", clip, data_root=tmp_path, download=False)
