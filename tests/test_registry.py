"""A defense is one file: registered by a decorator, its options become flags and a listing."""

import json
import os
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest

import counterattack.attacks as attacks
import counterattack.defenses as defenses
from counterattack import ATTACKS, DEFENSES, TTC, CounterattackError, build_defense
from counterattack.attacks import build_attacks
from counterattack.cli import build_parser, config_from_args, main
from counterattack.options import RegistrationError

from testkit import one_more_file, write_image_folder

TOY_DEFENSE = '''
"""A toy defense for the registry test: each image mixed with its horizontal mirror."""

from dataclasses import dataclass

import torch

from counterattack.classifier import check_pixels
from counterattack.defenses import option, register_defense
from counterattack.defenses.base import AttackView, DefenseOutput


@register_defense
@dataclass(frozen=True)
class Mirror:
    """Mix each image with its mirror image."""

    share: float = option(0.5, "weight of the mirror image", high=1.0)

    def _mixed(self, images):
        return (1 - self.share) * images + self.share * torch.flip(images, dims=[-1])

    @torch.no_grad()
    def __call__(self, classifier, images, rng):
        mixed = self._mixed(check_pixels(images))
        return DefenseOutput(classifier.logits(mixed), images=mixed)

    def attack_view(self, classifier, images, rng, method, with_score=False):
        return AttackView(classifier.logits(self._mixed(check_pixels(images))))
'''


TOY_ATTACK = '''
"""A toy attack for the registry test: uniform noise at the budget's corners."""

from dataclasses import dataclass
from typing import ClassVar

from counterattack.attacks import register_attack
from counterattack.attacks.loop import project
from counterattack.options import PIXEL_UNIT, option


@register_attack
@dataclass(frozen=True)
class CornerNoise:
    """Move every pixel by +-eps at random."""

    norm: ClassVar[str] = "linf"
    eps: float = option(1 / 255, "L-inf budget", unit=PIXEL_UNIT)

    def __call__(self, classifier, images, labels, rng):
        signs = rng.uniform_like(images, -1.0, 1.0).sign()
        return images + project(images, self.eps * signs, self.eps)
'''


@pytest.fixture
def toy_defense(tmp_path, monkeypatch):
    yield from one_more_file(tmp_path, monkeypatch, defenses, DEFENSES, "toy_mirror", TOY_DEFENSE)


@pytest.fixture
def toy_attack(tmp_path, monkeypatch):
    yield from one_more_file(tmp_path, monkeypatch, attacks, ATTACKS, "toy_corners", TOY_ATTACK)


