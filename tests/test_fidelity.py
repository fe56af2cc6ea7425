"""The successors as their authors' code runs them: DOC's score and final perturbation, MAC's pixel units and
every view's gate, R-TPT's views per dataset, 8-bit adversarial images, and each defense's paper precision."""

import json

import pytest
import torch
import torch.nn.functional as F

from counterattack import MAC, RTPT, TTC, ImageRandomness, ZeroShotClassifier, load_clip
from counterattack.adaptive import gate_evasion
from counterattack.augment import gaussian_blur
from counterattack.cli import main
from counterattack.defenses import DEFENSES
from counterattack.defenses.base import weighted_mix
from counterattack.defenses.doc import DOC
from counterattack.errors import CounterattackError
from counterattack.evaluate import RunSettings, to_8_bits
from counterattack.precision import defense_precision
from counterattack.store import config_hash

from testkit import CIFAR10_CLASSES, RANDOM_CLIP_CFG, part_batches, write_image_folder, write_local_dir


def rng(n: int, seed: int = 0, purpose: str = "p") -> ImageRandomness:
    return ImageRandomness.from_seed(seed, n, purpose)


# --- DOC ------------------------------------------------------------------------------------------------------

def test_docs_default_gate_is_ttcs_tau_for_the_same_draw_bit_for_bit(random_classifier, images):
    tau = TTC().counterattack(random_classifier, images, rng(len(images))).tau
    doc = DOC().counterattack(random_classifier, images, rng(len(images)))
    assert torch.equal(doc.score, tau)
    assert torch.equal(doc.weight, torch.sigmoid(20.0 * (0.3 - tau)))


def test_docs_directional_score_is_one_minus_the_mean_cosine_over_its_noisy_copies(random_classifier, images):
    doc = DOC(score="directional")
    result = doc.counterattack(random_classifier, images, rng(len(images)))
    noise = doc.sensitivity_noise(images, rng(len(images)))  # the first draw of the same streams
    encoder = random_classifier.encoder
    with torch.no_grad():
        anchor = encoder(images).double()
        copies = [encoder((images + noise[:, m]).clamp(0, 1)).double() for m in range(doc.noise_copies)]
    brute = 1 - torch.stack([F.cosine_similarity(c, anchor) for c in copies]).mean(dim=0)
    assert torch.allclose(result.score.double(), brute, rtol=1e-3, atol=1e-7)
    assert doc.gate.score == "directional sensitivity" and DOC().gate.score == "tau"


def test_docs_directional_score_is_measured_on_the_tau_encoder_and_the_steps_on_the_defended_one(
    random_classifier, images, tmp_path
):
    other = load_clip(f"local-dir:{write_local_dir(tmp_path / 'other', RANDOM_CLIP_CFG, seed=7)}")
    tau_encoder = ZeroShotClassifier.from_clip(other, CIFAR10_CLASSES).encoder
    separate = DOC(score="directional", tau_encoder=tau_encoder).counterattack(
        random_classifier, images, rng(len(images))
    )
    own = DOC(score="directional").counterattack(random_classifier, images, rng(len(images)))
    noise = DOC(score="directional").sensitivity_noise(images, rng(len(images)))
    expected, _ = DOC.sensitivity_score(tau_encoder, images, noise)
    assert torch.equal(separate.score, expected)
    assert not torch.allclose(separate.score, own.score, rtol=1e-2)
    # Same draws after the score, same defended encoder: the steps' result is the same.
    assert torch.allclose(separate.final_delta, own.final_delta, atol=1e-6)


