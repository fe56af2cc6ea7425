"""Hugging Face transformers backbones (``--model transformers:...``), offline.

Tiny random ``CLIPModel`` and ``SiglipModel`` are saved with ``save_pretrained`` and loaded back
through ``transformers:FOLDER``. Their tokenizer is a ``CLIPTokenizer`` built from the BPE
vocabulary open_clip ships (its encoder as vocab.json, its ranked merges as merges.txt, its own
start/end token names), since no tokenizer can be downloaded here. The SigLIP folder gets the same
tokenizer: SigLIP's own is sentencepiece-based and would need a trained sentencepiece model, and
``AutoTokenizer`` loads whatever tokenizer class the folder names, so the model sees well-formed
token ids of its vocabulary size either way (SigLIP pools the last position of max-length padded
text, which does not depend on the tokenizer's kind).
"""

import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from open_clip.tokenizer import SimpleTokenizer  # noqa: E402

from counterattack import CounterattackError, ImageRandomness, ZeroShotClassifier, load_clip  # noqa: E402
from counterattack.augmix import draw_views, render_views  # noqa: E402
from counterattack.defenses.rtpt import RTPT, encode_prompts, prompt_context, reliability_weights  # noqa: E402

from testkit import RunsCode, api_clean_accuracy, eval_none_and_ttc, fake_hub_cache, write_image_folder  # noqa: E402

CONTEXT_LENGTH = 16
CLASSES = ["cat", "dog", "red car", "airplane"]
TEMPLATE = "This is a photo of a {}."
# Not the library defaults, so the test sees that the processor's own values are used.
CLIP_MEAN, CLIP_STD = (0.45, 0.40, 0.35), (0.25, 0.30, 0.20)
TINY_TOWERS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """A CLIPTokenizer over open_clip's own BPE vocabulary, and that vocabulary."""
    folder = tmp_path_factory.mktemp("bpe")
    bpe = SimpleTokenizer()
    (folder / "vocab.json").write_text(json.dumps(bpe.encoder), encoding="utf-8")
    ranked = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    merges = "\n".join(" ".join(pair) for pair in ranked)
    (folder / "merges.txt").write_text(f"#version: 0.2\n{merges}\n", encoding="utf-8")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        folder, bos_token="<start_of_text>", eos_token="<end_of_text>", pad_token="<end_of_text>",
        unk_token="<end_of_text>", model_max_length=CONTEXT_LENGTH)
    return tokenizer, bpe


def _text_config(bpe) -> dict:
    return dict(TINY_TOWERS, vocab_size=bpe.vocab_size, max_position_embeddings=CONTEXT_LENGTH,
                bos_token_id=bpe.sot_token_id, eos_token_id=bpe.eot_token_id, pad_token_id=bpe.eot_token_id)


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory, bpe_tokenizer):
    folder = tmp_path_factory.mktemp("hf-clip")
    tokenizer, bpe = bpe_tokenizer
    tokenizer.save_pretrained(folder)
    text = _text_config(bpe)
    vision = dict(TINY_TOWERS, image_size=32, patch_size=8, num_hidden_layers=2)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_siglip_dir(tmp_path_factory, bpe_tokenizer):
    folder = tmp_path_factory.mktemp("hf-siglip")
    tokenizer, bpe = bpe_tokenizer
    tokenizer.save_pretrained(folder)
    text = _text_config(bpe)
    vision = dict(TINY_TOWERS, image_size=32, patch_size=8, num_hidden_layers=2)
    torch.manual_seed(1)
    model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():  # SigLIP initialises both to 0; the sigmoid head's real values are far from it
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-3.0)
    model.save_pretrained(folder)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_clip(hf_clip_dir):
    return load_clip(f"transformers:{hf_clip_dir}")


