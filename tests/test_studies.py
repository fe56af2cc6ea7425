"""Attack once, study everything: stored adversarial sets, sweeps, gate calibration and seeds (the CLI end to end)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from counterattack.adversarial import AdversarialSet
from counterattack.cli import main
from counterattack.results import ResultsStore

from testkit import comparable_records, free_port, part_batches, write_image_folder

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "imgs", {"cat": 4, "dog": 4, "sea_lion": 4}, seed=5)


@pytest.fixture
def common(random_clip_dir, folder) -> list[str]:
    return ["--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}",
            "--dataset", f"imagefolder:{folder}"]


ATTACK = ["--attack-steps", "2", "--eps", "4"]  # what crafting commands add: a short attack


def run(*argv) -> int:
    return main([str(a) for a in argv])


def per_image(out: Path) -> dict:
    """(image id, defense) -> that image's clean and adversarial results, from a run folder's batches."""
    found = {}
    for batch in part_batches(out):
        for i, image_id in enumerate(batch["ids"]):
            for defense, result in batch["defenses"].items():
                found[(image_id, defense)] = {
                    "clean": {k: v and v[i] for k, v in result["clean"].items()},
                    "adv": {a: {k: v and v[i] for k, v in r.items()} for a, r in result["adv"].items()}}
    return found


def records(out: Path, name: str = "results.json") -> list[dict]:
    return json.loads((out / name).read_text())["records"]


def accuracy_of(records_: list[dict], defense: str) -> tuple[float, float]:
    (record,) = [r for r in records_ if r["defense"] == defense]
    return record["clean_acc"], record["robust_acc"]


# --- Stored adversarial sets -------------------------------------------------------------------------

def test_a_stored_set_evaluates_exactly_like_a_direct_eval(tmp_path, common):
    adv = tmp_path / "adv"
    # One batch size throughout: float sums differ in the last bits between batch sizes, on clean images too.
    assert run("attack", *common, *ATTACK, "--attack", "pgd,cw", "--batch-size", "4", "--out", adv) == 0
    stored = AdversarialSet.open(adv)
    assert [a["attack"] for a in stored.config.attacks] == ["pgd", "cw"]
    assert sum(len(ids) for ids in stored.done().values()) == 12
    defended = ["--defense", "none,rn,ttc", "--batch-size", "4"]
    assert run("eval", *common, *ATTACK, "--attack", "pgd,cw", *defended, "--out", tmp_path / "direct") == 0
    assert run("eval", *common, "--adversarial", adv, *defended, "--out", tmp_path / "stored") == 0
    direct, from_set = per_image(tmp_path / "direct"), per_image(tmp_path / "stored")
    assert len(direct) == 36 and direct == from_set
    config = json.loads((tmp_path / "stored" / "results.json").read_text())["config"]
    assert config["adversarial"] == {"hash": stored.hash, "seed": 0}
    assert [a["attack"] for a in config["attacks"]] == ["pgd", "cw"]


def test_stored_images_are_the_attacks_output_bit_for_bit(tmp_path, common, random_clip_dir, folder):
    from counterattack import PGD, RunSettings, ZeroShotClassifier, load_clip, load_dataset
    from counterattack.evaluate import craft_dataset

    adv = tmp_path / "adv"
    assert run("attack", *common, *ATTACK, "--out", adv) == 0
    clip = load_clip(f"local-dir:{random_clip_dir}")
    data = load_dataset(f"imagefolder:{folder}", clip, "data")
    classifier = ZeroShotClassifier.from_clip(clip, data.class_names, data.templates)
    stored = AdversarialSet.open(adv)
    crafted = 0
    crafting = craft_dataset(classifier, data, [PGD(eps=4 / 255, steps=2)], RunSettings(batch_size=128))
    for ids, labels, _, images in crafting:
        assert torch.equal(stored.images(data.name, ids, "pgd"), images["pgd"])
        assert stored.labels(data.name, ids) == labels.tolist()
        crafted += len(ids)
    assert crafted == 12


def test_an_interrupted_attack_resumes_to_the_same_images(tmp_path, common):
    adv = tmp_path / "adv"
    assert run("attack", *common, *ATTACK, "--batch-size", "5", "--out", adv) == 0
    first = AdversarialSet.open(adv)
    (dataset,) = first.done()
    ids = sorted(first.done()[dataset])
    before = first.images(dataset, ids, "pgd")
    shards = sorted((adv / "shards").glob("*.safetensors"))
    assert len(shards) == 3
    shards[-1].unlink()  # as if killed before the last batch was written
    assert len(AdversarialSet.open(adv).done()[dataset]) == 7  # a probe batch of 2 and a batch of 5 remain
    assert run("attack", *common, *ATTACK, "--batch-size", "5", "--out", adv) == 0
    assert torch.equal(AdversarialSet.open(adv).images(dataset, ids, "pgd"), before)


def test_a_set_made_for_other_settings_is_refused_naming_the_difference(tmp_path, common, folder, capsys):
    adv = tmp_path / "adv"
    assert run("attack", *common, *ATTACK, "--limit", "9", "--out", adv) == 0
    capsys.readouterr()
    for extra, named in ((["--limit", "6"], "limit: 9 in the set, 6 here"),
                         (["--limit", "9", "--prompts", "openai"], "prompts"),
                         (["--limit", "9", "--transform", "paper"], "transform")):
        assert run("eval", *common, *extra, "--adversarial", adv, "--out", tmp_path / "e") == 2
        assert named in capsys.readouterr().err
    other = write_image_folder(tmp_path / "other", {"cat": 4, "dog": 4, "sea_lion": 4}, seed=6)
    moved = [*common[:-1], f"imagefolder:{other}"]
    assert run("eval", *moved, "--limit", "9", "--adversarial", adv, "--out", tmp_path / "e") == 2
    error = capsys.readouterr().err
    assert f"was made with other settings: datasets: imagefolder:{folder.resolve()} (12 images) in the set, " in error
    assert f"imagefolder:{other.resolve()} (12 images) here" in error
    assert run("eval", *common, "--limit", "9", "--adversarial", adv, "--threat", "adaptive",
               "--out", tmp_path / "e") == 2
    assert "adaptive attacks are crafted through each defense" in capsys.readouterr().err
    assert run("eval", *common, "--adversarial", tmp_path, "--out", tmp_path / "e") == 2
    assert "is not an adversarial set" in capsys.readouterr().err
    assert run("eval", *common, "--limit", "9", "--attack-steps", "1", "--out", tmp_path / "results") == 0
    capsys.readouterr()
    assert run("eval", *common, "--limit", "9", "--adversarial", tmp_path / "results", "--out", tmp_path / "e") == 2
    assert "is not an adversarial set" in capsys.readouterr().err  # a results folder has a config.json too
    assert run("attack", *common, "--threat", "adaptive", "--out", tmp_path / "adaptive") == 2
    assert "adaptive attacks go through each defense" in capsys.readouterr().err
    another_budget = ["--attack-steps", "2", "--limit", "9", "--eps", "2"]
    assert run("attack", *common, *another_budget, "--out", adv) == 2
    assert "differing: attacks" in capsys.readouterr().err
    for flags in (["--eps", "2"], ["--cw-kappa", "3"], ["--attack", "cw"], ["--attack-precision", "bf16"]):
        assert run("eval", *common, "--limit", "9", "--adversarial", adv, *flags, "--out", tmp_path / "e") == 2
        assert f"{flags[0]}" in capsys.readouterr().err
    assert not (tmp_path / "e" / "parts").exists()


def test_an_unfinished_set_is_refused_until_the_attack_is_run_again(tmp_path, common, capsys):
    adv = tmp_path / "adv"
    assert run("attack", *common, *ATTACK, "--batch-size", "5", "--out", adv) == 0
    sorted((adv / "shards").glob("*.safetensors"))[1].unlink()  # the first full batch (a probe of 2 came first)
    capsys.readouterr()
    assert run("eval", *common, "--adversarial", adv, "--out", tmp_path / "e") == 2
    assert "is incomplete: 5 of 12 images" in capsys.readouterr().err and not (tmp_path / "e" / "parts").exists()


def test_a_set_of_an_attack_this_installation_lacks_is_one_line(tmp_path, common, capsys):
    adv = tmp_path / "adv"
    assert run("attack", *common, *ATTACK, "--out", adv) == 0
    stored = json.loads((adv / "config.json").read_text())
    stored["config"]["attacks"][0]["attack"] = "apgd-ce-only"  # made by another version, or through the API
    (adv / "config.json").write_text(json.dumps(stored))
    capsys.readouterr()
    assert run("eval", *common, "--adversarial", adv, "--out", tmp_path / "e") == 2
    err = capsys.readouterr().err
    assert "holds images of apgd-ce-only, which this installation does not have" in err and "Traceback" not in err


# --- Sweeps -----------------------------------------------------------------------------------------

def test_a_sweep_point_equals_the_single_eval(tmp_path, common):
    sweep = tmp_path / "sweep"
    assert run("sweep", *common, *ATTACK, "--defense", "ttc", "--grid", "tau_thres=0,0.2", "--grid", "eps=2,4",
               "--out", sweep) == 0
    swept = records(sweep)
    assert [r["defense"] for r in swept] == ["none", "ttc tau_thres=0 eps=2", "ttc tau_thres=0 eps=4",
                                            "ttc tau_thres=0.2 eps=2", "ttc tau_thres=0.2 eps=4"]
    assert swept[4]["setting"] == {"tau_thres": 0.2, "eps": 4}  # as --grid writes it: budgets in 1/255
    assert (sweep / "report.md").is_file() and "| ttc tau_thres=0.2 eps=4 |" in (sweep / "report.md").read_text()
    assert (sweep / "pareto.png").read_bytes()[:8] == PNG
    direct = tmp_path / "direct"
    assert run("eval", *common, *ATTACK, "--defense", "none,rn,ttc", "--out", direct) == 0
    single = records(direct)
    # TTC never counterattacking (tau_thres 0) is RN: both draw the same delta0.
    assert accuracy_of(swept, "ttc tau_thres=0 eps=4") == accuracy_of(single, "rn")
    assert accuracy_of(swept, "ttc tau_thres=0.2 eps=4") == accuracy_of(single, "ttc")
    assert accuracy_of(swept, "none") == accuracy_of(single, "none")
    by_image_sweep, by_image_eval = per_image(sweep), per_image(direct)
    for image_id, _ in [k for k in by_image_eval if k[1] == "ttc"]:
        assert by_image_sweep[(image_id, "ttc tau_thres=0.2 eps=4")] == by_image_eval[(image_id, "ttc")]
        never_counterattacking = by_image_sweep[(image_id, "ttc tau_thres=0 eps=4")]
        assert never_counterattacking["clean"]["pred"] == by_image_eval[(image_id, "rn")]["clean"]["pred"]


def test_a_sweep_on_a_stored_set_does_not_attack_again(tmp_path, common, monkeypatch):
    from counterattack import PGD

    adv = tmp_path / "adv"
    assert run("attack", *common, *ATTACK, "--out", adv) == 0

    def no_attack(*args, **kwargs):
        raise AssertionError("attacked again")

    monkeypatch.setattr(PGD, "__call__", no_attack)
    sweep = tmp_path / "sweep"
    assert run("sweep", *common, "--adversarial", adv, "--defense", "rn", "--grid", "eps=1,4", "--out", sweep) == 0
    assert not (sweep / "adversarial").exists() and len(records(sweep)) == 3


@pytest.mark.parametrize("grid, message", [("beta", "expected OPTION=V1,V2"),
                                           ("steps=1,x", "steps: must be an integer"),
                                           ("beta=1,1", "repeats a setting"),
                                           ("eps=300", "eps: must be <= 255"),
                                           ("kappa=1", "an option of ttc: eps, steps, step_size, tau_thres, beta")])
def test_a_bad_grid_is_one_line(tmp_path, common, capsys, grid, message):
    assert run("sweep", *common, "--defense", "ttc", "--grid", grid, "--out", tmp_path / "s") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command, defense, message", [
    ("sweep", "magic", "Unknown defense(s) 'magic'"), ("calibrate", "magic", "Unknown defense(s) 'magic'"),
    ("sweep", "none", "none has no options to sweep"), ("sweep", "ttc,rn", "sweep studies one defense"),
    ("eval", ",", "no defense in ','")])
def test_a_bad_defense_for_a_study_is_one_line(tmp_path, common, capsys, command, defense, message):
    grid = ["--grid", "eps=1"] if command == "sweep" else []
    try:
        code = run(command, *common, "--defense", defense, *grid, "--out", tmp_path / "s")
    except SystemExit as parse_error:  # argparse's own refusals exit
        code = parse_error.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --- Calibration ----------------------------------------------------------------------------------

@pytest.mark.parametrize("defense, flagged", [("ttc", "below"), ("mac", "above"), ("doc", "below"), ("csr", "below")])
def test_the_chosen_threshold_flags_the_target_fraction_of_clean_images(tmp_path, common, defense, flagged):
    out = tmp_path / "cal"
    assert run("calibrate", *common, *ATTACK, "--defense", defense, "--target-fpr", "0.25", "--out", out) == 0
    (entry,) = json.loads((out / "calibration.json").read_text())["calibration"]
    assert entry["flagged"] == flagged and entry["n"] == 12
    assert abs(entry["chosen"]["flagged_clean"] - 0.25) <= 1 / 12
    # The defense run at the chosen threshold does flag that fraction (its own gate, not our count).
    (chosen_folder,) = out.glob("at-*")
    (chosen_record,) = records_of(chosen_folder, entry["attack"])
    assert chosen_record["counterattacked_clean"] == pytest.approx(entry["chosen"]["flagged_clean"])
    # The AUC is the share of (clean, adversarial) pairs the score orders right, ties half.
    clean, adv = [], []
    for batch in ResultsStore(out / "current").batches():  # MAC gates every view: its rates are of views
        clean += batch.defenses[defense].clean.gate_scores()
        adv += batch.defenses[defense].adv[entry["attack"]].gate_scores()
    assert entry["scores"] == len(clean) == 12 * (2 if defense == "mac" else 1)
    sign = 1 if flagged == "above" else -1
    pairs = [(sign * a > sign * c) + 0.5 * (a == c) for a in adv for c in clean]
    assert entry["auc"] == pytest.approx(sum(pairs) / len(pairs))
    assert (out / "calibration.png").read_bytes()[:8] == PNG


def records_of(out: Path, attack: str) -> list[dict]:
    from counterattack.summary import summarize

    batches = ResultsStore(out).batches()
    return [r.to_json() for r in summarize(batches, [batches[0].dataset], list(batches[0].defenses), [attack])]


def test_calibrate_refuses_a_defense_without_a_gate_and_several_datasets(tmp_path, common, folder, capsys):
    assert run("calibrate", *common, "--defense", "rn", "--out", tmp_path / "cal") == 2
    assert "rn has no gate to calibrate; defenses with one: csr, dbd, doc, mac, ttc" in capsys.readouterr().err
    other = write_image_folder(tmp_path / "other", {"cat": 2, "dog": 2})
    assert run("calibrate", *common, "--dataset", f"imagefolder:{other}", "--out", tmp_path / "cal2") == 2
    assert "calibrate works on one --dataset" in capsys.readouterr().err


# --- Seeds --------------------------------------------------------------------------------------------

def test_seeds_report_the_mean_and_the_sample_standard_deviation(tmp_path, common):
    out = tmp_path / "seeds"
    assert run("eval", *common, *ATTACK, "--defense", "none,ttc", "--seeds", "0,1,2", "--out", out) == 0
    combined = records(out)
    per_seed = [records(out / f"seed-{seed}") for seed in (0, 1, 2)]
    for record in combined:
        values = [accuracy_of(rs, record["defense"]) for rs in per_seed]
        for k, kind in enumerate(("clean", "robust")):
            assert record[f"{kind}_acc_per_seed"] == [v[k] for v in values]
            assert record[f"{kind}_acc"] == pytest.approx(statistics.mean(v[k] for v in values))
            assert record[f"{kind}_acc_std"] == pytest.approx(statistics.stdev(v[k] for v in values))
    # The seeds change the random draws: TTC's tau differs between runs.
    assert len({accuracy_of_tau(rs) for rs in per_seed}) == 3
    direct = tmp_path / "direct"
    assert run("eval", *common, *ATTACK, "--defense", "none,ttc", "--seed", "1", "--out", direct) == 0
    assert per_image(direct) == per_image(out / "seed-1")
    (ttc,) = [r for r in combined if r["defense"] == "ttc"]
    assert f"{ttc['robust_acc']:.2f} ± {ttc['robust_acc_std']:.2f}" in (out / "report.md").read_text()


def accuracy_of_tau(records_: list[dict]) -> float:
    (ttc,) = [r for r in records_ if r["defense"] == "ttc"]
    return ttc["mean_score_clean"]


def test_a_sweep_under_torchrun_equals_one_process(tmp_path, common):
    """Two processes craft their shares of the set and evaluate their shares of it; rank 0 merges."""
    argv = ["sweep", *common, *ATTACK, "--defense", "ttc", "--grid", "tau_thres=0,0.005", "--batch-size", "4"]
    assert run(*argv, "--out", tmp_path / "one") == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
               "-m", "counterattack", *map(str, argv), "--out", str(tmp_path / "two")]
    done = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted(p.name.split("-")[1] for p in (tmp_path / "two" / "adversarial" / "shards").glob("*.safetensors"))
    assert set(shards) == {"0", "1"}
    assert comparable_records(tmp_path / "two") == comparable_records(tmp_path / "one")


def test_a_sweep_over_seeds_averages_each_setting(tmp_path, common):
    out = tmp_path / "sweep"
    assert run("sweep", *common, *ATTACK, "--grid", "tau_thres=0,0.005", "--seeds", "3,4", "--out", out) == 0
    per_seed = [records(out / f"seed-{seed}") for seed in (3, 4)]
    assert all((out / f"seed-{seed}" / "adversarial" / "config.json").is_file() for seed in (3, 4))  # each seed attacks
    for record in records(out):
        values = [accuracy_of(rs, record["defense"])[0] for rs in per_seed]
        assert record["clean_acc_per_seed"] == values
        assert record["clean_acc_std"] == pytest.approx(statistics.stdev(values))
    assert (out / "pareto.png").read_bytes()[:8] == PNG and (out / "report.md").is_file()
    # Each seed attacked anew: the spread includes the attacks' draws, and no one stored set is named.
    report = (out / "report.md").read_text()
    assert "random draws of the attacks and the defenses" in report and "read from a stored set" not in report


def test_seed_and_seeds_together_are_refused(tmp_path, common, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run("eval", *common, "--seed", "1", "--seeds", "0,1", "--out", tmp_path / "e")
    assert exit_info.value.code == 2 and "--seed and --seeds together" in capsys.readouterr().err
