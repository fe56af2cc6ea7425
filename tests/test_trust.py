"""Numbers you can trust: AutoAttack's own schedule, the worst case over attacks, stable image
identity, checked merges, and a one-line error (exit code 2) for every bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from counterattack import (
    DEFENSES, PGD, TTC, AdaptiveAttack, AutoAttackPaper, CounterattackError, ImageRandomness, build_attack,
    build_defenses,
)
from counterattack.attacks import run_steps
from counterattack.cli import main
from counterattack.results import ResultsStore

from testkit import free_port, part_batches, write_image_folder

ROOT = Path(__file__).resolve().parents[1]


def eval_args(model_dir: Path, folder: Path | str, out: Path, *extra: str) -> list[str]:
    return ["eval", "--no-progress", "--workers", "0", "--model", f"local-dir:{model_dir}",
            "--dataset", f"imagefolder:{folder}", "--attack-steps", "2", "--defense", "none,ttc",
            "--out", str(out), *extra]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def without_cost(records: list[dict]) -> list[dict]:
    cost = ("ms_per_image", "peak_memory_mb")
    return [{k: v for k, v in r.items() if k not in cost} for r in records]


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "imgs", {"cat": 3, "dog": 3, "sea_lion": 3}, seed=4)


# --- AutoAttack ------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, schedule", [(10, (2, 1, 1)), (100, (22, 6, 3))])
def test_autoattack_apgd_derives_its_schedule_from_the_iterations(random_classifier, steps, schedule):
    attack = AutoAttackPaper(eps=1 / 255, steps=steps)
    adversary = attack.adversary(random_classifier, 10, seed=0, device=torch.device("cpu"))
    assert adversary.attacks_to_run == ["apgd-ce", "apgd-dlr"]
    for apgd in (adversary.apgd, adversary.apgd_targeted):
        # APGD's checkpoints (n_iter_2), minimum interval (n_iter_min) and step decrease (size_decr)
        assert (apgd.n_iter, apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr) == (steps, *schedule)
        assert apgd.n_restarts == 1 and apgd.eps == 1 / 255


def test_autoattack_run_records_its_batch_composition_and_refuses_another(tmp_path, random_clip_dir, folder, capsys):
    args = eval_args(random_clip_dir, folder, tmp_path, "--attack", "autoattack-paper", "--defense", "none",
                     "--batch-size", "5")
    assert main(args) == 0
    config = results(tmp_path)["config"]
    assert config["attacks"][0]["steps"] == 2 and config["batch_composition"] == {"batch_size": 5, "processes": 1}
    assert main([*args[:-2], "--batch-size", "4"]) == 2
    assert "batch_composition" in capsys.readouterr().err


# --- Several attacks and the worst case ------------------------------------------------------------

def test_worst_case_counts_an_image_only_if_it_survives_every_attack(tmp_path, random_clip_dir, folder):
    assert main(eval_args(random_clip_dir, folder, tmp_path, "--attack", "pgd,cw", "--eps", "8")) == 0
    records = results(tmp_path)["records"]
    assert [r["attack"] for r in records] == ["pgd", "pgd", "cw", "cw", "worst-case", "worst-case"]
    batches = part_batches(tmp_path)
    for defense in ("none", "ttc"):
        by_attack = {r["attack"]: r for r in records if r["defense"] == defense}
        survivors = sum(
            all(b["defenses"][defense]["adv"][attack]["pred"][i] == y for attack in ("pgd", "cw"))
            for b in batches for i, y in enumerate(b["labels"])
        )
        assert by_attack["worst-case"]["robust_acc"] == pytest.approx(100 * survivors / 9)
        assert by_attack["worst-case"]["robust_acc"] <= min(by_attack[a]["robust_acc"] for a in ("pgd", "cw"))
        assert len({r["clean_acc"] for r in by_attack.values()}) == 1


@pytest.mark.parametrize("select", ["eot", "fresh"])
def test_adaptive_attack_returns_its_best_iterate_not_its_last(random_classifier, images, select):
    labels = torch.arange(len(images)) % 10
    ttc = TTC(tau_thres=float("inf"))  # every image counterattacked
    attack = AdaptiveAttack(ttc, PGD(eps=8 / 255, steps=6, step_size=4 / 255), select=select)
    adversarial = attack(random_classifier, images, labels, ImageRandomness.from_seed(0, len(images), "attack"))
    # The same run, by hand, with the same draws in the same order: every iterate and the loss it is chosen by
    # (under the attack's own draw, or under the held-out one it never ascended).
    rng = ImageRandomness.from_seed(0, len(images), "attack")
    start = PGD(8 / 255, 6, 4 / 255)(random_classifier, images, labels, rng)
    held_out = rng.fork("selection")
    iterates, losses = [], []

    def loss(adv: torch.Tensor) -> torch.Tensor:
        view = ttc.attack_view(random_classifier, adv, rng, "exact")
        per_image = torch.nn.functional.cross_entropy(view.logits, labels, reduction="none")
        iterates.append(adv.detach())
        if select == "fresh":
            with torch.no_grad():
                chosen_by = ttc.attack_view(random_classifier, adv.detach(), held_out, "exact").logits
            losses.append(torch.nn.functional.cross_entropy(chosen_by, labels, reduction="none"))
        else:
            losses.append(per_image.detach())
        return per_image.sum()

    final = run_steps(loss, images, start - images, 8 / 255, 4 / 255, 6)
    loss(images + final)
    best = torch.stack(losses).argmax(dim=0)
    assert (best != len(losses) - 1).any(), "a setting where the last iterate is not always the best"
    expected = torch.stack(iterates)[best, torch.arange(len(images))]
    assert torch.allclose(adversarial, expected, atol=1e-6)
    assert (adversarial - images).abs().max() <= 8 / 255 + 1e-6


# --- Image identity --------------------------------------------------------------------------------

def test_two_spellings_of_one_folder_give_identical_records(tmp_path, random_clip_dir, folder, monkeypatch):
    monkeypatch.chdir(folder.parent)
    assert main(eval_args(random_clip_dir, folder, tmp_path / "a", "--batch-size", "4")) == 0
    (tmp_path / "link").symlink_to(folder)
    assert main(eval_args(random_clip_dir, "./imgs/../imgs/", tmp_path / "b", "--batch-size", "4")) == 0
    assert main(eval_args(random_clip_dir, tmp_path / "link", tmp_path / "c", "--batch-size", "4")) == 0
    first = without_cost(results(tmp_path / "a")["records"])
    assert first == without_cost(results(tmp_path / "b")["records"]) == without_cost(results(tmp_path / "c")["records"])
    assert results(tmp_path / "a")["config"]["datasets"] == results(tmp_path / "b")["config"]["datasets"]


def test_image_ids_are_file_paths_so_a_new_file_does_not_renumber_the_others(tmp_path, random_clip_dir, folder):
    def ids(out: Path) -> list:
        return [i for batch in part_batches(out) for i in batch["ids"]]

    assert main(eval_args(random_clip_dir, folder, tmp_path / "a", "--defense", "none")) == 0
    files = sorted(f"{c}/{i:04d}.png" for c in ("cat", "dog", "sea_lion") for i in range(3))
    assert sorted(ids(tmp_path / "a")) == files
    shutil.copy(folder / "cat" / "0000.png", folder / "cat" / "000.png")  # sorts first in its class
    assert main(eval_args(random_clip_dir, folder, tmp_path / "b", "--defense", "none")) == 0
    assert sorted(ids(tmp_path / "b")) == sorted([*files, "cat/000.png"])


def test_a_file_added_between_two_runs_is_refused_on_resume(tmp_path, random_clip_dir, folder, capsys):
    assert main(eval_args(random_clip_dir, folder, tmp_path, "--limit", "6")) == 0
    shutil.copy(folder / "dog" / "0000.png", folder / "dog" / "0003.png")
    assert main(eval_args(random_clip_dir, folder, tmp_path, "--limit", "6")) == 2
    error = capsys.readouterr().err
    assert "datasets" in error and "9 images" in error and "10 (fingerprint" in error


# --- Merging ---------------------------------------------------------------------------------------

def test_a_merge_with_a_missing_image_is_refused_and_an_identical_repeat_is_kept_once(
    tmp_path, random_clip_dir, folder
):
    assert main(eval_args(random_clip_dir, folder, tmp_path, "--batch-size", "3")) == 0
    store = ResultsStore(tmp_path)
    name = results(tmp_path)["records"][0]["dataset"]
    ids = [i for b in store.batches() for i in b.ids]
    assert [len(b.ids) for b in store.complete({name: ids})] == [2, 3, 3, 1]  # a probe batch first
    with pytest.raises(CounterattackError, match="1 of 10 images of .* are missing"):
        store.complete({name: [*ids, "cat/9999.png"]})
    parts = tmp_path / "parts" / "rank-0.jsonl"
    lines = parts.read_text().splitlines()
    (tmp_path / "parts" / "rank-1.jsonl").write_text(lines[1] + "\n")  # a second process's copy of one batch
    merged = store.complete({name: ids})
    assert sorted(i for b in merged for i in b.ids) == sorted(ids)  # the same results twice: kept once
    (tmp_path / "parts" / "rank-1.jsonl").unlink()
    parts.write_text("\n".join([lines[0], *lines[2:]]) + "\n")  # a lost batch: the summary is refused, not shrunk
    with pytest.raises(CounterattackError, match="2 of 9 images"):
        store.complete({name: ids})


# --- Bad input: one line, exit code 2, never a traceback --------------------------------------------

def run_cli(capsys, *args: str) -> tuple[int, str]:
    """The command line in this process: its exit code (argparse's refusals exit) and what it wrote to stderr."""
    try:
        code = main(list(args))
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def run_process(*args: str, env: dict | None = None) -> tuple[int, str]:
    """The command line in a fresh process, for what only a process boundary shows; its exit code and output."""
    done = subprocess.run([sys.executable, "-m", "counterattack", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, cwd=ROOT)
    return done.returncode, done.stderr + done.stdout


def assert_one_line_error(code: int, output: str, *words: str) -> None:
    """Exit code 2 and one line saying what is wrong (logged warnings aside), naming ``words``: never a traceback."""
    assert code == 2, output[-2000:]
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith("WARNING: ")]
    assert len(lines) == 1 and ": error: " in lines[0], output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("content, kind", [(b"this is not an image", "not an image"), (None, "truncated")])
def test_an_undecodable_image_stops_the_run_before_compute_naming_it(tmp_path, random_clip_dir, folder, capsys,
                                                                    content, kind):
    bad = folder / "dog" / "0001.png"
    bad.write_bytes(content if content is not None else bad.read_bytes()[:200])
    code, err = run_cli(capsys, *eval_args(random_clip_dir, folder, tmp_path / "out"))
    assert_one_line_error(code, err, str(bad), "--skip-unreadable")
    assert not (tmp_path / "out" / "parts").exists()
    assert main(eval_args(random_clip_dir, folder, tmp_path / "skip", "--skip-unreadable")) == 0
    skipped = results(tmp_path / "skip")
    assert [(u["id"], u["file"]) for u in skipped["unreadable"]] == [("dog/0001.png", str(bad))]
    assert {r["n"] for r in skipped["records"]} == {8}


def test_a_truncated_jpeg_is_found_too(tmp_path, random_clip_dir, capsys):
    from PIL import Image

    folder = write_image_folder(tmp_path / "jpegs", {"cat": 1, "dog": 1})
    image = Image.open(folder / "cat" / "0000.png").convert("RGB")
    image.save(folder / "cat" / "0001.jpg", quality=95)
    data = (folder / "cat" / "0001.jpg").read_bytes()
    (folder / "cat" / "0001.jpg").write_bytes(data[: len(data) // 2])
    code, err = run_cli(capsys, *eval_args(random_clip_dir, folder, tmp_path / "out"))
    assert_one_line_error(code, err, "0001.jpg", "truncated")


@pytest.mark.parametrize("garbage", [b"\x00" * 100, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}    padding"])
def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path, random_clip_dir, folder, capsys, garbage):
    checkpoint = tmp_path / "fine-tuned.safetensors"
    checkpoint.write_bytes(garbage)
    code, err = run_cli(capsys, *eval_args(random_clip_dir, folder, tmp_path / "out", "--vision-checkpoint",
                                           str(checkpoint)))
    assert_one_line_error(code, err, "fine-tuned.safetensors")


def test_a_parse_error_is_one_line_in_a_real_process_too():
    """Once through a real process: what the user sees, with its own stderr and exit code (the rest run in-process)."""
    assert_one_line_error(*run_process("eval", "--eps=nan"), "--eps", "finite")


@pytest.mark.parametrize("option", [
    "--eps", "--attack-step-size", "--ttc-eps", "--ttc-step-size", "--tau-thres", "--beta", "--gate-weight",
    "--dist-timeout",
])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(capsys, option, value):
    assert_one_line_error(*run_cli(capsys, "eval", f"{option}={value}"), option, "finite")


@pytest.mark.parametrize("option, value, expected", [
    ("--eps", "-1", ">= 0"), ("--eps", "300", "<= 255"), ("--attack-steps", "-2", ">= 0"),
    ("--attack-steps", "1.5", "integer"),
    ("--ttc-eps", "256", "<= 255"), ("--ttc-steps", "-1", ">= 0"), ("--tau-thres", "-0.1", ">= 0"),
    ("--eot-samples", "0", ">= 1"), ("--batch-size", "0", ">= 1"), ("--limit", "0", ">= 1"),
    ("--workers", "-1", ">= 0"), ("--seed", "-3", ">= 0"), ("--seed", "x", "integer"), ("--gate-weight", "-1", ">= 0"),
    ("--attack", "pgd,magic", "Unknown attack(s) 'magic'"), ("--attack", "pgd,pgd", "twice"),
])
def test_out_of_range_numbers_and_names_are_refused(capsys, option, value, expected):
    assert_one_line_error(*run_cli(capsys, "eval", f"{option}={value}"), option, expected)


def test_missing_pyautoattack_says_what_to_install(tmp_path, random_clip_dir, folder):
    blocker = tmp_path / "blocker" / "pyautoattack"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named pyautoattack')\n")
    env = {"PYTHONPATH": f"{blocker.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for command in (["sanity", "--model", f"local-dir:{random_clip_dir}", "--dataset", f"imagefolder:{folder}"],
                    eval_args(random_clip_dir, folder, tmp_path / "out", "--attack", "autoattack")):
        assert_one_line_error(*run_process(*command, env=env), "pip install pyautoattack")


def test_cli_runs_from_a_source_tree_without_package_metadata(tmp_path):
    code = (
        "import importlib.metadata as m, sys\n"
        "real = m.version\n"
        "def version(name):\n"
        "    if name == 'clip-counterattack':\n"
        "        raise m.PackageNotFoundError(name)\n"
        "    return real(name)\n"
        "m.version = version\n"
        "import counterattack\n"
        "print(counterattack.__version__)\n"
        "from counterattack.cli import main\n"
        "sys.exit(main(['datasets', '--data-root', sys.argv[1]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].endswith("(source tree)") and "cifar10" in done.stdout


# --- The Python API refuses what is not [0, 1] pixels -----------------------------------------------

BAD_PIXELS = {
    "normalised": lambda x: (x - 0.5) / 0.25,
    "0-255": lambda x: x * 255,
    "nan": lambda x: x.masked_fill(x > 0.9, float("nan")),
}


@pytest.mark.parametrize("bad", list(BAD_PIXELS))
@pytest.mark.parametrize("name", list(DEFENSES))
def test_every_defense_refuses_pixels_outside_0_1(random_classifier, images, name, bad):
    (defense,) = build_defenses([name])
    pixels = BAD_PIXELS[bad](images)
    rng = ImageRandomness.from_seed(0, len(images))
    with pytest.raises(ValueError, match="pixels"):
        defense(random_classifier, pixels, rng)
    with pytest.raises(ValueError, match="pixels"):
        defense.attack_view(random_classifier, pixels, rng, "exact")


@pytest.mark.parametrize("bad", list(BAD_PIXELS))
@pytest.mark.parametrize("attack", [PGD(), build_attack("autoattack-paper", steps=2),
                                    AdaptiveAttack(TTC(), PGD(steps=1))], ids=["pgd", "autoattack", "adaptive"])
def test_every_attack_refuses_pixels_outside_0_1(random_classifier, images, attack, bad):
    labels = torch.zeros(len(images), dtype=torch.long)
    with pytest.raises(ValueError, match="pixels"):
        attack(random_classifier, BAD_PIXELS[bad](images), labels, ImageRandomness.from_seed(0, len(images)))


# --- Distributed: one process's failure ends every process with its message --------------------------

FAILING_RANK = """
import sys
from datetime import timedelta
import torch
from counterattack import distributed
from counterattack.errors import CounterattackError

group, _ = distributed.start(torch.device("cpu"), timedelta(seconds=60))

def work():
    if group.rank == 1:
        raise CounterattackError("cannot decode dog/0001.png")
    return "fine"

def report(text):  # one file per process: two processes printing to one pipe can interleave
    with open(f"{sys.argv[1]}/rank-{group.rank}.txt", "w") as f:
        f.write(f"rank {group.rank}: {text}")

try:
    group.first_on_main(lambda: "downloaded")
    group.together(work)
    report("no error")
except CounterattackError as exc:
    report(exc)
finally:
    group.close()
"""


def test_a_failed_process_fails_the_others_with_its_error_instead_of_a_hang(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(FAILING_RANK)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", free_port(), str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = sorted(path.read_text() for path in tmp_path.glob("rank-*.txt"))
    expected = ["rank 0: process 1 of 2 failed: cannot decode dog/0001.png", "rank 1: cannot decode dog/0001.png"]
    assert lines == expected, done.stdout + done.stderr[-2000:]


# --- Intervals ---------------------------------------------------------------------------------------

def test_wilson_intervals_match_known_values():
    """Newcombe (1998), Stat. Med. 17:857, Table I: 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775."""
    from counterattack.stats import wilson_interval

    assert wilson_interval(0, 10) == pytest.approx((0.0, 27.753), abs=1e-3)
    assert wilson_interval(5, 10) == pytest.approx((23.659, 76.341), abs=1e-3)
    assert wilson_interval(10, 10) == pytest.approx((72.247, 100.0), abs=1e-3)
    assert wilson_interval(81, 263) == pytest.approx((25.53, 36.62), abs=0.01)