def test_a_new_file_is_all_a_defense_needs(toy_defense, tmp_path, random_clip_dir, capsys):
    assert main(["defenses"]) == 0
    listing = capsys.readouterr().out
    assert "toy-mirror: Mix each image with its mirror image." in listing and "--toy-mirror-share 0.5" in listing
    folder = write_image_folder(tmp_path / "imgs", {"cat": 2, "dog": 2})
    out = tmp_path / "out"
    assert main(["eval", "--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}",
                 "--dataset", f"imagefolder:{folder}", "--attack-steps", "1", "--defense", "none,toy-mirror",
                 "--toy-mirror-share", "0.25", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["defense"] for r in results["records"]] == ["none", "toy-mirror"]
    assert results["config"]["defenses"][1] == {"defense": "toy-mirror", "share": 0.25}
    with pytest.raises(SystemExit) as exit_info:  # bounds come from the option too
        main(["eval", "--toy-mirror-share", "2"])
    assert exit_info.value.code == 2
    assert "--toy-mirror-share: must be <= 1" in capsys.readouterr().err


def config_of(*argv: str):
    return config_from_args(build_parser().parse_args(list(argv)))


def test_a_text_option_is_read_as_text(capsys):
    config = config_of("eval", "--defense", "dbd", "--dbd-template", "a blurry photo of a {}.")
    assert config.defense.settings["dbd"] == {"template": "a blurry photo of a {}."}
    assert main(["eval", "--defense", "dbd", "--dbd-template", "no class here", "--out", "unused"]) == 2
    assert "template must contain '{}' exactly once" in capsys.readouterr().err


def test_generated_flags_keep_the_old_spellings_and_the_1_255_unit():
    old = config_of("eval", "--ttc-eps", "8", "--ttc-steps", "3", "--tau-thres", "0.1", "--beta", "-1", "--rn-eps", "2")
    assert old.defense.settings["ttc"] == {"eps": 8 / 255, "steps": 3, "tau_thres": 0.1, "beta": -1.0}
    assert old.defense.settings["rn"] == {"eps": 2 / 255}
    new = config_of("eval", "--ttc-tau-thres", "0.1", "--ttc-beta", "-1")
    assert new.defense.settings == {"ttc": {"tau_thres": 0.1, "beta": -1.0}}
    assert config_of("eval").defense.settings == {}


def test_defaults_live_in_the_options_and_bad_settings_are_refused():
    assert build_defense("ttc") == TTC() and TTC().eps == 4 / 255 and TTC().steps == 2
    assert {DEFENSES[n]().eps for n in ("rn", "anti-adversary", "hd", "ttc")} == {4 / 255}
    with pytest.raises(CounterattackError, match="eps must be >= 0"):
        TTC(eps=-1 / 255)
    with pytest.raises(CounterattackError, match="tau_thres must be >= 0"):
        TTC(tau_thres=-0.1)
    with pytest.raises(CounterattackError, match="rn has no setting steps"):
        build_defense("rn", steps=3)


def test_defenses_json_lists_every_defense_with_its_defaults(capsys):
    assert main(["defenses", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    # Written out rather than read off the registry: "none" first, then every defense file in alphabetical order.
    assert list(listing) == ["none", "agc", "anti-adversary", "clipure", "cola", "csr", "dbd", "doc", "et3", "hd",
                             "mac", "rn", "rtpt", "ttc", "tte"]
    assert listing["ttc"]["options"] == {"--ttc-eps": 4.0, "--ttc-steps": 2, "--ttc-step-size": 1.0,
                                         "--ttc-tau-thres": 0.2, "--ttc-beta": 2.0}


def test_a_new_file_is_all_an_attack_needs(toy_attack, tmp_path, random_clip_dir, capsys):
    assert main(["attacks"]) == 0
    listing = capsys.readouterr().out
    assert "toy-corners: Move every pixel by +-eps at random." in listing and "--toy-corners-eps 1.0" in listing
    folder = write_image_folder(tmp_path / "imgs", {"cat": 2, "dog": 2})
    out = tmp_path / "out"
    assert main(["eval", "--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}",
                 "--dataset", f"imagefolder:{folder}", "--attack", "pgd,toy-corners", "--attack-steps", "1",
                 "--defense", "none", "--toy-corners-eps", "3", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["attacks"][1] == {"attack": "toy-corners", "eps": 3 / 255, "norm": "linf"}
    assert [r["attack"] for r in results["records"]] == ["pgd", "toy-corners", "worst-case"]


@pytest.mark.parametrize("declared, said", [("", "does not declare it"), ('norm: ClassVar[str] = "l1"', "'l1'")])
def test_an_attack_that_does_not_declare_its_norm_is_refused_at_registration(declared, said):
    body = f"""
@register_attack
@dataclass(frozen=True)
class Undeclared:
    {declared}
    eps: float = 1 / 255

    def __call__(self, classifier, images, labels, rng):
        return images
"""
    with pytest.raises(RegistrationError) as refused:
        exec(body, {"register_attack": ATTACKS.register, "dataclass": dataclass, "ClassVar": ClassVar,
                    "__name__": "more.undeclared_norm"})
    assert "must declare norm as one of 'linf', 'l2'" in str(refused.value) and said in str(refused.value)
    assert "undeclared-norm" not in ATTACKS


def attacks_of(config):
    return build_attacks(config.attack.names, config.attack.settings, **config.attack.shared)


def test_an_attacks_own_flag_wins_over_the_shared_one():
    config = config_of("eval", "--attack", "pgd,cw,autoattack-paper", "--eps", "2", "--pgd-eps", "4",
                       "--attack-steps", "3", "--cw-kappa", "5", "--attack-step-size", "0.5")
    pgd, cw, autoattack = attacks_of(config)
    assert (pgd.eps, pgd.steps, pgd.step_size) == (4 / 255, 3, 0.5 / 255)
    assert (cw.eps, cw.steps, cw.step_size, cw.kappa) == (2 / 255, 3, 0.5 / 255, 5.0)
    assert (autoattack.eps, autoattack.steps) == (2 / 255, 3)  # it has no step size: the shared one passes it by
    defaults = config_of("eval", "--attack", "pgd,autoattack")
    assert [(a.eps, a.steps) for a in attacks_of(defaults)] == [(1 / 255, 10), (1 / 255, 100)]


def test_attacks_json_lists_every_attack_with_its_defaults(capsys):
    assert main(["attacks", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert list(listing)[:4] == ["pgd", "cw", "autoattack-paper", "autoattack"]
    assert listing["cw"]["options"] == {"--cw-eps": 1.0, "--cw-steps": 10, "--cw-step-size": 1.0, "--cw-kappa": 50.0}
    assert listing["autoattack"]["options"] == {"--autoattack-eps": 1.0, "--autoattack-steps": 100}


def test_a_broken_extension_file_is_named_in_one_line_before_any_command_runs(tmp_path):
    """A defense file without attack_view, dropped into a copy of the package: the first command that reads the
    registries (here --help's flags, with no registry cache yet) names it and exits 2, with no traceback."""
    import shutil
    import subprocess
    from pathlib import Path

    package = Path(defenses.__file__).resolve().parents[1]
    copy = tmp_path / "site" / "counterattack"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    broken = TOY_DEFENSE.replace("    def attack_view(self,", "    def not_attack_view(self,")
    (copy / "defenses" / "toy_broken.py").write_text(broken)
    env = {**os.environ, "PYTHONPATH": str(copy.parent), "COUNTERATTACK_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "counterattack.cli", "eval", "--help"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "counterattack: error: defense toy-broken (counterattack.defenses.toy_broken) lacks attack_view: a defense "
        "needs __call__, attack_view."]
