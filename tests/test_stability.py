"""The "falsely stable" experiment: TTC's tau under uniform noise on clean and adversarial images."""

import json

import pytest

from counterattack.cli import main
from counterattack.commands.stability import summarize_stability
from counterattack.records import BatchRecord

from testkit import CIFAR10_TEST_DIR, TINY_CLIP_DIR, needs_shared, part_batches, write_image_folder

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imgs"), {"cat": 4, "dog": 4, "owl": 4}, seed=3)


def stability(random_clip_dir, folder, out, *extra) -> dict:
    assert main(["stability", "--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}", "--dataset",
                 f"imagefolder:{folder}", "--attack-steps", "2", "--eps", "4", "--noise", "0,1,4,16",
                 "--batch-size", "5", "--out", str(out), *extra]) == 0
    return json.loads((out / "stability.json").read_text())


def test_tau_is_zero_without_noise_and_grows_with_the_budget(tmp_path, random_clip_dir, folder):
    found = stability(random_clip_dir, folder, tmp_path / "s")
    rows = found["stability"]
    assert [r["noise_eps"] for r in rows] == [0, 1, 4, 16] and all(r["n"] == 12 for r in rows)
    for side in ("clean", "adversarial"):
        means = [r[side]["mean"] for r in rows]
        assert means[0] == 0.0 and all(q == 0.0 for q in rows[0][side]["quantiles"].values())
        assert means == sorted(means) and means[1] < means[2] < means[3]
        for r in rows:
            q = list(r[side]["quantiles"].values())
            assert q == sorted(q)
    assert rows[0]["auc"] == 0.5  # every score ties at 0: a detector no better than chance
    assert all(0 <= r["auc"] <= 1 for r in rows)
    assert (tmp_path / "s" / "stability.png").read_bytes()[:8] == PNG
    table = (tmp_path / "s" / "stability.md").read_text()
    assert "| 4/255 | 12 |" in table and "poster" not in table  # an image folder is no dataset the poster charted


def test_the_summary_is_the_per_image_scores_the_records_hold(tmp_path, random_clip_dir, folder):
    found = stability(random_clip_dir, folder, tmp_path / "s")
    batches = part_batches(tmp_path / "s")
    rows = summarize_stability([BatchRecord.from_json(b) for b in batches], [b / 255 for b in (0, 1, 4, 16)], "pgd")
    assert [r["clean"]["mean"] for r in rows] == [r["clean"]["mean"] for r in found["stability"]]
    clean_4 = [t for b in batches for t in b["defenses"]["noise 4/255"]["clean"]["score"]]
    assert rows[2]["clean"]["mean"] == pytest.approx(sum(clean_4) / len(clean_4))


def test_an_interrupted_run_resumes_to_the_same_numbers(tmp_path, random_clip_dir, folder):
    whole = stability(random_clip_dir, folder, tmp_path / "whole")
    out = tmp_path / "cut"
    stability(random_clip_dir, folder, out)
    part = out / "parts" / "rank-0.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:1]) + lines[1][: len(lines[1]) // 2])  # a kill mid-write after the first batch
    (out / "stability.json").unlink()
    assert stability(random_clip_dir, folder, out)["stability"] == whole["stability"]


def test_a_stored_set_gives_the_same_stability_as_attacking_again(tmp_path, random_clip_dir, folder):
    common = ["--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}", "--dataset",
              f"imagefolder:{folder}", "--batch-size", "5"]
    assert main(["attack", *common, "--attack-steps", "2", "--eps", "4", "--out", str(tmp_path / "adv")]) == 0
    direct = stability(random_clip_dir, folder, tmp_path / "direct")
    assert main(["stability", *common, "--noise", "0,1,4,16", "--adversarial", str(tmp_path / "adv"),
                 "--out", str(tmp_path / "stored")]) == 0
    stored = json.loads((tmp_path / "stored" / "stability.json").read_text())
    assert stored["stability"] == direct["stability"]


@needs_shared
def test_on_the_tiny_clip_tau_starts_at_zero_and_grows_for_clean_and_adversarial_images(tmp_path):
    out = tmp_path / "tiny"
    assert main(["stability", "--no-progress", "--workers", "0", "--model", f"local-dir:{TINY_CLIP_DIR}",
                 "--dataset", f"imagefolder:{CIFAR10_TEST_DIR}", "--limit", "20", "--noise", "0,1,4,16",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "stability.json").read_text())["stability"]
    assert [r["noise_eps"] for r in rows] == [0, 1, 4, 16] and all(r["n"] == 20 for r in rows)
    for side in ("clean", "adversarial"):
        means = [r[side]["mean"] for r in rows]
        assert means[0] == 0.0 and means[1] < means[2] < means[3]
    assert (out / "stability.png").read_bytes()[:8] == PNG
