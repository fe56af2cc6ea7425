"""Nothing mixed: every stored batch and shard is bound to its run, weights and images are identified by content,
and no message advises deleting finished work. Each test replays the probe that found the gap."""

import json
import shutil

import pytest
from PIL import Image

from counterattack.cli import main
from counterattack.results import _checksum

from testkit import (
    RANDOM_CLIP_CFG, comparable_records, part_batches, small_eval_argv, write_image_folder, write_local_dir,
)


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path / "imgs", {"cat": 3, "dog": 3, "owl": 3}, seed=4)


def attack_argv(model_dir, folder, out, *extra) -> list[str]:
    return ["attack", "--no-progress", "--workers", "0", "--model", f"local-dir:{model_dir}", "--dataset",
            f"imagefolder:{folder}", "--attack-steps", "1", "--batch-size", "4", "--out", str(out), *map(str, extra)]


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert "delete the folder" not in err.lower() and "rm -r" not in err, err  # advice never deletes work
    return err


def test_a_folder_whose_config_was_deleted_is_not_finished_under_other_settings(tmp_path, random_clip_dir, folder,
                                                                              capsys):
    """The probe: run at eps 1, delete config.json (as the damaged-config message once said), run at eps 4."""
    out = tmp_path / "out"
    assert main(small_eval_argv(random_clip_dir, folder, out, "--eps", "1")) == 0
    lone = comparable_records(out)
    parts = (out / "parts" / "rank-0.jsonl").read_text()
    (out / "config.json").unlink()
    (out / "results.json").unlink()
    capsys.readouterr()
    assert main(small_eval_argv(random_clip_dir, folder, out, "--eps", "4")) == 2
    one_line_error(capsys, "rank-0.jsonl", "another run", "differing: attacks", "kept")
    assert not (out / "config.json").exists() and not (out / "results.json").exists()
    # The same settings rebuild config.json from the parts, which are theirs: nothing recomputed.
    assert main(small_eval_argv(random_clip_dir, folder, out, "--eps", "1")) == 0
    assert (out / "parts" / "rank-0.jsonl").read_text() == parts and comparable_records(out) == lone


def test_a_parts_file_copied_from_another_run_is_refused_naming_it(tmp_path, random_clip_dir, folder, capsys):
    assert main(small_eval_argv(random_clip_dir, folder, tmp_path / "a", "--eps", "1")) == 0
    assert main(small_eval_argv(random_clip_dir, folder, tmp_path / "b", "--eps", "2", "--limit", "3")) == 0
    shutil.copy(tmp_path / "a" / "parts" / "rank-0.jsonl", tmp_path / "b" / "parts" / "rank-1.jsonl")
    capsys.readouterr()
    assert main(small_eval_argv(random_clip_dir, folder, tmp_path / "b", "--eps", "2", "--limit", "3")) == 2
    one_line_error(capsys, "rank-1.jsonl", "another run", "differing: attacks, limit")
    assert main(["report", str(tmp_path / "b")]) == 2  # reading the folder refuses it too
    one_line_error(capsys, "rank-1.jsonl", "another run")


def test_a_folder_of_an_earlier_release_is_named_so_and_moved_aside_not_deleted(tmp_path, random_clip_dir, folder,
                                                                                 capsys):
    out = tmp_path / "old"
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 0
    parts = out / "parts" / "rank-0.jsonl"
    # What the earlier layout wrote: checksummed batch lines that name no run.
    batches = [line["batch"] for line in map(json.loads, parts.read_text().splitlines()) if "batch" in line]
    parts.write_text("".join(json.dumps({"batch": b, "checksum": _checksum({"batch": b})}) + "\n" for b in batches))
    (out / "results.json").unlink()
    capsys.readouterr()
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 2
    one_line_error(capsys, "rank-0.jsonl", "earlier release", "move")


def test_a_shard_copied_from_another_set_is_refused(tmp_path, random_clip_dir, folder, capsys):
    assert main(attack_argv(random_clip_dir, folder, tmp_path / "a", "--eps", "1")) == 0
    assert main(attack_argv(random_clip_dir, folder, tmp_path / "b", "--eps", "2")) == 0
    foreign = sorted((tmp_path / "a" / "shards").glob("*.safetensors"))[0]
    shutil.copy(foreign, tmp_path / "b" / "shards" / "rank-1-000000.safetensors")
    capsys.readouterr()
    common = small_eval_argv(random_clip_dir, folder, tmp_path / "x")[:8]
    assert main([*common, "--defense", "none", "--adversarial", str(tmp_path / "b"), "--out", str(tmp_path / "e")]) == 2
    one_line_error(capsys, "rank-1-000000.safetensors", "another run", "differing: attacks")


