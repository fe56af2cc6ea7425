"""Runs you can trust: batch-size invariance, kill -9 and resume, torchrun, reports, refused mixes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from counterattack.cli import main
from counterattack.plots import accuracy_figure
from counterattack.records import Record

from testkit import comparable_gallery, comparable_records, free_port, write_image_folder

def eval_args(model_dir: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--no-progress", "--workers", "0", "--model", f"local-dir:{model_dir}",
            "--dataset", f"imagefolder:{folder}", "--attack-steps", "2", "--defense", "none,rn,ttc",
            "--tau-thres", "0.004", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("imgs"), {"cat": 6, "dog": 6, "sea_lion": 6}, seed=9)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, random_clip_dir, folder) -> Path:
    out = tmp_path_factory.mktemp("reference")
    assert main(eval_args(random_clip_dir, folder, out, "--batch-size", "64")) == 0
    return out


@pytest.fixture(scope="module")
def reference(reference_run) -> list[dict]:
    return comparable_records(reference_run)


def test_reference_run_mixes_gate_decisions(reference):
    ttc = [r for r in reference if r["defense"] == "ttc"][0]
    assert 0 < ttc["counterattacked_clean"] < 1 or 0 < ttc["counterattacked_adv"] < 1


def test_batch_size_one_gives_identical_records_and_gallery(tmp_path, random_clip_dir, folder, reference,
                                                           reference_run):
    assert main(eval_args(random_clip_dir, folder, tmp_path, "--batch-size", "1")) == 0
    assert comparable_records(tmp_path) == reference
    assert comparable_gallery(tmp_path) == comparable_gallery(reference_run)
    assert len(comparable_gallery(tmp_path)) == 8  # the default sample: 8 images, class-balanced


def test_rerun_resumes_without_recomputing(tmp_path, random_clip_dir, folder, reference):
    assert main(eval_args(random_clip_dir, folder, tmp_path, "--batch-size", "5")) == 0
    lines = (tmp_path / "parts" / "rank-0.jsonl").read_text().splitlines()
    assert main(eval_args(random_clip_dir, folder, tmp_path, "--batch-size", "7")) == 0
    assert (tmp_path / "parts" / "rank-0.jsonl").read_text().splitlines() == lines
    assert comparable_records(tmp_path) == reference


def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, random_clip_dir, folder, reference,
                                                                reference_run):
    args = eval_args(random_clip_dir, folder, tmp_path, "--batch-size", "1")
    command = [sys.executable, "-m", "counterattack", *args]
    parts = tmp_path / "parts" / "rank-0.jsonl"
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and (not parts.exists() or len(parts.read_bytes().splitlines()) < 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(parts.read_bytes().splitlines())
    assert 3 <= done_before < 18, "the run was killed mid-way"
    assert not (tmp_path / "results.json").exists()
    # A half-written last line, as a kill during a write leaves, is cut off and redone.
    with parts.open("ab") as f:
        f.write(b'{"dataset": "imagefolder:')
    assert main(eval_args(random_clip_dir, folder, tmp_path, "--batch-size", "4")) == 0
    assert comparable_records(tmp_path) == reference
    assert comparable_gallery(tmp_path) == comparable_gallery(reference_run)  # shards of the killed run kept once
    batches = [json.loads(line)["batch"] for line in parts.read_text().splitlines() if "batch" in json.loads(line)]
    ids = [i for b in batches for i in b["ids"]]
    files = [f"{c}/{i:04d}.png" for c in ("cat", "dog", "sea_lion") for i in range(6)]
    assert sorted(ids) == files  # nothing lost, nothing twice


def test_kill_9_of_a_run_with_loading_workers_then_an_immediate_restart_resumes(tmp_path, random_clip_dir, folder,
                                                                               reference):
    """Forked data-loading workers outlive a killed run for a few seconds: they must not keep its folder locked."""
    args = eval_args(random_clip_dir, folder, tmp_path, "--batch-size", "2")
    args[args.index("--workers") + 1] = "2"
    parts = tmp_path / "parts" / "rank-0.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "counterattack", *args],
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and (not parts.exists() or len(parts.read_bytes().splitlines()) < 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "results.json").exists(), "the run was killed mid-way"
    assert main(eval_args(random_clip_dir, folder, tmp_path, "--batch-size", "4")) == 0
    assert comparable_records(tmp_path) == reference


def test_changed_configuration_in_the_same_out_is_refused(tmp_path, random_clip_dir, folder, capsys):
    assert main(eval_args(random_clip_dir, folder, tmp_path, "--limit", "3")) == 0
    assert main(eval_args(random_clip_dir, folder, tmp_path, "--limit", "3", "--eps", "2")) == 2
    error = capsys.readouterr().err
    assert "another configuration" in error and "attack" in error


def test_torchrun_with_two_processes_equals_one(tmp_path, random_clip_dir, folder, reference, reference_run):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
               "-m", "counterattack", *eval_args(random_clip_dir, folder, tmp_path, "--batch-size", "4")]
    done = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["rank-0.jsonl", "rank-1.jsonl"]
    assert comparable_records(tmp_path) == reference
    assert comparable_gallery(tmp_path) == comparable_gallery(reference_run)  # merged from both processes


def test_the_accuracy_bars_show_one_named_attack():
    """With several attacks the dark bars are their per-image worst case, and the axis says so."""
    records = [Record("cifar10", attack, defense, 100, 80.0, robust)
               for attack, robust in (("pgd", 30.0), ("cw", 40.0), ("worst-case", 25.0)) for defense in ("none", "ttc")]
    (ax,) = accuracy_figure(records).axes
    assert sorted(bar.get_height() for bar in ax.patches) == [25.0, 25.0, 80.0, 80.0]
    assert "under worst-case" in ax.get_ylabel()
    (ax,) = accuracy_figure([r for r in records if r.attack == "cw"]).axes
    assert sorted(bar.get_height() for bar in ax.patches) == [40.0, 40.0, 80.0, 80.0] and "under cw" in ax.get_ylabel()


def test_report_writes_tables_and_valid_pictures(tmp_path, random_clip_dir, folder, capsys):
    assert main(eval_args(random_clip_dir, folder, tmp_path)) == 0
    for name in ("report.md", "report.csv", "accuracy.png"):
        assert (tmp_path / name).is_file()
    (tmp_path / "report.md").unlink()
    assert main(["report", str(tmp_path)]) == 0
    markdown = (tmp_path / "report.md").read_text()
    assert "### Clean accuracy (%)" in markdown and "| ttc |" in markdown and "average" in markdown
    assert "### Cost per image" in markdown
    pictures = sorted(tmp_path.glob("*.png"))
    # One gate histogram per dataset, named after its folder (imgs0, imgs1, ...: whichever module made one first).
    assert [p.name for p in pictures] == ["accuracy.png", f"gate_hist_{folder.name}.png"]
    for picture in pictures:
        with Image.open(picture) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
