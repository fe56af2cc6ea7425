"""Reproducing the papers: each preset against the table it reproduces, reproduce end to end, and its refusals."""

import json

import pytest

from counterattack.attacks import ATTACKS
from counterattack.cli import main
from counterattack.data import DATASETS
from counterattack.defenses import DEFENSES
from counterattack.presets import PRESETS
from counterattack.compare import SOURCE_QUANTIZATION
from counterattack.published import AVERAGE_KEYS, load_published

from counterattack.data import class_prompts

from testkit import TINY_CLIP_DIR, build_eurosat, needs_shared, write_descriptions

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_runs_exactly_what_its_table_printed(name):
    """The preset's settings are those of its source's records at its budget: every printed defense, attack and
    dataset is run, and nothing that no record of the table names (published.json is the reference)."""
    preset, published = PRESETS[name], load_published()
    records = [r for r in published.records if r.source == preset.source and r.backbone in preset.backbones
               and r.attack in preset.attacks and r.eps == preset.eps and r.steps == preset.steps]
    assert records, f"{name}: no published record at its settings"
    assert {r.defense for r in records} == set(preset.defenses)
    assert {r.attack for r in records} == set(preset.attacks)
    assert {r.backbone for r in records} == set(preset.backbones)
    printed = {r.dataset for r in records}
    per_dataset = printed - set(AVERAGE_KEYS)
    assert per_dataset <= set(preset.datasets)
    averages = printed & set(AVERAGE_KEYS)
    if averages:  # an average needs every dataset of its scope
        assert {d for key in averages for d in published.average_scope(key)} == set(preset.datasets)
    else:
        assert per_dataset == set(preset.datasets)
    assert preset.quantize == SOURCE_QUANTIZATION.get(preset.source)  # the table's images, stored as it stored them
    assert set(preset.datasets) <= set(DATASETS) and set(preset.defenses) <= set(DEFENSES)
    assert set(preset.attacks) <= set(ATTACKS)


def run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """EuroSAT's fake layout: the one dataset of COLA's nine under the data root."""
    build_eurosat(tmp_path / "data", monkeypatch)
    return tmp_path / "data"


@pytest.fixture
def descriptions(tmp_path):
    """Descriptions of EuroSAT's classes as the paper's prompts name them: COLA reads them."""
    return write_descriptions(tmp_path / "descriptions" / "eurosat.json", class_prompts("eurosat", "paper")[0])


def test_reproduce_runs_the_preset_through_eval_and_compares(tmp_path, data_root, descriptions, random_clip_dir,
                                                             capsys):
    out = tmp_path / "cola"
    argv = ["reproduce", "cola-table1", "--skip-missing", "--data-root", data_root, "--model",
            f"local-dir:{random_clip_dir}", "--limit", "4", "--workers", "0", "--no-progress", "--out", out,
            "--descriptions", descriptions.parent]
    assert run(*argv) == 0
    printed = capsys.readouterr().out
    assert "skipping 9 dataset(s)" in printed and "dtd" in printed
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert config["preset"] == "cola-table1"
    attacks = [(a["attack"], round(a["eps"] * 255, 6), a["steps"]) for a in config["attacks"]]
    assert attacks == [("pgd", 1, 10), ("cw", 1, 10)]
    assert [d["defense"] for d in config["defenses"]] == ["none", "rn", "hd", "tte", "ttc", "cola"]
    assert list(config["descriptions"]) == ["eurosat"]  # by the content digest of the file read
    assert {(r["dataset"], r["attack"]) for r in results["records"]} == {
        ("eurosat", a) for a in ("pgd", "cw", "worst-case")}
    assert all(r["n"] == 4 for r in results["records"])
    for name in ("comparison.md", "comparison.csv", "comparison.json"):
        assert (out / name).is_file()
    assert (out / "comparison.png").read_bytes()[:8] == PNG
    comparison = json.loads((out / "comparison.json").read_text())
    # A random local model has no published twin: every record is listed as such, none matched loosely.
    assert comparison["rows"] == [] and len(comparison["unmatched"]) == len(results["records"])
    # The same command again resumes: nothing is evaluated twice.
    parts = sorted(p.read_text() for p in (out / "parts").glob("*.jsonl"))
    assert run(*argv) == 0
    assert sorted(p.read_text() for p in (out / "parts").glob("*.jsonl")) == parts