def test_docs_weighted_final_at_full_weight_is_ttcs_softmax_average_of_its_iterates(random_classifier, images):
    doc = DOC(final="weighted", tau_thres=float("inf"))  # w = 1 for every image
    result = doc.counterattack(random_classifier, images, rng(len(images)))
    assert torch.equal(result.weight, torch.ones_like(result.weight))
    # DOC's own iterates, from the same draws: delta0 first (tau's), then one normal per step.
    draws = rng(len(images))
    delta0 = torch.max(torch.min(draws.uniform_like(images, -doc.eps, doc.eps), 1 - images), -images)
    with torch.no_grad():
        anchor = random_classifier.encoder(images)
    kept = doc.orthogonal_steps(random_classifier.encoder, images, anchor, delta0, draws)
    expected = weighted_mix(kept, TTC(steps=doc.steps, beta=doc.beta).step_weights())
    assert torch.allclose(result.images - images, expected, atol=1e-6)
    assert not torch.allclose(expected, kept[-1], atol=1e-4)  # not the last iterate: the average


# --- MAC ------------------------------------------------------------------------------------------------------

def test_macs_pixel_units_scale_with_the_input_side(images):
    mac = MAC(rotation=0.0, scale_low=1.0, scale_high=1.0, jitter_p=0.0, noise_p=0.0, blur_p=1.0)
    from counterattack.augment import affine

    def shifted(x: torch.Tensor, u: torch.Tensor, unit: float) -> torch.Tensor:
        side = x.shape[-1]
        shift = torch.stack([torch.round((2 * u[:, c] - 1) * 0.04 * side / unit) * unit for c in (1, 2)], dim=1)
        # Whole pixels of a 224-px input, as RandomAffine rounds (at most half a unit past the range).
        assert shift.abs().max() <= 0.04 * side + unit / 2
        return affine(x, torch.zeros(len(x)), shift, torch.ones(len(x)))

    # 32 px: translations round to 1/7 px; the blur's kernel rounds to 1 px, which leaves the image as it is.
    draw = mac.draw_augmentations(rng(len(images)), 1, images)
    assert torch.allclose(mac.augment(images, draw), shifted(images, draw.parameters, 32 / 224), atol=1e-6)
    # 112 px: half-pixel translations; sigma in [0.5, 1.2] pixels of a 224-px input is [0.25, 0.6] here, kernel 3.
    mid = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    draw = mac.draw_augmentations(rng(3), 1, mid)
    u = draw.parameters
    sigma = 0.5 * (0.5 + u[:, 14] * 0.7)
    expected = gaussian_blur(shifted(mid, u, 0.5), sigma, 3)
    assert torch.allclose(mac.augment(mid, draw), expected, atol=1e-6)
    assert not torch.allclose(mac.augment(mid, draw), gaussian_blur(shifted(mid, u, 0.5), 2 * sigma, 3), atol=1e-3)


def test_macs_pixel_units_are_unchanged_at_224_px():
    big = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    mac = MAC(rotation=0.0, scale_low=1.0, scale_high=1.0, jitter_p=0.0, noise_p=0.0, blur_p=1.0)
    draw = mac.draw_augmentations(rng(2), 1, big)
    u = draw.parameters
    shift = torch.stack([torch.round((2 * u[:, c] - 1) * 0.04 * 224) for c in (1, 2)], dim=1)  # whole pixels
    from counterattack.augment import affine

    expected = gaussian_blur(affine(big, torch.zeros(2), shift, torch.ones(2)), 0.5 + u[:, 14] * 0.7, 5)
    assert torch.allclose(mac.augment(big, draw), expected, atol=1e-6)


def test_mac_gates_every_view_and_gate_evasion_pushes_them_all(random_classifier, images):
    output = MAC(tau_thres=0.0)(random_classifier, images, rng(len(images)))
    assert output.score.shape == (len(images), 2) and output.counterattacked.shape == (len(images), 2)
    scores = torch.tensor([[0.1, 0.9], [0.6, 0.7]], requires_grad=True)
    term = gate_evasion(MAC(tau_thres=0.5), scores)
    (grad,) = torch.autograd.grad(term.sum(), scores)
    assert term.shape == (2,)
    # Each view pushed down towards the unflagged side, down to tau_thres / 1.5 and no further.
    assert torch.equal(grad, torch.tensor([[0.0, -1.0], [-1.0, -1.0]]))