def test_a_set_without_its_config_is_read_from_its_shards(tmp_path, random_clip_dir, folder):
    adv = tmp_path / "adv"
    assert main(attack_argv(random_clip_dir, folder, adv)) == 0
    common = small_eval_argv(random_clip_dir, folder, tmp_path / "x")[:8]
    assert main([*common, "--defense", "none,ttc", "--adversarial", str(adv), "--out", str(tmp_path / "e1")]) == 0
    (adv / "config.json").unlink()
    assert main([*common, "--defense", "none,ttc", "--adversarial", str(adv), "--out", str(tmp_path / "e2")]) == 0
    assert comparable_records(tmp_path / "e1") == comparable_records(tmp_path / "e2")


def test_eval_pointed_at_an_adversarial_set_keeps_the_set(tmp_path, random_clip_dir, folder, capsys):
    adv = tmp_path / "adv"
    assert main(attack_argv(random_clip_dir, folder, adv)) == 0
    shards = sorted(p.name for p in (adv / "shards").iterdir())
    capsys.readouterr()
    assert main(small_eval_argv(random_clip_dir, folder, adv)) == 2
    one_line_error(capsys, "holds an adversarial set", "Use another --out", "kept")
    assert sorted(p.name for p in (adv / "shards").iterdir()) == shards


