"""Published numbers and the comparison of a run with them: exact twins only, averages named by scope, files written."""

import csv
import json
import math
import random
import sys
from pathlib import Path

import matplotlib
import pytest

from counterattack.attacks import ATTACKS
from counterattack.compare import Comparison, compare_results, run_identity
from counterattack.compare_files import write_comparison
from counterattack.data import DATASETS
from counterattack.defenses import DEFENSES
from counterattack.errors import CounterattackError
from counterattack.published import AVERAGE_KEYS, FINE_GRAINED10, load_published
from counterattack.records import Results, RunDescription

from testkit import IN_CI, SHARED

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N = 1000


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval in percent, written out here so the tests do not lean on the library's own."""
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return 100 * max(0.0, (centre - half) / scale), 100 * min(1.0, (centre + half) / scale)


@pytest.fixture(scope="module")
def published():
    return load_published()


def record(dataset: str, defense: str, attack: str, clean: int, robust: int, n: int = N, threat: str = "paper") -> dict:
    """A record as evaluate writes it, from counts of correct images."""
    return {"dataset": dataset, "attack": attack, "threat": threat, "defense": defense, "n": n,
            "clean_acc": 100 * clean / n, "robust_acc": 100 * robust / n,
            "clean_ci95": list(wilson_interval(clean, n)), "robust_ci95": list(wilson_interval(robust, n))}


def config(eps: float = 1, steps: int = 10, attack: str = "pgd", **identity) -> dict:
    """A run's config: ViT-B-32/openai unless ``identity`` says otherwise; ``eps`` in 1/255."""
    return {"model": "ViT-B-32", "pretrained": "openai", "vision_checkpoint": None, "threat": "paper", "datasets": [],
            "attacks": [{"attack": attack, "eps": eps / 255, "steps": steps, "step_size": 1 / 255}], **identity}


def results(records: list[dict], **cfg) -> dict:
    return {"config": config(**cfg), "records": records}


def compare(payload: dict, published) -> Comparison:
    """The comparison of a results.json's content, read as the library reads it."""
    return compare_results(Results.from_json(payload), published)


def write_results(folder: Path, payload: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(payload), encoding="utf-8")
    return folder


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


# ---- the data ----------------------------------------------------------------------------------------------------


def test_every_published_name_is_ours(published):
    """A dataset, defense or attack the data names but the library does not could never be matched: caught here."""
    assert len(published.records) == 354 and set(published.datasets16) <= set(DATASETS)
    for r in published.records:
        assert r.dataset in DATASETS or r.dataset in AVERAGE_KEYS, r
        assert r.defense in DEFENSES, r
        assert r.attack in ATTACKS, r
        assert r.source in published.sources, r
    assert {t.source for t in published.tau} <= set(published.sources)
    assert set(FINE_GRAINED10) <= set(DATASETS)


def test_the_package_copy_is_the_transcribed_file():
    shared = SHARED / "data" / "published" / "published.json"
    if not shared.is_file():
        if IN_CI:
            pytest.fail(f"{shared} is missing")
        pytest.skip(f"{shared} not found")
    package = Path(__import__("counterattack").__file__).with_name("data") / "published.json"
    assert json.loads(package.read_text()) == json.loads(shared.read_text())


def test_sources_say_primary_or_rerun(published):
    labels = {key: source.label for key, source in published.sources.items()}
    assert labels["ttc-poster"] == "TTC poster (primary)"
    assert labels["doc-aaai26"] == "re-run of TTC by DOC's authors (AAAI 2026)"
    assert labels["cola-neurips25"] == "re-run of TTC by COLA's authors (NeurIPS 2025)"
    assert all(label.startswith("re-run of TTC by") for key, label in labels.items() if key != "ttc-poster")


def test_loader_rejects_an_absent_file(tmp_path):
    with pytest.raises(CounterattackError) as error:
        load_published(tmp_path / "nowhere.json")
    assert "nowhere.json" in one_line(error) and "does not exist" in str(error.value)


def test_loader_rejects_a_non_json_file(tmp_path):
    path = tmp_path / "published.json"
    path.write_text("{'records': [}\n", encoding="utf-8")
    with pytest.raises(CounterattackError) as error:
        load_published(path)
    assert str(path) in one_line(error) and "not JSON" in str(error.value)


def test_loader_rejects_a_file_without_records(tmp_path):
    data = json.loads(load_published.__globals__["DEFAULT_PATH"].read_text())
    del data["records"]
    path = tmp_path / "published.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CounterattackError) as error:
        load_published(path)
    assert str(path) in one_line(error) and "'records'" in str(error.value)