@needs_shared
def test_reproduce_runs_on_the_tiny_clip_with_a_limit(tmp_path, data_root, descriptions):
    out = tmp_path / "cola-tiny"
    assert run("reproduce", "cola-table1", "--skip-missing", "--data-root", data_root, "--model",
               f"local-dir:{TINY_CLIP_DIR}", "--limit", "4", "--workers", "0", "--no-progress", "--out", out,
               "--descriptions", descriptions) == 0
    results = json.loads((out / "results.json").read_text())
    assert {(r["dataset"], r["defense"]) for r in results["records"]} == {
        ("eurosat", d) for d in ("none", "rn", "hd", "tte", "ttc", "cola")}
    assert all(r["n"] == 4 for r in results["records"])
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["rows"] == [] and len(comparison["unmatched"]) == len(results["records"])


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "ttc-table9"], "Unknown preset 'ttc-table9'"),
    (["reproduce", "ttc-aft", "--skip-missing"], "--tecoa-checkpoint FILE"),
    (["reproduce", "ttc-aft", "--skip-missing", "--tecoa-checkpoint", "/no/tecoa.pt", "--fare-checkpoint",
      "/no/fare.pt"], "--tecoa-checkpoint /no/tecoa.pt: no such file"),
    (["reproduce", "cola-table1", "--eps", "4"], "cola-table1 fixes what its table measured; --eps cannot change it"),
    (["reproduce", "doc-table1", "--ttc-tau-thres", "0.1"], "--ttc-tau-thres cannot change it"),
    (["reproduce", "doc-table1", "--quantize-adversarial"], "--quantize-adversarial cannot change it"),
    (["reproduce", "doc-table1", "--attack-labels", "predicted"], "--attack-labels cannot change it"),
    (["reproduce", "cola-table1", "--descriptions", "/no/file.json"], "--skip-missing"),
    (["reproduce", "cola-table1", "--skip-missing"], "cola needs class descriptions: give --descriptions PATH"),
    (["reproduce", "cola-table1", "--list"], "not both"),
    (["reproduce"], "name a preset"),
])
def test_bad_reproduce_requests_are_one_line(tmp_path, argv, message, capsys):
    assert run(*argv, "--data-root", tmp_path, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_damaged_published_numbers_stop_reproduce_and_stability_before_they_run(
    tmp_path, data_root, random_clip_dir, monkeypatch, capsys
):
    import counterattack.published as published

    monkeypatch.setattr(published, "DEFAULT_PATH", tmp_path / "gone.json")
    common = ["--model", f"local-dir:{random_clip_dir}", "--limit", "2", "--workers", "0", "--no-progress"]
    assert run("reproduce", "dbd-table1", "--skip-missing", "--data-root", data_root, *common,
               "--out", tmp_path / "dbd") == 2
    assert run("stability", "--dataset", f"imagefolder:{data_root / 'eurosat' / '2750'}", *common,
               "--out", tmp_path / "stability") == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [f"counterattack: error: Published numbers not found: {tmp_path / 'gone.json'} does not exist "
                      "or is not a file."] * 2
    assert not list(tmp_path.glob("*/parts/*.jsonl"))  # nothing was evaluated


def test_a_missing_manual_dataset_is_named_with_where_to_get_it(tmp_path, capsys):
    assert run("reproduce", "cola-table1", "--data-root", tmp_path, "--out", tmp_path / "out", "--descriptions",
               tmp_path / "descriptions") == 2
    err = capsys.readouterr().err
    assert "stanford_cars" in err and "sun397" in err and "eurosat" in err and "Download" in err


def test_list_shows_every_preset_with_an_estimate_from_a_warm_up(random_clip_dir, capsys):
    assert run("reproduce", "--list", "--model", f"local-dir:{random_clip_dir}", "--limit", "2") == 0
    printed = capsys.readouterr().out
    assert "ESTIMATES" in printed
    for name, preset in PRESETS.items():
        assert f"{name}: {preset.title}" in printed
    # Per preset: its images (2 per dataset per backbone here), passes and time.
    assert "32 images" in printed and "64 images" in printed and "20 images" in printed
    assert printed.count("encoder passes each") == len(PRESETS)


def test_report_compares_any_results_folder_with_the_published_numbers(tmp_path, random_clip_dir, data_root):
    out = tmp_path / "run"
    assert run("eval", "--model", f"local-dir:{random_clip_dir}", "--dataset", "eurosat", "--data-root", data_root,
               "--attack-steps", "1", "--defense", "none", "--workers", "0", "--no-progress", "--out", out) == 0
    assert run("report", out, "--compare", "published") == 0
    assert (out / "comparison.png").read_bytes()[:8] == PNG
    assert "Records without a published twin" in (out / "comparison.md").read_text()
