"""A defense is one file: registered by a decorator, its options become flags and a listing."""

import json
import sys

import pytest

import counterattack.defenses as defenses
from counterattack import DEFENSES, TTC, CounterattackError, build_defense
from counterattack.cli import _registered_settings, build_parser, main

from test_data import write_image_folder

TOY_DEFENSE = '''
"""A toy defense for the registry test: each image mixed with its horizontal mirror."""

from dataclasses import dataclass

import torch

from counterattack.classifier import check_pixels
from counterattack.defenses import option, register_defense
from counterattack.defenses.base import AttackView, DefenseOutput, describe_options


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

    def attack_view(self, classifier, images, rng, method, with_tau=False):
        return AttackView(classifier.logits(self._mixed(check_pixels(images))))

    def describe(self):
        return describe_options(self)
'''


@pytest.fixture
def toy_defense(tmp_path, monkeypatch):
    folder = tmp_path / "more-defenses"
    folder.mkdir()
    (folder / "toy_mirror.py").write_text(TOY_DEFENSE)
    monkeypatch.setattr(defenses, "__path__", [*defenses.__path__, str(folder)])
    defenses.discover_defenses()
    yield DEFENSES["toy-mirror"]
    DEFENSES.pop("toy-mirror")
    sys.modules.pop("counterattack.defenses.toy_mirror")


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


def test_generated_flags_keep_the_old_spellings_and_the_1_255_unit():
    parser = build_parser()
    old = parser.parse_args(["eval", "--ttc-eps", "8", "--ttc-steps", "3", "--tau-thres", "0.1", "--beta", "-1",
                             "--rn-eps", "2"])
    assert _registered_settings(old, "defense", "ttc") == {"eps": 8 / 255, "steps": 3, "tau_thres": 0.1, "beta": -1.0}
    assert _registered_settings(old, "defense", "rn") == {"eps": 2 / 255}
    new = parser.parse_args(["eval", "--ttc-tau-thres", "0.1", "--ttc-beta", "-1"])
    assert _registered_settings(new, "defense", "ttc") == {"tau_thres": 0.1, "beta": -1.0}
    assert _registered_settings(parser.parse_args(["eval"]), "defense", "ttc") == {}


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
    assert list(listing) == list(DEFENSES)
    assert listing["ttc"]["options"] == {"--ttc-eps": 4.0, "--ttc-steps": 2, "--ttc-step-size": 1.0,
                                         "--ttc-tau-thres": 0.2, "--ttc-beta": 2.0}
