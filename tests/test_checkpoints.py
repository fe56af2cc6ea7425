import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from counterattack import CounterattackError, load_clip, load_vision_checkpoint
from counterattack.backbones import tensors_fingerprint
from counterattack.cli import main

from testkit import RANDOM_CLIP_CFG, RunsCode, write_image_folder, write_local_dir


def finetuned_visual(seed: int, cfg: dict = RANDOM_CLIP_CFG) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return open_clip.CLIP(**cfg).visual.state_dict()


@pytest.mark.parametrize("layout", ["ttc-pth-tar", "visual-safetensors", "full-clip"])
def test_vision_checkpoint_formats_load_the_expected_weights(tmp_path, random_clip_dir, layout):
    weights = finetuned_visual(seed=11)
    if layout == "ttc-pth-tar":  # the TTC authors' format, saved from a DataParallel model
        path = tmp_path / "model_best.pth.tar"
        torch.save({"epoch": 9, "vision_encoder_state_dict": {f"module.{k}": v for k, v in weights.items()}}, path)
    elif layout == "visual-safetensors":
        path = tmp_path / "visual.safetensors"
        save_file(weights, str(path))
    else:
        path = tmp_path / "clip.pt"
        torch.manual_seed(11)
        torch.save({"state_dict": open_clip.CLIP(**RANDOM_CLIP_CFG).state_dict()}, path)
    clip = load_clip(f"local-dir:{random_clip_dir}")
    text_before = clip.model.token_embedding.weight.clone()
    load_vision_checkpoint(clip, path)
    for key, value in clip.model.visual.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert torch.equal(clip.model.token_embedding.weight, text_before)


def test_mismatched_vision_checkpoint_gives_a_clear_error(tmp_path, random_clip_dir):
    wider = {**RANDOM_CLIP_CFG, "vision_cfg": {**RANDOM_CLIP_CFG["vision_cfg"], "width": 96, "head_width": 32}}
    path = tmp_path / "wide.pth.tar"
    torch.save({"vision_encoder_state_dict": finetuned_visual(0, wider)}, path)
    clip = load_clip(f"local-dir:{random_clip_dir}")
    with pytest.raises(CounterattackError, match="does not fit the vision tower.*shape mismatch"):
        load_vision_checkpoint(clip, path)
    torch.save({"vision_encoder_state_dict": {"conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(CounterattackError, match="missing: "):
        load_vision_checkpoint(clip, path)
    with pytest.raises(CounterattackError, match="not found"):
        load_vision_checkpoint(clip, tmp_path / "nowhere.pt")


def test_vision_checkpoint_that_would_run_code_is_refused(tmp_path, random_clip_dir):
    path, marker = tmp_path / "evil.pth.tar", tmp_path / "code-ran"
    torch.save({"vision_encoder_state_dict": RunsCode(marker)}, path)
    with pytest.raises(CounterattackError, match="Refusing"):
        load_vision_checkpoint(load_clip(f"local-dir:{random_clip_dir}"), path)
    assert not marker.exists()


def test_eval_with_a_vision_checkpoint_measures_tau_with_the_base_model(tmp_path, random_clip_dir):
    folder = write_image_folder(tmp_path / "imgs", {"cat": 3, "dog": 3}, seed=4)
    checkpoint = tmp_path / "finetuned.pth.tar"
    torch.save({"vision_encoder_state_dict": finetuned_visual(seed=5)}, checkpoint)
    # The same fine-tuned model as a whole folder: its undefended numbers must be the ones we get.
    finetuned_dir = write_local_dir(tmp_path / "finetuned", RANDOM_CLIP_CFG, seed=0)
    clip = load_clip(f"local-dir:{finetuned_dir}")
    load_vision_checkpoint(clip, checkpoint)
    save_file(clip.model.state_dict(), str(finetuned_dir / "open_clip_model.safetensors"))

    def run(out: str, *args: str) -> list[dict]:
        assert main(["eval", "--no-progress", "--workers", "0", "--dataset", f"imagefolder:{folder}",
                     "--attack-steps", "2", "--defense", "none,ttc", "--out", str(tmp_path / out), *args]) == 0
        results = json.loads((tmp_path / out / "results.json").read_text())
        return results["config"], results["records"]

    config, (none, ttc) = run("base-tau", "--model", f"local-dir:{random_clip_dir}",
                              "--vision-checkpoint", str(checkpoint))
    _, (none_whole, ttc_own) = run("own-tau", "--model", f"local-dir:{finetuned_dir}")
    _, (_, ttc_base) = run("base-as-tau", "--model", f"local-dir:{finetuned_dir}",
                           "--tau-model", f"local-dir:{random_clip_dir}")
    # The checkpoint is identified by the tensors it put in the vision tower; where it was read from is recorded
    # beside; the whole model's weights are those of the fine-tuned folder, whatever files they came from.
    assert config["tau_model"].startswith("base")
    assert config["vision_checkpoint"] == tensors_fingerprint(clip.model.visual)
    assert config["weights"] == tensors_fingerprint(clip.model)
    assert config["run"]["weights_from"]["vision_checkpoint"] == str(checkpoint.resolve())
    assert (none["clean_acc"], none["robust_acc"]) == (none_whole["clean_acc"], none_whole["robust_acc"])
    assert ttc["mean_score_clean"] == pytest.approx(ttc_base["mean_score_clean"], rel=1e-5)
    assert ttc["mean_score_clean"] != pytest.approx(ttc_own["mean_score_clean"], rel=1e-3)