def test_weights_are_the_tensors_loaded_not_the_files_beside_them(tmp_path, folder, capsys):
    """A notes.json or a backup .safetensors in the model folder changes no weight: the same run."""
    model = write_local_dir(tmp_path / "model", RANDOM_CLIP_CFG, seed=0)
    out = tmp_path / "out"
    assert main(small_eval_argv(model, folder, out)) == 0
    parts = (out / "parts" / "rank-0.jsonl").read_text()
    (model / "notes.json").write_text(json.dumps({"trained": "somewhere"}))
    shutil.copy(model / "open_clip_model.safetensors", model / "backup.safetensors")
    assert main(small_eval_argv(model, folder, out)) == 0
    assert (out / "parts" / "rank-0.jsonl").read_text() == parts
    # New weights written with the old file's modification time: still other weights.
    stat = (model / "open_clip_model.safetensors").stat()
    write_local_dir(tmp_path / "other", RANDOM_CLIP_CFG, seed=1)
    shutil.copy(tmp_path / "other" / "open_clip_model.safetensors", model / "open_clip_model.safetensors")
    import os

    os.utime(model / "open_clip_model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    assert main(small_eval_argv(model, folder, out)) == 2
    one_line_error(capsys, "another configuration", "weights")


def test_two_same_size_images_swapped_are_another_dataset(tmp_path, random_clip_dir, folder, capsys):
    """The probe: same-size files swapped between two runs mixed old and new images on resume."""
    out = tmp_path / "out"
    assert main(small_eval_argv(random_clip_dir, folder, out, "--limit", "6")) == 0
    first, second = folder / "cat" / "0000.png", folder / "dog" / "0000.png"
    a, b = Image.open(first).copy(), Image.open(second).copy()
    a.save(second)
    b.save(first)
    capsys.readouterr()
    assert main(small_eval_argv(random_clip_dir, folder, out, "--limit", "6")) == 2
    one_line_error(capsys, "another configuration", "datasets")


def test_a_conflict_names_both_lines_and_how_to_drop_one(tmp_path, random_clip_dir, folder, capsys):
    """Two results for one image in the same parts file: both lines named, one line to drop, nothing else lost."""
    out = tmp_path / "out"
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 0
    part = out / "parts" / "rank-0.jsonl"
    lines = part.read_text().splitlines()
    batch = json.loads(lines[1])["batch"]
    batch["defenses"]["none"]["clean"]["pred"][0] += 1
    from counterattack.records import BatchRecord
    from counterattack.results import ResultsStore

    store = ResultsStore(out)
    store.read_bound()
    store.append(BatchRecord.from_json(batch))
    capsys.readouterr()
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 2
    error = one_line_error(capsys, "two different results", "rank-0.jsonl, line 2",
                           f"rank-0.jsonl, line {len(lines) + 1}", "sed -i")
    assert f"'{len(lines) + 1}d'" in error
    part.write_text("\n".join(lines) + "\n")  # the fix the message names: drop the added line
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 0
    assert len(part_batches(out)) == len(lines) - 1


# --- layouts that cannot change n, and fewer silent acceptances ---------------------------------------------


def test_an_out_inside_the_dataset_folder_or_empty_is_refused_before_any_work(tmp_path, random_clip_dir, folder,
                                                                           capsys):
    assert main(small_eval_argv(random_clip_dir, folder, folder / "cat" / "runs")) == 2
    one_line_error(capsys, "inside the dataset folder", "outside it")
    assert not (folder / "cat" / "runs").exists()
    with pytest.raises(SystemExit) as exited:
        main(small_eval_argv(random_clip_dir, folder, ""))
    assert exited.value.code == 2
    one_line_error(capsys, "an empty --out")


def test_two_folders_that_tables_would_name_alike_are_refused(tmp_path, random_clip_dir, capsys):
    first = write_image_folder(tmp_path / "x" / "test", {"cat": 1, "dog": 1})
    second = write_image_folder(tmp_path / "p" / "x" / "test", {"cat": 1, "dog": 1})
    assert main(small_eval_argv(random_clip_dir, first, tmp_path / "out", "--dataset", f"imagefolder:{second}")) == 2
    one_line_error(capsys, "would both be called 'x/test'")
    assert not (tmp_path / "out").exists()


def test_a_batch_size_beyond_the_machines_integers_is_one_line(tmp_path, random_clip_dir, folder, capsys):
    with pytest.raises(SystemExit) as exited:
        main(small_eval_argv(random_clip_dir, folder, tmp_path / "out", "--batch-size", 10**30))
    assert exited.value.code == 2
    one_line_error(capsys, "--batch-size", "must be <=")


def test_a_repeated_noise_budget_and_an_unused_checkpoint_are_said(tmp_path, caplog):
    from counterattack.cli import build_parser, config_from_args
    from counterattack.commands.reproduce import _checkpoints
    from counterattack.presets import PRESETS

    with caplog.at_level("WARNING"):
        config = config_from_args(build_parser().parse_args(["stability", "--noise", "4,1,4", "--out", str(tmp_path)]))
    assert config.study.noise == (4 / 255, 1 / 255) and "gives a budget twice" in caplog.text
    checkpoint = tmp_path / "tecoa.pt"
    checkpoint.write_bytes(b"")
    config = config_from_args(build_parser().parse_args(["reproduce", "ttc-table1", "--tecoa-checkpoint",
                                                         str(checkpoint)]))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert _checkpoints(PRESETS["ttc-table1"], config) == {"openai": None}
    assert "--tecoa-checkpoint is not used: ttc-table1 runs the openai backbone(s)" in caplog.text


# --- say something at once ------------------------------------------------------------------------------------


def test_a_run_starts_with_a_probe_batch_and_says_its_estimate(tmp_path, random_clip_dir, folder, capsys,
                                                              monkeypatch):
    from counterattack.commands.estimate import Estimate
    from counterattack.evaluate import PROBE_IMAGES

    monkeypatch.setattr(Estimate, "WORTH_SAYING", 0.0)  # every run is "long" here
    out = tmp_path / "out"
    assert main(small_eval_argv(random_clip_dir, folder, out)) == 0
    assert [len(batch["ids"]) for batch in part_batches(out)] == [PROBE_IMAGES, 4, 3]
    err = capsys.readouterr().err
    assert f"estimate from the first {PROBE_IMAGES} images" in err and "(refined)" in err
    # Under adaptive attacks the masking verdict's doubled attacks come after the batches: the estimate says so.
    assert main(small_eval_argv(random_clip_dir, folder, tmp_path / "adaptive", "--threat", "adaptive",
                                "--convergence-images", 2)) == 0
    assert "for the masking checks (twice the steps and EOT draws on 2 images" in capsys.readouterr().err
    # AutoAttack's draws depend on which images share a batch: no probe there.
    adv = tmp_path / "adv"
    assert main(attack_argv(random_clip_dir, folder, adv, "--attack", "autoattack-paper", "--autoattack-paper-steps",
                            2)) == 0
    from counterattack.adversarial import AdversarialSet

    assert sorted(len(ids) for _, ids in
                  ((p.dataset, p.ids) for p in AdversarialSet.open(adv).pieces())) == [1, 4, 4]
