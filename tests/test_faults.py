"""Nothing silently wrong: bad inputs, changed weights, broken stores and file-system faults are one line each,
and nothing finished is lost."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from counterattack import (
    PGD, TTC, DtypeError, ImageRandomness, LabelError, PixelRangeError, RandomnessError, ShapeError, ZeroShotClassifier,
    defended, load_clip,
)
from counterattack.adversarial import tensor_checksum
from counterattack.cli import main
from counterattack.errors import CounterattackError
from counterattack.store import hold

from testkit import (
    CIFAR10_CLASSES, RANDOM_CLIP_CFG, comparable_records, part_batches, small_eval_argv, write_image_folder,
    write_local_dir,
)


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path / "imgs", {"cat": 3, "dog": 3, "owl": 3}, seed=4)


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# --- inputs the API takes --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, error, fragment", [
    (lambda x: (x * 255).to(torch.uint8), DtypeError, "images.float() / 255"),
    (lambda x: x * 255, PixelRangeError, "must lie in [0, 1]"),
    (lambda x: (x - 0.5) / 0.25, PixelRangeError, "before normalisation"),
    (lambda x: x.masked_fill(x > 0.9, float("nan")), PixelRangeError, "NaN"),
    (lambda x: x > 0.5, DtypeError, "torch.bool"),
    (lambda x: x[:0], ShapeError, "non-empty"),
    (lambda x: x[:, :1], ShapeError, "(N, 3, H, W)"),
])
def test_the_classifier_refuses_what_is_not_pixels(random_classifier, images, bad, error, fragment):
    for entry in (random_classifier.logits, random_classifier.encode_image):
        with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            entry(bad(images))
    # float64 pixels are pixels: the same logits as float32's
    assert torch.allclose(random_classifier.logits(images.double()), random_classifier.logits(images), atol=1e-5)


def test_attacks_and_defenses_refuse_bad_labels_and_missing_randomness(random_classifier, images):
    labels = torch.zeros(len(images), dtype=torch.long)
    rng = ImageRandomness.from_seed(0, len(images))
    with pytest.raises(LabelError, match=r"\[0, 9\]"):
        PGD(steps=1)(random_classifier, images, labels + 10, rng)
    with pytest.raises(ShapeError, match="one label per image"):
        PGD(steps=1)(random_classifier, images, labels[:2], rng)
    with pytest.raises(DtypeError, match="integer class labels"):
        PGD(steps=1)(random_classifier, images, labels.float(), rng)
    with pytest.raises(RandomnessError, match="ImageRandomness.from_seed"):
        PGD(steps=1)(random_classifier, images, labels, None)
    with pytest.raises(RandomnessError):
        TTC()(random_classifier, images, None)
    with pytest.raises(ShapeError, match="6 images but 2 random streams"):
        TTC()(random_classifier, images, ImageRandomness.from_seed(0, 2))
    with pytest.raises(PixelRangeError):
        defended(random_classifier, TTC())(images * 3)


def test_a_bad_device_is_one_line(random_clip_dir):
    with pytest.raises(CounterattackError, match="Unknown device 'gpu'"):
        load_clip(f"local-dir:{random_clip_dir}", device="gpu")


# --- weights: identity by content, finite values ---------------------------------------------------------

def test_new_weights_behind_the_same_path_are_refused_and_another_path_to_the_same_weights_resumes(
        tmp_path, folder, capsys):
    model = write_local_dir(tmp_path / "model", RANDOM_CLIP_CFG, seed=0)
    out = tmp_path / "out"
    assert main(small_eval_argv(model, folder, out)) == 0
    lone = comparable_records(out)
    # The same weights by another path (a symlink, and a relative spelling): the same run, nothing recomputed.
    (tmp_path / "link").symlink_to(model)
    parts = (out / "parts" / "rank-0.jsonl").read_text()
    assert main(small_eval_argv(tmp_path / "link", folder, out)) == 0
    assert (out / "parts" / "rank-0.jsonl").read_text() == parts and comparable_records(out) == lone
    # Other weights written behind the same path: refused, naming what differs.
    write_local_dir(model, RANDOM_CLIP_CFG, seed=1)
    capsys.readouterr()
    assert main(small_eval_argv(model, folder, out)) == 2
    one_line_error(capsys, "another configuration", "weights")


def test_ttcs_tau_model_is_part_of_the_run_by_its_weights_not_its_path(tmp_path, random_clip_dir, folder, capsys):
    tau_model = write_local_dir(tmp_path / "tau", RANDOM_CLIP_CFG, seed=3)
    out = tmp_path / "out"
    assert main(small_eval_argv(random_clip_dir, folder, out, "--tau-model", f"local-dir:{tau_model}")) == 0
    parts = (out / "parts" / "rank-0.jsonl").read_text()
    (tmp_path / "link").symlink_to(tau_model)
    assert main(small_eval_argv(random_clip_dir, folder, out, "--tau-model", f"local-dir:{tmp_path / 'link'}")) == 0
    assert (out / "parts" / "rank-0.jsonl").read_text() == parts  # the same weights: nothing recomputed
    write_local_dir(tau_model, RANDOM_CLIP_CFG, seed=4)
    capsys.readouterr()
    assert main(small_eval_argv(random_clip_dir, folder, out, "--tau-model", f"local-dir:{tau_model}")) == 2
    one_line_error(capsys, "another configuration", "tau_model")


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, folder, capsys):
    model = write_local_dir(tmp_path / "model", RANDOM_CLIP_CFG, seed=0)
    weights = load_file(str(model / "open_clip_model.safetensors"))
    weights["visual.proj"][0, 0] = float("nan")
    save_file(weights, str(model / "open_clip_model.safetensors"))
    assert main(small_eval_argv(model, folder, tmp_path / "out")) == 2
    one_line_error(capsys, "visual.proj", "NaN or infinite")
    assert not (tmp_path / "out" / "results.json").exists()


def test_weights_that_overflow_to_non_finite_outputs_stop_the_run(tmp_path, folder, capsys):
    model = write_local_dir(tmp_path / "model", RANDOM_CLIP_CFG, seed=0)
    weights = load_file(str(model / "open_clip_model.safetensors"))
    weights["visual.proj"] = weights["visual.proj"] * 1e38  # finite, until a product overflows
    save_file(weights, str(model / "open_clip_model.safetensors"))
    assert main([*small_eval_argv(model, folder, tmp_path / "out"), "--defense", "none"]) == 2  # no gate to see it
    one_line_error(capsys, "non-finite image embedding norms")
    assert not (tmp_path / "out" / "results.json").exists()
    # `attack` too: no shard of broken images is stored.
    assert main(["attack", *small_eval_argv(model, folder, tmp_path / "adv")[1:8], "--out", str(tmp_path / "adv")]) == 2
    one_line_error(capsys, "non-finite image embedding norms")
    assert not list((tmp_path / "adv").rglob("*.safetensors"))


# --- one run per folder ----------------------------------------------------------------------------------

def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(tmp_path, random_clip_dir, folder, capsys):
    out = tmp_path / "out"
    with hold(out):
        assert main(small_eval_argv(random_clip_dir, folder, out)) == 2
        one_line_error(capsys, "in use by another run", f"process {os.getpid()}")
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 0  # released with its holder


def test_a_run_holds_its_folder_while_a_second_is_refused_and_its_results_equal_a_lone_run(
        tmp_path, random_clip_dir, folder, capsys):
    """The process boundary is the point: the first run is another process, busy in the folder."""
    lone = tmp_path / "lone"
    assert main(small_eval_argv(random_clip_dir, folder, lone)) == 0
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "counterattack", *small_eval_argv(random_clip_dir, folder, out)],
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lock = out / ".counterattack.lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text()) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second could try"
    capsys.readouterr()
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 2
    one_line_error(capsys, "in use by another run", f"process {first.pid}")
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-2000:]
    assert comparable_records(out) == comparable_records(lone)


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_an_out_that_cannot_be_a_folder_is_one_line_before_any_work(tmp_path, random_clip_dir, folder, capsys, where):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" if where == "a file" else tmp_path / "file" / "out"
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 2
    one_line_error(capsys, "--out")


def test_a_run_refused_before_any_work_leaves_no_new_folder_behind(tmp_path, random_clip_dir, folder, capsys):
    out = tmp_path / "new" / "out"
    assert main(small_eval_argv(random_clip_dir, tmp_path / "no-such-images", out)) == 2
    one_line_error(capsys, "no-such-images")
    assert not out.exists()
    out.mkdir(parents=True)  # a folder that was there before stays
    assert main(small_eval_argv(random_clip_dir, tmp_path / "no-such-images", out)) == 2
    assert out.is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_one_line(tmp_path, random_clip_dir, folder, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert main(small_eval_argv(random_clip_dir, folder, out)) == 2
        one_line_error(capsys, "--out")
    finally:
        out.chmod(0o700)


# --- a damaged store: one line saying how to recover; the finished batches then load ---------------------

@pytest.fixture
def finished(tmp_path, random_clip_dir, folder):
    """A finished run (3 batches of 4, 4, 1 images) and its records."""
    out = tmp_path / "out"
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 0
    return out, comparable_records(out)


def lines_of(out):
    return (out / "parts" / "rank-0.jsonl").read_text().splitlines(keepends=True)


def write_lines(out, lines):
    (out / "parts" / "rank-0.jsonl").write_text("".join(lines))


@pytest.mark.parametrize("damage", ["garbage", "empty object", "non-utf-8", "edited prediction"])
def test_a_damaged_part_line_is_named_and_deleting_it_recovers(finished, random_clip_dir, folder, capsys, damage):
    out, lone = finished
    lines = [line.encode() for line in lines_of(out)]  # the run's header, then one line per batch
    edited = json.loads(lines[1])
    edited["batch"]["defenses"]["none"]["clean"]["pred"][0] += 1
    damaged = {"garbage": b"{not json\n", "empty object": b"{}\n", "non-utf-8": b"\xff\xfe{\n",
               "edited prediction": json.dumps(edited).encode() + b"\n"}[damage]
    part = out / "parts" / "rank-0.jsonl"
    part.write_bytes(b"".join([lines[0], damaged, *lines[2:]]))
    capsys.readouterr()
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 2
    one_line_error(capsys, "rank-0.jsonl, line 2", "Drop that line")
    part.write_bytes(b"".join([lines[0], *lines[2:]]))  # the fix the message names: its images are evaluated again
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 0
    assert comparable_records(out) == lone


@pytest.mark.parametrize("damage", ["invalid", "empty", "a folder"])
def test_a_damaged_config_is_named_and_deleting_it_recovers(finished, random_clip_dir, folder, capsys, damage):
    out, lone = finished
    config = out / "config.json"
    config.unlink()
    if damage == "a folder":
        config.mkdir()
    else:
        config.write_text("{oops" if damage == "invalid" else "")
    parts = lines_of(out)
    capsys.readouterr()
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 2
    one_line_error(capsys, "config.json is damaged", "Move it aside")
    shutil.rmtree(config) if config.is_dir() else config.unlink()
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 0
    assert lines_of(out) == parts and comparable_records(out) == lone  # the finished batches were kept, not recomputed


def test_a_torn_last_line_is_still_dropped_silently(finished, random_clip_dir, folder):
    out, lone = finished
    lines = lines_of(out)
    write_lines(out, lines[:-1] + [lines[-1][:20]])
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 0
    assert comparable_records(out) == lone


def test_a_doubled_batch_with_identical_results_is_kept_once(finished, random_clip_dir, folder):
    out, lone = finished
    shutil.copy(out / "parts" / "rank-0.jsonl", out / "parts" / "rank-1.jsonl")  # the same batches, written twice
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 0
    assert comparable_records(out) == lone


def test_doubled_images_with_different_results_are_refused_naming_both_lines(finished, random_clip_dir, folder,
                                                                             capsys):
    out, _ = finished
    other = json.loads(lines_of(out)[1])["batch"]
    other["defenses"]["none"]["clean"]["pred"][0] += 1  # another run's different result for the same image
    from counterattack.records import BatchRecord
    from counterattack.results import ResultsStore

    store = ResultsStore(out, rank=1)
    store.read_bound()
    store.append(BatchRecord.from_json(other))
    capsys.readouterr()
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 2
    one_line_error(capsys, "two different results", "rank-0.jsonl, line 2", "rank-1.jsonl, line 2")


@pytest.mark.parametrize("damage", ["cut", "a record without its defense", "an accuracy as text"])
def test_a_damaged_results_json_under_report_is_one_line(finished, capsys, damage):
    out, _ = finished
    results = json.loads((out / "results.json").read_text())
    if damage == "cut":
        (out / "results.json").write_text('{"records": [')
    else:
        record = results["records"][0]
        if damage == "an accuracy as text":
            record["robust_acc"] = str(record["robust_acc"])
        else:
            del record["defense"]
        (out / "results.json").write_text(json.dumps(results))
    assert main(["report", str(out)]) == 2
    one_line_error(capsys, "results.json is damaged", "run the command that made it again")


def test_a_truncated_shard_is_named_and_deleting_it_recovers(tmp_path, random_clip_dir, folder, capsys):
    common = ["--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}", "--dataset",
              f"imagefolder:{folder}", "--attack-steps", "1", "--batch-size", "4"]
    adv = tmp_path / "adv"
    assert main(["attack", *common, "--out", str(adv)]) == 0
    shard = sorted((adv / "shards").glob("*.safetensors"))[1]
    intact = {k: v.clone() for k, v in load_file(str(shard)).items()}  # not views of a file about to be cut
    with safe_open(str(shard), framework="pt") as f:
        dataset, ids = f.metadata()["dataset"], json.loads(f.metadata()["ids"])
    shard.write_bytes(shard.read_bytes()[:200])
    assert main(["eval", *common[:-4], "--adversarial", str(adv), "--out", str(tmp_path / "e")]) == 2
    one_line_error(capsys, shard.name, "Move it out of the folder")
    shard.unlink()
    assert main(["attack", *common, "--out", str(adv)]) == 0
    # Crafted anew, the same images (in however many shards the new run wrote them).
    from counterattack.adversarial import AdversarialSet

    anew = AdversarialSet.open(adv)
    assert anew.labels(dataset, ids) == intact["labels"].tolist()
    assert torch.equal(anew.images(dataset, ids, "pgd"), intact["adv/pgd"])


def test_a_stored_image_beyond_its_budget_is_refused_naming_the_shard(tmp_path, random_clip_dir, folder, capsys):
    common = ["--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}", "--dataset",
              f"imagefolder:{folder}"]
    adv = tmp_path / "adv"
    assert main(["attack", *common, "--attack-steps", "1", "--out", str(adv)]) == 0
    shard = sorted((adv / "shards").glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    with safe_open(str(shard), framework="pt") as f:
        metadata = f.metadata()
    tensors["adv/pgd"] = (tensors["adv/pgd"] + 8 / 255).clamp(0, 1)  # 8/255 away: not a 1/255 image
    # Whole and checksummed (a foreign shard, not a damaged one): the budget check is what must refuse it.
    metadata["checksums"] = json.dumps({key: tensor_checksum(tensor) for key, tensor in tensors.items()})
    save_file(tensors, str(shard), metadata=metadata)
    capsys.readouterr()
    assert main(["eval", *common, "--adversarial", str(adv), "--out", str(tmp_path / "e")]) == 2
    one_line_error(capsys, shard.name, "not a pgd image of budget 1/255")


# --- folders that make no benchmark -------------------------------------------------------------------------

def test_a_one_class_folder_and_colliding_class_names_are_refused(tmp_path, random_clip_dir, capsys):
    one = write_image_folder(tmp_path / "one", {"cat": 3})
    assert main(small_eval_argv(random_clip_dir, one, tmp_path / "o1")) == 2
    one_line_error(capsys, "holds one class (cat)")
    both = write_image_folder(tmp_path / "both", {"sea_lion": 2, "sea lion": 2})
    assert main(small_eval_argv(random_clip_dir, both, tmp_path / "o2")) == 2
    one_line_error(capsys, "'sea lion'", "Rename one")


def test_repeated_class_names_are_warned_about(random_clip_dir, caplog):
    clip = load_clip(f"local-dir:{random_clip_dir}")
    with caplog.at_level(logging.WARNING):
        ZeroShotClassifier.from_clip(clip, ["person", "cat", "person"])
    assert "'person'" in caplog.text and "cannot be told apart" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ZeroShotClassifier.from_clip(clip, CIFAR10_CLASSES)
    assert caplog.text == ""


# --- adaptive never above transfer ---------------------------------------------------------------------------

def test_an_adaptive_image_counts_as_robust_only_if_it_survives_the_transfer_attack_too(tmp_path, random_clip_dir,
                                                                                        folder):
    out = tmp_path / "adaptive"
    assert main([*small_eval_argv(random_clip_dir, folder, out), "--threat", "adaptive"]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    for record in records:
        assert record["robust_acc"] <= min(record[f"robust_acc_{part}"] for part in ("transfer", "exact", "bpda"))
    for batch in part_batches(out):
        for result in batch["defenses"].values():
            adv = result["adv"]["pgd"]
            parts = adv["components"]
            assert sorted(parts) == ["bpda", "exact", "transfer"]
            for i, label in enumerate(batch["labels"]):
                survives_all = all(part["pred"][i] == label for part in parts.values())
                assert (adv["pred"][i] == label) == survives_all


def test_results_json_never_holds_nan(tmp_path):
    from counterattack.store import write_json_atomically

    with pytest.raises(ValueError):
        write_json_atomically(tmp_path / "results.json", {"x": float("nan")})
    assert list(tmp_path.iterdir()) == []  # nothing half-written either


def _can_mount_tmpfs(where) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir(exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(where)]
    return subprocess.run(mount, capture_output=True).returncode == 0


def test_a_full_disk_stops_cleanly_and_the_same_command_resumes(tmp_path, random_clip_dir, folder, capsys):
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("needs root and tmpfs to fill a small disk")
    try:
        lone = tmp_path / "lone"
        assert main(small_eval_argv(random_clip_dir, folder, lone, "--batch-size", "1")) == 0
        out = disk / "out"
        capsys.readouterr()
        assert main(small_eval_argv(random_clip_dir, folder, out, "--batch-size", "1")) == 2
        one_line_error(capsys, "No space left on device", "Finished work is kept")
        for path in out.rglob("*"):  # nothing half-written: every file whole
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".png":
                assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 100
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        assert main(small_eval_argv(random_clip_dir, folder, out, "--batch-size", "1")) == 0
        assert comparable_records(out) == comparable_records(lone)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_full_disk_under_attack_stops_cleanly_and_the_same_command_finishes_the_set(
    tmp_path, random_clip_dir, folder, capsys
):
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("needs root and tmpfs to fill a small disk")
    try:
        argv = ["attack", "--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}", "--dataset",
                f"imagefolder:{folder}", "--attack-steps", "1", "--batch-size", "1"]
        lone = tmp_path / "lone"
        assert main([*argv, "--out", str(lone)]) == 0
        out = disk / "adv"
        capsys.readouterr()
        assert main([*argv, "--out", str(out)]) == 2
        one_line_error(capsys, "No space left on device", "Finished work is kept")
        assert not list(out.rglob("*.tmp"))  # the shard being written is not left behind
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        assert main([*argv, "--out", str(out)]) == 0
        from counterattack.adversarial import AdversarialSet

        finished, alone = AdversarialSet.open(out), AdversarialSet.open(lone)
        ((dataset, ids),) = alone.done().items()
        assert finished.done() == alone.done()
        assert torch.equal(finished.images(dataset, sorted(ids), "pgd"), alone.images(dataset, sorted(ids), "pgd"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
