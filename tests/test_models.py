import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from counterattack import SCHEMES, CounterattackError, LoadedCLIP, load_clip
from counterattack.backbones import Scheme, by_loaded_tensors, tensors_fingerprint

from testkit import (
    RANDOM_CLIP_CFG, RunsCode, api_clean_accuracy, eval_none_and_ttc, fake_hub_cache, write_image_folder,
    write_local_dir,
)


def test_local_dir_loads_config_weights_and_image_settings(random_clip_dir):
    clip = load_clip(f"local-dir:{random_clip_dir}")
    assert clip.image_size == (32, 32)
    assert clip.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert not clip.model.training
    assert not any(p.requires_grad for p in clip.model.parameters())
    torch.manual_seed(0)
    fresh = open_clip.CLIP(**RANDOM_CLIP_CFG)
    assert torch.equal(clip.model.visual.conv1.weight, fresh.visual.conv1.weight)


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "not found"),
        ("no-config", "open_clip_config.json"),
        ("no-model-cfg", "model_cfg"),
        ("bad-json", "Cannot read"),
        ("no-weights", "No weights"),
    ],
)
def test_local_dir_errors_are_clear(tmp_path, breakage, message):
    directory = write_local_dir(tmp_path / "m", RANDOM_CLIP_CFG, seed=0)
    config = directory / "open_clip_config.json"
    if breakage == "missing":
        directory = tmp_path / "nowhere"
    elif breakage == "no-config":
        config.unlink()
    elif breakage == "no-model-cfg":
        config.write_text(json.dumps({"preprocess_cfg": {}}))
    elif breakage == "bad-json":
        config.write_text("{not json")
    else:
        (directory / "open_clip_model.safetensors").unlink()
    with pytest.raises(CounterattackError, match=message):
        load_clip(f"local-dir:{directory}")


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    directory = write_local_dir(tmp_path / "m", RANDOM_CLIP_CFG, seed=0)
    (directory / "open_clip_model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": RunsCode(marker)}, directory / "open_clip_pytorch_model.bin")
    with pytest.raises(CounterattackError, match="Refusing"):
        load_clip(f"local-dir:{directory}")
    assert not marker.exists()


def test_unknown_builtin_name_and_tag():
    with pytest.raises(CounterattackError, match="Did you mean: ViT-B-32"):
        load_clip("ViT-B-23", "openai")
    with pytest.raises(CounterattackError, match="laion2b"):
        load_clip("ViT-B-32", "no-such-tag")


def test_openai_weights_load_into_quickgelu_and_match_openai_features(tmp_path):
    # Random weights in OpenAI's format: its key names, fp16, as OpenAI's release.
    torch.manual_seed(0)
    state = {k: v.half() for k, v in open_clip.create_model("ViT-B-32-quickgelu").state_dict().items()}
    snapshot_file = fake_hub_cache(tmp_path, "timm/vit_base_patch32_clip_224.openai") / "open_clip_pytorch_model.bin"
    torch.save(state, snapshot_file)

    clip = load_clip("ViT-B-32", "openai", cache_dir=str(tmp_path))
    reference = open_clip.load_openai_model(str(snapshot_file), precision="fp32", device="cpu").eval()
    plain_gelu = open_clip.create_model("ViT-B-32", pretrained=str(snapshot_file)).eval()

    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    x = (x - torch.tensor(clip.mean).view(1, 3, 1, 1)) / torch.tensor(clip.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ours, theirs, gelu = clip.model.encode_image(x), reference.encode_image(x), plain_gelu.encode_image(x)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, gelu, atol=1e-3)  # the activation matters: the check can fail
    assert clip.image_size == (224, 224)


def test_missing_hub_model_fails_fast_with_instructions(tmp_path):
    """A process of its own: huggingface_hub reads its endpoint, cache and offline switch from the environment when
    imported (this process has it offline), and the reachability probe turns the switch for the whole process."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    # A closed local port: the hub is unreachable, as on a machine without network.
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path))
    command = [sys.executable, "-m", "counterattack", "eval", "--model", "ViT-B-32", "--pretrained", "openai",
               "--out", str(tmp_path / "out")]
    # Without the reachability probe, huggingface_hub retries for ~50 s; the timeout catches that.
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=40)
    assert done.returncode == 2
    assert "hf download timm/vit_base_patch32_clip_224.openai" in done.stderr
    assert "Traceback" not in done.stderr


def test_hf_hub_model_loads_from_the_local_cache(tmp_path, random_clip_dir):
    snapshot = fake_hub_cache(tmp_path, "someone/tiny-clip")
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        (snapshot / name).write_bytes((random_clip_dir / name).read_bytes())
    from_hub = load_clip("hf-hub:someone/tiny-clip", cache_dir=str(tmp_path))
    from_dir = load_clip(f"local-dir:{random_clip_dir}")
    assert from_hub.image_size == (32, 32)
    for a, b in zip(from_hub.model.state_dict().values(), from_dir.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(CounterattackError, match="hf download someone/missing"):
        load_clip("hf-hub:someone/missing", cache_dir=str(tmp_path))


def test_a_backbone_scheme_is_one_row_of_the_table(tmp_path, monkeypatch):
    """``toy:FOLDER``, a seeded random open_clip CLIP whose seed the folder keeps, added as one row of the scheme
    table (monkeypatch puts the table back): load_clip and `counterattack eval` run on it end to end."""
    folder = tmp_path / "toy-model"
    folder.mkdir()
    (folder / "toy.json").write_text(json.dumps({"seed": 3}))

    def load_toy(identifier: str, *, pretrained: str | None, device: torch.device,
                 cache_dir: str | None) -> LoadedCLIP:
        torch.manual_seed(json.loads((Path(identifier) / "toy.json").read_text())["seed"])
        model = open_clip.CLIP(**RANDOM_CLIP_CFG).to(device)
        context_length = RANDOM_CLIP_CFG["text_cfg"]["context_length"]
        return LoadedCLIP.from_model(model, lambda texts: open_clip.tokenize(texts, context_length),
                                     f"toy:{identifier}")

    with pytest.raises(CounterattackError, match="one of local-dir:, hf-hub:, transformers:"):
        load_clip(f"toy:{folder}")
    monkeypatch.setitem(SCHEMES, "toy:", Scheme(load_toy, by_loaded_tensors))

    images = write_image_folder(tmp_path / "images", {"cat": 3, "dog": 3}, seed=4)
    results, none, _ = eval_none_and_ttc(f"toy:{folder}", images, tmp_path / "out")
    # A local folder is named by its scheme alone, its weights by the tensors loaded.
    assert results["config"]["model"] == "toy:folder"
    assert results["config"]["weights"] == tensors_fingerprint(load_clip(f"toy:{folder}").model)
    # The run classified with the toy model: its clean accuracy is the API's on the same images.
    clip = load_clip(f"toy:{folder}")
    assert clip.description == f"toy:{folder}" and clip.image_size == (32, 32)
    chosen = [0, 1, 3, 4]  # the class-balanced first four: two cats, two dogs
    assert none["clean_acc"] == pytest.approx(api_clean_accuracy(clip, images, chosen))