def test_loader_names_a_malformed_record(tmp_path):
    data = json.loads(load_published.__globals__["DEFAULT_PATH"].read_text())
    data["records"][7]["robust"] = 350
    data["records"][9]["source"] = "somebody"
    path = tmp_path / "published.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CounterattackError) as error:
        load_published(path)
    assert "records[7]" in one_line(error) and "'robust'" in str(error.value)


# ---- matching ----------------------------------------------------------------------------------------------------


def test_run_identity():
    def identity(**given):
        return run_identity(RunDescription.from_json(config(**given)))

    assert identity() == ("ViT-B-32", "openai")
    assert identity(vision_checkpoint="/ckpt/tecoa.pt") == ("ViT-B-32", None)
    assert identity(vision_checkpoint="/ckpt/tecoa.pt", backbone="tecoa-eps1") == ("ViT-B-32", "tecoa-eps1")
    assert identity(model="local-dir:/m", pretrained=None) == ("local-dir:/m", None)


def test_a_poster_number_is_matched_exactly(published):
    """The poster's TTC on CIFAR-10 (81.18 / 28.75): the difference and the inside-interval flags from our counts."""
    ours = [record("cifar10", "ttc", "pgd", 812, 290), record("cifar10", "none", "pgd", 851, 50)]
    comparison = compare(results(ours), published)
    assert not comparison.unmatched
    rows = {r.defense: r for r in comparison.rows}
    assert set(rows) == {"ttc", "none"} and all(r.source == "ttc-poster" for r in rows.values())
    ttc = rows["ttc"]
    assert (ttc.published_clean, ttc.published_robust, ttc.eps, ttc.steps, ttc.n) == (81.18, 28.75, 1, 10, N)
    assert ttc.clean_diff == pytest.approx(81.2 - 81.18) and ttc.robust_diff == pytest.approx(29.0 - 28.75)
    low, high = wilson_interval(290, N)
    assert ttc.robust_ci95 == pytest.approx((low, high)) and ttc.robust_inside is (low <= 28.75 <= high) is True
    assert ttc.clean_inside is True
    none = rows["none"]  # 5.0% robust against the poster's 0.74: far outside our interval
    assert none.robust_diff == pytest.approx(5.0 - 0.74) and none.robust_inside is False
    assert none.clean_inside is True and none.source_label == "TTC poster (primary)"


def test_a_record_matched_by_two_sources_gives_two_rows(published):
    comparison = compare(results([record("stanford_cars", "ttc", "pgd", 481, 330)]), published)
    rows = {r.source: r for r in comparison.rows}
    assert set(rows) == {"ttc-poster", "cola-neurips25"}
    assert (rows["ttc-poster"].published_clean, rows["ttc-poster"].published_robust) == (48.16, 33.01)
    assert (rows["cola-neurips25"].published_clean, rows["cola-neurips25"].published_robust) == (48.2, 33.0)
    assert rows["cola-neurips25"].robust_diff == pytest.approx(0.0) and not comparison.unmatched


def test_a_printed_robust_without_clean_compares_robust_only(published):
    """The poster's Tab. 2 prints AFT + TTC robust only: the clean columns stay empty, not zero."""
    ours = [record("cifar10", "ttc", "pgd", 650, 340)]
    comparison = compare(results(ours, vision_checkpoint="/ckpt/tecoa.pt", backbone="tecoa"), published)
    (row,) = comparison.rows
    assert row.published_clean is None and row.clean_diff is None and row.clean_inside is None
    assert row.published_robust == 34.68 and row.robust_diff == pytest.approx(34.0 - 34.68)


@pytest.mark.parametrize("changed, key", [
    (dict(steps=20), "steps"),
    (dict(eps=4), "eps"),  # RN was printed at 1/255 only (the poster)
    (dict(model="local-dir:/models/clip", pretrained=None), "model"),
    (dict(vision_checkpoint="/ckpt/tecoa.pt"), "backbone"),
    (dict(threat="adaptive"), "threat"),
])
def test_one_key_off_has_no_twin(published, changed, key):
    threat = changed.pop("threat", "paper")
    ours = [record("cifar10", "rn", "pgd", 812, 20, threat=threat)]
    baseline = compare(results([record("cifar10", "rn", "pgd", 812, 20)]), published)
    assert [r.published_robust for r in baseline.rows] == [2.01]  # the same record, unchanged, has its twin
    comparison = compare(results(ours, **changed), published)
    assert not comparison.rows and not comparison.averages
    (missing,) = comparison.unmatched
    assert (missing.dataset, missing.defense, missing.attack) == ("cifar10", "rn", "pgd")
    assert missing.reason.startswith("no published twin")
    if key == "backbone":
        assert "unknown backbone" in missing.reason
    if key == "threat":
        assert "adaptive threat" in missing.reason
    if key in ("steps", "eps"):  # what the papers did print is named
        assert "ViT-B-32/openai at 1/255, 10 steps (ttc-poster)" in missing.reason


