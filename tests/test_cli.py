import json
import os
import subprocess
import sys

import pytest

from counterattack.cli import main

from testkit import CIFAR10_TEST_DIR, TINY_CLIP_DIR, needs_shared, write_image_folder


def run(*args: str) -> int:
    return main(["eval", "--no-progress", "--workers", "0", *args])


def test_eval_writes_one_record_per_dataset_and_defense(tmp_path, random_clip_dir, capsys):
    first = write_image_folder(tmp_path / "a", {"cat": 3, "dog": 3}, seed=1)
    second = write_image_folder(tmp_path / "b", {"red_car": 2, "bus": 2, "van": 2}, seed=2)
    out = tmp_path / "out"
    code = run("--model", f"local-dir:{random_clip_dir}", "--dataset", f"imagefolder:{first}",
               "--dataset", f"imagefolder:{second}", "--attack-steps", "2", "--limit", "4", "--batch-size", "3",
               "--out", str(out))
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    assert [(r["dataset"].split("/")[-1], r["defense"]) for r in records] == [
        ("a", "none"), ("a", "ttc"), ("b", "none"), ("b", "ttc")]
    assert all(r["n"] == 4 and r["attack"] == "pgd" for r in records)
    none, ttc = records[0], records[1]
    assert none["mean_score_clean"] is None and none["counterattacked_adv"] is None
    assert ttc["mean_score_clean"] > 0 and 0 <= ttc["counterattacked_clean"] <= 1
    config = results["config"]
    assert config["attacks"] == [{"attack": "pgd", "eps": 1 / 255, "steps": 2, "step_size": 1 / 255, "norm": "linf"}]
    assert config["prompts"] == "paper" and config["templates"] is None and config["transform"] == "model"
    assert [d["images"] for d in config["datasets"]] == [6, 6]
    assert all(len(d["fingerprint"]) == 16 for d in config["datasets"])
    assert config["threat"] == "paper" and records[0]["threat"] == "paper" and records[0]["adaptive"] is None
    assert config["defenses"][1]["tau_thres"] == 0.2 and config["seed"] == 0 and config["limit"] == 4
    assert set(config["run"]["versions"]) == {"clip-counterattack", "torch", "torchvision", "open_clip_torch"}
    assert "robust %" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--defense", "none,magic"], "Unknown defense"),
        (["--dataset", "imagefolder:/no/such/folder"], "Image folder not found"),
        (["--model", "local-dir:/no/such/model"], "Model folder not found"),
    ],
)
def test_user_mistakes_give_a_message_not_a_traceback(tmp_path, random_clip_dir, capsys, args, message):
    folder = write_image_folder(tmp_path / "a", {"cat": 1, "dog": 1})
    base = ["--model", f"local-dir:{random_clip_dir}", "--dataset", f"imagefolder:{folder}",
            "--out", str(tmp_path / "o")]
    try:
        code = run(*base, *args)
    except SystemExit as parse_error:  # a name the registry lacks is refused while parsing, before torch loads
        code = parse_error.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@needs_shared
def test_tiny_clip_on_cifar10_matches_its_reference_numbers(tmp_path):
    """The numbers of ../shared/models/tiny-clip-cifar10/README.md, first 100 images of each class."""
    out = tmp_path / "r"
    assert run("--model", f"local-dir:{TINY_CLIP_DIR}", "--dataset", f"imagefolder:{CIFAR10_TEST_DIR}",
               "--limit", "1000", "--defense", "none,ttc", "--out", str(out)) == 0
    none, ttc = json.loads((out / "results.json").read_text())["records"]
    assert none["n"] == ttc["n"] == 1000
    assert none["clean_acc"] == pytest.approx(65.6, abs=1.0)
    assert none["robust_acc"] == pytest.approx(28.5, abs=3.0)
    assert ttc["clean_acc"] == pytest.approx(47.2, abs=3.0)
    assert ttc["robust_acc"] == pytest.approx(35.8, abs=3.0)
    assert ttc["mean_score_clean"] == pytest.approx(0.034, abs=0.005)
    assert ttc["mean_score_adv"] == pytest.approx(0.035, abs=0.005)
    # This model's tau is far below the paper's threshold: every image is counterattacked.
    assert ttc["counterattacked_clean"] == ttc["counterattacked_adv"] == 1.0


def test_a_reader_that_stops_early_is_not_an_error():
    # `counterattack prompts imagenet | head -2`: the pipe's reader is gone before the listing is written
    reader, writer = os.pipe()
    os.close(reader)
    done = subprocess.run([sys.executable, "-m", "counterattack", "prompts", "imagenet"], stdout=writer,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    os.close(writer)
    assert done.stderr == ""
    assert done.returncode == 141