def test_mac_without_steps_gives_delta0_and_its_step_is_a_quarter_of_its_budget(random_classifier, images):
    assert MAC().alpha == pytest.approx(2 / 255) and MAC(eps=4 / 255).alpha == pytest.approx(1 / 255)
    assert MAC(eps=4 / 255, step_size=3 / 255).alpha == pytest.approx(3 / 255)
    result = MAC(steps=0, tau_thres=10.0).counterattack(random_classifier, images, rng(len(images)))  # w ~ 0
    delta0 = torch.max(torch.min(result.noise, 1 - result.views), -result.views)
    assert torch.allclose(result.defended, result.views + delta0, atol=1e-7)


# --- R-TPT ----------------------------------------------------------------------------------------------------

def test_rtpts_views_follow_the_dataset_as_the_authors_code_chooses():
    assert RTPT().augmentation == "auto"
    assert RTPT().for_dataset("imagenet").augmentation == "crop-flip"
    assert RTPT().for_dataset("tinyimagenet").augmentation == "crop-flip"
    assert RTPT().for_dataset("cifar10").augmentation == "augmix"
    assert RTPT(augmentation="augmix").for_dataset("imagenet").augmentation == "augmix"  # an explicit choice stands


def test_rtpts_authors_self_mask_keeps_views_whose_self_similarity_rounds_below_one():
    from counterattack.defenses.rtpt import reliability_weights

    features = F.normalize(torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    diagonal = reliability_weights(features, 3, 0.01)
    authors = reliability_weights(features, 3, 0.01, "authors")
    kept_self = (features @ features.transpose(1, 2)).diagonal(dim1=1, dim2=2) < 1.0
    assert kept_self.any()  # float32 rounding: some views' own similarity is not >= 1.0
    assert not torch.allclose(diagonal, authors)


# --- 8-bit adversarial images -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, other", [("round", "floor"), ("floor", "round")])
def test_quantized_sets_hold_8_bit_images_and_defenses_see_them(tmp_path, random_clip_dir, mode, other, capsys):
    folder = write_image_folder(tmp_path / "imgs", {"cat": 3, "dog": 3}, seed=6)
    common = ["--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}", "--dataset",
              f"imagefolder:{folder}", "--attack-steps", "2", "--eps", "4"]
    assert main(["attack", *common, "--quantize-adversarial", mode, "--out", str(tmp_path / "adv")]) == 0
    assert main(["attack", *common, "--out", str(tmp_path / "float")]) == 0
    from counterattack.adversarial import AdversarialSet

    stored = AdversarialSet.open(tmp_path / "adv")
    assert stored.config.quantize_adversarial == mode
    (dataset,) = stored.done()
    ids = sorted(stored.done()[dataset])
    images = stored.images(dataset, ids, "pgd")
    assert torch.equal(images * 255, torch.round(images * 255))  # on the k/255 grid, exactly
    unquantized = AdversarialSet.open(tmp_path / "float").images(dataset, ids, "pgd")
    assert torch.equal(images, to_8_bits(unquantized, mode)) and not torch.equal(images, to_8_bits(unquantized, other))
    # Evaluated directly with --quantize-adversarial: the undefended accuracy recomputed by hand on the same images.
    assert main(["eval", *common, "--quantize-adversarial", mode, "--defense", "none", "--out",
                 str(tmp_path / "e")]) == 0
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["config"]["quantize_adversarial"] == mode
    batches = part_batches(tmp_path / "e")
    preds = {i: p for b in batches for i, p in zip(b["ids"], b["defenses"]["none"]["adv"]["pgd"]["pred"], strict=True)}
    from counterattack import ZeroShotClassifier, load_clip

    classifier = ZeroShotClassifier.from_clip(load_clip(f"local-dir:{random_clip_dir}"), ["cat", "dog"])
    with torch.no_grad():
        by_hand = classifier.logits(images).argmax(-1).tolist()
    assert [preds[i] for i in ids] == by_hand
    # The stored set evaluated without the flag: its images are 8-bit, and the results say so.
    assert main(["eval", *common[:-4], "--adversarial", str(tmp_path / "adv"), "--defense", "none",
                 "--out", str(tmp_path / "on-set")]) == 0
    on_set = json.loads((tmp_path / "on-set" / "results.json").read_text())
    assert on_set["config"]["quantize_adversarial"] == mode
    capsys.readouterr()
    assert main(["eval", *common[:-4], "--adversarial", str(tmp_path / "adv"), "--quantize-adversarial", other,
                 "--defense", "none", "--out", str(tmp_path / "refused")]) == 2
    assert f"already put on the 8-bit grid by {mode}; --quantize-adversarial {other} cannot" in capsys.readouterr().err


def test_to_8_bits_rounds_to_the_nearest_level():
    x = torch.tensor([0.0, 0.5 / 255 - 1e-6, 0.5 / 255 + 1e-6, 1.0, 100.4 / 255])
    assert torch.equal(to_8_bits(x) * 255, torch.tensor([0.0, 0.0, 1.0, 255.0, 100.0]))


@pytest.mark.parametrize("make, message", [
    (lambda: to_8_bits(torch.zeros(1), "Round"), "8-bit mode must be one of round, floor, not 'Round'"),
    (lambda: RunSettings(quantize_adversarial="truncate"), "quantize_adversarial must be None or one of round, floor"),
    (lambda: RunSettings(attack_labels="pred"), "attack_labels must be one of true, predicted, not 'pred'"),
])
def test_a_misspelt_mode_is_refused_not_run_as_the_other(make, message):
    with pytest.raises(CounterattackError, match=message):
        make()


# --- precision and config identity -----------------------------------------------------------------------------

def test_paper_precision_follows_each_defenses_authors(capsys):
    assert {name: defense_precision("paper", cls()) for name, cls in DEFENSES.items()} == {
        "none": "fp16", "agc": "fp16", "anti-adversary": "fp16", "clipure": "fp16", "cola": "fp16", "csr": "fp32",
        "dbd": "fp16", "doc": "fp16", "et3": "fp32", "hd": "fp16", "mac": "fp16", "rn": "fp16", "rtpt": "fp32",
        "ttc": "fp16", "tte": "fp16"}
    assert defense_precision("bf16", RTPT()) == "bf16"
    assert main(["defenses", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["csr"]["paper_precision"] == "fp32" and listing["ttc"]["paper_precision"] == "fp16"


@pytest.mark.parametrize("defense, before", [
    (DOC(), ("score", "final", "beta", "separate_tau_encoder", "score_encoder")),
    (MAC(), ("pixel_units",)),
    (RTPT(), ("self_mask",)),
])
def test_every_new_default_changes_the_run_config_hash(defense, before):
    """A run of the previous release (whose records lacked these settings) does not resume silently."""
    now = {"defenses": [defense.describe()]}
    then = {"defenses": [{k: v for k, v in defense.describe().items() if k not in before}]}
    assert config_hash(now) != config_hash(then)


def test_a_run_under_paper_precision_records_each_defenses_resolved_precision(tmp_path, random_clip_dir):
    """So a defense whose authors' precision is corrected later (CSR: fp16, now fp32) starts a new run."""
    folder = write_image_folder(tmp_path / "imgs", {"cat": 2, "dog": 2}, seed=3)
    common = ["--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}", "--dataset",
              f"imagefolder:{folder}", "--attack-steps", "1", "--defense", "ttc,csr"]
    assert main(["eval", *common, "--precision", "paper", "--out", str(tmp_path / "paper")]) == 0
    described = json.loads((tmp_path / "paper" / "results.json").read_text())["config"]["defenses"]
    assert {d["defense"]: d["precision"] for d in described} == {"ttc": "fp16", "csr": "fp32"}
    assert main(["eval", *common, "--out", str(tmp_path / "default")]) == 0
    described = json.loads((tmp_path / "default" / "results.json").read_text())["config"]["defenses"]
    assert all("precision" not in d for d in described)