def test_worst_case_sweeps_and_image_folders_have_no_twin(published):
    sweep = {**record("cifar10", "ttc tau_thres=0.1", "pgd", 812, 290), "setting": {"tau_thres": 0.1}}
    ours = [record("cifar10", "ttc", "worst-case", 812, 280), sweep,
            record("imagefolder:/data/mine", "ttc", "pgd", 9, 3, n=10)]
    comparison = compare(results(ours), published)
    assert not comparison.rows and len(comparison.unmatched) == 3
    reasons = [u.reason for u in comparison.unmatched]
    assert "worst case" in reasons[0] and "sweep setting" in reasons[1] and "image folder" in reasons[2]


def test_8_bit_adversarial_images_have_no_twin(published):
    ours = [record("cifar10", "ttc", "pgd", 812, 290)]
    assert compare(results(ours), published).rows  # the same record, in float: matched
    comparison = compare(results(ours, quantize_adversarial="round"), published)
    assert not comparison.rows and "rounded to 8 bits here (ttc-poster in float" in comparison.unmatched[0].reason


def test_a_record_attacked_with_predicted_labels_has_no_twin(published):
    ours = {**record("cifar10", "ttc", "pgd", 812, 290), "attack_labels": "predicted"}
    comparison = compare(results([ours]), published)
    assert not comparison.rows and "attacked with the predicted labels" in comparison.unmatched[0].reason


def test_options_off_the_defaults_are_named_not_matched_on(published):
    payload = results([record("cifar10", "ttc", "pgd", 812, 290)])
    payload["config"]["defenses"] = [{"defense": "ttc", "eps": 4 / 255, "steps": 2, "step_size": 1 / 255,
                                      "tau_thres": 0.3, "beta": 2.0}]
    (row,) = compare(payload, published).rows
    assert row.notes == ("ttc tau_thres=0.3 (default 0.2)",)
    payload["config"].update(prompts="openai", templates=["a photo of a {}."])
    (row,) = compare(payload, published).rows
    assert row.notes == ("prompts openai (default paper)", "1 template(s) given (default: the paper's)",
                         "ttc tau_thres=0.3 (default 0.2)")


# ---- averages ----------------------------------------------------------------------------------------------------


def test_an_average_over_fewer_datasets_is_named(published):
    ours = [record("cifar10", "none", "pgd", 850, 0), record("cifar100", "none", "pgd", 570, 1),
            record("stl10", "none", "pgd", 964, 0)]
    comparison = compare(results(ours, eps=4), published)
    assert [r.source for r in comparison.rows] == ["doc-aaai26"] * 3
    (average,) = [a for a in comparison.averages if a.source == "doc-aaai26"]
    assert (average.scope, average.datasets, average.scope_size) == ("average16", ("cifar10", "cifar100", "stl10"), 16)
    assert average.note.startswith("average over 3 of 16 datasets")
    assert "not the published average's scope" in average.note
    assert average.ours_clean == pytest.approx((85.0 + 57.0 + 96.4) / 3)
    assert (average.published_clean, average.published_robust) == (61.51, 0.06)
    assert average.robust_diff == pytest.approx(0.1 / 3 - 0.06)
    # DOC printed each of the three: their mean over our datasets is the like-for-like number
    assert average.published_same_clean == pytest.approx((85.08 + 57.16 + 96.41) / 3)
    assert average.published_same_robust == pytest.approx((0.00 + 0.00 + 0.04) / 3)


def test_a_full_average_carries_no_scope_note(published):
    draw = random.Random(0)
    ours = [record(d, "ttc", "pgd", draw.randrange(300, 900), draw.randrange(50, 300)) for d in published.datasets16]
    comparison = compare(results(ours, eps=4), published)
    (average,) = comparison.averages
    assert (average.source, len(average.datasets), average.note) == ("doc-aaai26", 16, "")
    assert average.ours_robust == pytest.approx(sum(r["robust_acc"] for r in ours) / 16)
    assert average.published_robust == 21.22 and len(comparison.rows) == 16