def _pixels(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _models_own_logits(folder, clip, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``logits_per_image`` as transformers computes it, with the folder's own processor and tokenizer."""
    model = clip.model.hf_model
    tokenizer = clip.tokenizer.tokenizer  # what AutoTokenizer.from_pretrained(folder) returned
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    # The pixels already have the model's size and lie in [0, 1]: the processor only normalises.
    pixel_values = processor(images=list(pixels), do_resize=False, do_center_crop=False, do_rescale=False,
                             return_tensors="pt")["pixel_values"]
    # CLIP as its processor prepares text (padded to the longest, with a mask); SigLIP as it was trained.
    if model.config.model_type == "clip":
        text = tokenizer(prompts, padding=True, return_tensors="pt")
        inputs = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
    else:
        inputs = {"input_ids": tokenizer(prompts, padding="max_length", return_tensors="pt")["input_ids"]}
    with torch.no_grad():
        return model(pixel_values=pixel_values, **inputs).logits_per_image


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_logits_equal_the_models_own_logits_per_image(kind, hf_clip_dir, hf_clip, hf_siglip_dir):
    folder = hf_clip_dir if kind == "clip" else hf_siglip_dir
    clip = hf_clip if kind == "clip" else load_clip(f"transformers:{folder}")
    assert clip.image_size == (32, 32)
    assert clip.mean == pytest.approx(CLIP_MEAN if kind == "clip" else (0.5, 0.5, 0.5))
    assert clip.preprocess_cfg["resize_mode"] == ("shortest" if kind == "clip" else "squash")
    assert not clip.model.training and not any(p.requires_grad for p in clip.model.parameters())

    classifier = ZeroShotClassifier.from_clip(clip, CLASSES, [TEMPLATE])
    pixels = _pixels(6, seed=2)
    with torch.no_grad():
        ours = classifier.logits(pixels)
    theirs = _models_own_logits(folder, clip, pixels, [TEMPLATE.format(c) for c in CLASSES])
    assert ours.shape == theirs.shape == (6, len(CLASSES))
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert theirs.std() > 1e-3  # the logits differ between images and classes: the check can fail
    if kind == "siglip":  # the sigmoid head's bias is part of the logits
        assert classifier.logit_bias == pytest.approx(-3.0) and classifier.logit_scale == pytest.approx(10.0)


def test_embeddings_do_not_depend_on_autograd(hf_clip):
    """TTC's gate compares two nearby embeddings computed with and without autograd: they must agree bit for bit."""
    classifier = ZeroShotClassifier.from_clip(hf_clip, CLASSES)
    pixels = _pixels(4, seed=3)
    with torch.no_grad():
        plain = classifier.encode_image(pixels)
    tracked = classifier.encode_image(pixels.clone().requires_grad_(True))
    assert torch.equal(plain, tracked.detach())


def test_eval_runs_ttc_end_to_end_on_a_transformers_model(tmp_path, hf_clip_dir, hf_clip):
    images = write_image_folder(tmp_path / "images", {"cat": 3, "dog": 3}, seed=4)
    _, none, ttc = eval_none_and_ttc(f"transformers:{hf_clip_dir}", images, tmp_path / "out")
    assert ttc["mean_score_clean"] > 0 and 0 <= ttc["counterattacked_clean"] <= 1
    assert ttc["forwards_per_image"] >= 2  # TTC ran: f(x) and f(x + delta0) at least
    # The command line's clean accuracy is the API's on the same images.
    chosen = [0, 1, 3, 4]  # the class-balanced first four: two cats, two dogs
    assert none["clean_acc"] == pytest.approx(api_clean_accuracy(hf_clip, images, chosen))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_rtpt_tunes_the_prompt_of_a_transformers_model(kind, hf_clip_dir, hf_clip, hf_siglip_dir):
    """R-TPT through the backbone protocol: the untuned prompt's text features are the model's own, its
    logits at learning rate 0 are the reliability-weighted zero-shot logits of its views, and one AdamW step
    moves the context (its gradient comes back through the transformers text tower)."""
    clip = hf_clip if kind == "clip" else load_clip(f"transformers:{hf_siglip_dir}")
    classifier = ZeroShotClassifier.from_clip(clip, CLASSES, [TEMPLATE])
    prompt = prompt_context(classifier)
    assert prompt.length == 6  # "this is a photo of a", after the start-of-text token
    # The model's own text features, its tokenizer padding as its processor does (CLIP: to the longest, masked).
    prompts, tokenizer = [TEMPLATE.format(c) for c in CLASSES], clip.tokenizer.tokenizer
    if kind == "clip":
        inputs = dict(tokenizer(prompts, padding=True, return_tensors="pt"))
    else:
        inputs = {"input_ids": tokenizer(prompts, padding="max_length", return_tensors="pt")["input_ids"]}
    with torch.no_grad():
        theirs = clip.model.hf_model.get_text_features(**inputs)
        theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output  # a model output from 5.0
        ours = prompt.backbone.encode_text_embeddings(prompt.frozen, prompt.tokens)
        untuned = encode_prompts(prompt, prompt.init[None])[0]
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(untuned, classifier.text_embeddings, atol=1e-5)
    # Another template's words as the context: the features are that template's own prompts'.
    drawing = ZeroShotClassifier.from_clip(clip, CLASSES, ["This is a drawing of a {}."])
    with torch.no_grad():
        swapped = encode_prompts(prompt, prompt_context(drawing).init[None])[0]
    assert torch.allclose(swapped, drawing.text_embeddings, atol=1e-5)
    assert not torch.allclose(swapped, untuned, atol=1e-3)

    pixels, views = _pixels(3, seed=6), 8

    def streams() -> ImageRandomness:
        return ImageRandomness.from_seed(0, len(pixels), "rtpt")

    output = RTPT(views=views, lr=0.0)(classifier, pixels, streams()).logits
    with torch.no_grad():
        features = classifier.encode_image(render_views(pixels, draw_views(streams(), views, 1.0, pixels.device))
                                           .flatten(0, 1))
        logits = classifier.logits_from_embeddings(features).view(len(pixels), views, -1)
        unit = F.normalize(features, dim=-1).view(len(pixels), views, -1)
        weights = reliability_weights(unit, 20, 0.01)
    assert torch.allclose(output, (weights[..., None] * logits).sum(1), atol=1e-5)
    assert logits.std(dim=1).mean() > 1e-3  # the views' logits differ: the weights matter
    # Adam's first step moves every coordinate of the context by the learning rate, where its gradient is not 0.
    tuned = RTPT(views=views).tune_context(prompt, unit, classifier.logit_scale)
    assert torch.allclose((tuned - prompt.init).abs().amax(dim=(1, 2)), torch.full((len(pixels),), 5e-3), rtol=0.01)


def test_hub_id_loads_from_the_local_cache(tmp_path, hf_clip_dir, hf_clip):
    snapshot = fake_hub_cache(tmp_path, "someone/tiny-hf-clip")
    for path in hf_clip_dir.iterdir():
        shutil.copy(path, snapshot / path.name)
    from_hub = load_clip("transformers:someone/tiny-hf-clip", cache_dir=str(tmp_path))
    from_dir = hf_clip
    assert from_hub.description == "transformers:someone/tiny-hf-clip"
    pixels = _pixels(2, seed=5)
    with torch.no_grad():
        assert torch.equal(from_hub.model.visual(pixels), from_dir.model.visual(pixels))
    with pytest.raises(CounterattackError, match="hf download someone/missing"):
        load_clip("transformers:someone/missing", cache_dir=str(tmp_path))


def test_pickled_weights_are_refused(tmp_path, hf_clip_dir):
    folder = tmp_path / "pickled"
    shutil.copytree(hf_clip_dir, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CounterattackError, match="Refusing to load transformers:.*pytorch_model.bin"):
        load_clip(f"transformers:{folder}")
    assert not marker.exists()


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "Model folder not found"),
        ("no-config", "needs config.json"),
        ("unsupported", "'bert' model"),
        ("no-weights", "No safetensors weights"),
        ("no-processor", "no preprocessor_config.json"),
    ],
)
def test_folder_errors_are_clear(tmp_path, hf_clip_dir, breakage, message):
    folder = tmp_path / "model"
    shutil.copytree(hf_clip_dir, folder)
    if breakage == "missing":
        folder = tmp_path / "no" / "such" / "folder"
    elif breakage == "no-config":
        (folder / "config.json").unlink()
    elif breakage == "unsupported":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    elif breakage == "no-weights":
        (folder / "model.safetensors").unlink()
    else:
        (folder / "preprocessor_config.json").unlink()
    with pytest.raises(CounterattackError, match=message):
        load_clip(f"transformers:{folder}")


def test_without_transformers_the_error_says_what_to_install(monkeypatch, hf_clip_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed: import fails
    with pytest.raises(CounterattackError) as caught:
        load_clip(f"transformers:{hf_clip_dir}")
    message = str(caught.value)
    assert 'pip install "clip-counterattack[transformers]"' in message and "\n" not in message


def test_the_transformers_row_identifies_weights_by_the_tensors_loaded(tmp_path, hf_clip_dir, hf_siglip_dir):
    """As test_contracts checks the other scheme rows: another path to the same weights, with a file beside them, is
    one identity; another model is another."""
    from counterattack.backbones import weights_identity

    def identity(folder) -> dict:
        return weights_identity(f"transformers:{folder}", None, load_clip(f"transformers:{folder}"))

    first = identity(hf_clip_dir)
    copy = shutil.copytree(hf_clip_dir, tmp_path / "copy")
    (copy / "notes.json").write_text("{}")
    assert identity(copy) == first == {"model": "transformers:folder", "weights": first["weights"]}
    assert identity(hf_siglip_dir)["weights"] != first["weights"]