def test_mac_fine_grained_average_over_all_ten_and_over_nine(published):
    ours = [record(d, "mac", "pgd", 600, 450) for d in FINE_GRAINED10]
    (average,) = compare(results(ours, eps=4, steps=100), published).averages
    assert (average.source, average.scope, len(average.datasets), average.scope_size, average.note) == \
        ("mac-cvpr26", "average10-fine-grained", 10, 10, "")
    assert average.robust_diff == pytest.approx(45.0 - 45.2)
    comparison = compare(results([r for r in ours if r["dataset"] != "ucf101"], eps=4, steps=100), published)
    (average,) = comparison.averages
    assert len(average.datasets) == 9 and "9 of 10 datasets (missing ucf101)" in average.note
    assert average.robust_diff == pytest.approx(45.0 - 45.2) and average.published_same_robust is None
    assert not comparison.rows and len(comparison.unmatched) == 9  # MAC printed averages only
    assert all("printed only inside average10-fine-grained (mac-cvpr26)" in u.reason for u in comparison.unmatched)


def test_an_average_is_matched_only_with_a_source_that_stored_images_as_this_run(published):
    # DBD (PNG-truncated images) and MAC (float) both printed TTC's fine-grained average at PGD-100, 4/255
    ours = [record(d, "ttc", "pgd", 600, 300) for d in FINE_GRAINED10]
    in_float = compare(results(ours, eps=4, steps=100), published).averages
    truncated = compare(results(ours, eps=4, steps=100, quantize_adversarial="floor"), published).averages
    assert {a.source for a in in_float} == {"mac-cvpr26"}
    assert {a.source for a in truncated} == {"dbd-iclr26"}


# ---- writing -----------------------------------------------------------------------------------------------------


def _backend() -> str | None:
    """The configured backend without resolving it (resolving would itself pick one)."""
    try:
        return matplotlib.get_backend(auto_select=False)
    except TypeError:  # matplotlib < 3.10
        return matplotlib.rcParams._get_backend_or_none()


def test_write_comparison_writes_four_files(tmp_path, published):
    folder = write_results(tmp_path / "run", results([record("cifar10", "ttc", "pgd", 812, 290),
                                                      record("stanford_cars", "ttc", "pgd", 481, 330),
                                                      record("cifar10", "ttc", "worst-case", 800, 280)]))
    backend, had_pyplot = _backend(), "matplotlib.pyplot" in sys.modules
    written = write_comparison(folder, published)
    assert _backend() == backend and ("matplotlib.pyplot" in sys.modules) == had_pyplot
    assert [p.name for p in written] == ["comparison.md", "comparison.csv", "comparison.json", "comparison.png"]
    assert all(p.parent == folder and p.stat().st_size > 0 for p in written)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["results.json", *(p.name for p in written)])  # no temp
    assert written[3].read_bytes()[:8] == PNG_SIGNATURE
    md = written[0].read_text(encoding="utf-8")
    assert "## TTC poster (primary): `ttc-poster`" in md
    assert "## re-run of TTC by COLA's authors (NeurIPS 2025): `cola-neurips25`" in md
    assert "| cifar10 | ttc | pgd | 1 | 10 | 1000 | 81.20 [78.7, 83.5] | 81.18 | +0.02 | yes |" in md
    assert "## Records without a published twin" in md and "worst case" in md
    assert "average over 2 of 16 datasets" in md
    rows = list(csv.DictReader(written[1].open(encoding="utf-8")))
    assert [r["kind"] for r in rows] == ["dataset"] * 3 + ["average"] + ["no twin"]
    data = json.loads(written[2].read_text(encoding="utf-8"))
    assert len(data["rows"]) == 3 and data["sources"]["ttc-poster"]["primary"] is True


def test_nothing_matched_still_writes_every_file(tmp_path, published):
    folder = write_results(tmp_path / "run", results([record("imagefolder:/data/mine", "ttc", "pgd", 9, 3, n=10)],
                                                     model="local-dir:/m", pretrained=None))
    written = write_comparison(folder, published)
    md = written[0].read_text(encoding="utf-8")
    assert "**Nothing matched**" in md and "image folder" in md
    assert written[3].read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("content, expected", [
    (None, "No results.json"),
    ('{"config": {}, "records": [', "is damaged (JSONDecodeError"),
    ('{"config": {"model": "m", "datasets": [], "attacks": []}, "records": []}', "holds no records"),
    ('{"config": {}}', "is damaged (RecordError"),
])
def test_write_comparison_refuses_a_folder_without_results(tmp_path, content, expected):
    folder = tmp_path / "run"
    folder.mkdir()
    if content is not None:
        (folder / "results.json").write_text(content, encoding="utf-8")
    with pytest.raises(CounterattackError) as error:
        write_comparison(folder)
    assert expected in one_line(error) and "counterattack eval" in str(error.value)
    assert list(folder.iterdir()) == ([] if content is None else [folder / "results.json"])
