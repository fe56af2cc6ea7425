"""The prompt sets: the TTC paper's per-dataset rules on the datasets' own raw class names, the curated
``openai`` set, and the check that a loaded dataset has the class list the prompts were built for."""

from collections import Counter

import pytest

from counterattack import CounterattackError
from counterattack.data import DATASETS
from counterattack.data.prompts import (
    IMAGENET_DROPPED_WNID,
    OPENAI_TEMPLATE,
    PCAM_PAPER_PROMPTS,
    PROMPT_SETS,
    check_own_classes,
    class_prompts,
    clean,
    imagenet_paper_name,
    prompt_class_indices,
    raw_classes,
)
from counterattack.data.registry import curated_class_names, readable

from testkit import write_image_folder


def paper_prompt(dataset: str, raw_name: str) -> str:
    """The paper's prompt for the class whose own (raw) name is ``raw_name``, read off the built prompt set."""
    names, templates = class_prompts(dataset, "paper")
    raw = raw_classes(dataset)
    assert raw_name in raw, f"{raw_name!r} is not one of {dataset}'s own classes"
    position = prompt_class_indices(dataset, "paper").index(raw.index(raw_name))
    (template,) = templates
    return template.format(names[position])


@pytest.mark.parametrize("dataset, raw_name, prompt", [
    ("cifar10", "airplane", "This is a photo of a airplane."),
    ("cifar100", "aquarium_fish", "This is a photo of a aquarium_fish."),  # torchvision's names, underscores kept
    ("cifar100", "sweet_pepper", "This is a photo of a sweet_pepper."),
    ("stl10", "monkey", "This is a photo of a monkey."),
    ("sun397", "apartment_building/outdoor", "This is a photo of a apartment_building/outdoor."),
    ("sun397", "abbey", "This is a photo of a abbey."),
    ("imagenet", "n01440764", "This is a photo of a tench."),
    ("imagenet", "n01443537", "This is a photo of a goldfish."),
    ("tinyimagenet", "n01443537", "This is a photo of a goldfish."),
    ("tinyimagenet", "n01629819", "This is a photo of a European fire salamander."),  # refined names keep their case
    ("caltech101", "Faces", "This is a photo of a person."),
    ("caltech101", "Faces_easy", "This is a photo of a person."),
    ("caltech101", "car_side", "This is a photo of a car_side."),
    ("caltech101", "Leopards", "This is a photo of a Leopards."),
    ("caltech256", "145.motorbikes-101", "A photo of a motorbikes."),
    ("caltech256", "002.american-flag", "A photo of a american flag."),
    ("caltech256", "253.faces-easy-101", "A photo of a faces easy."),
    ("caltech256", "257.clutter", "A photo of a clutter."),
    ("eurosat", "AnnualCrop", "A centered satellite photo of annualcrop."),
    ("eurosat", "HerbaceousVegetation", "A centered satellite photo of herbaceousvegetation."),
    ("dtd", "polka-dotted", "A surface with a polka dotted texture."),
    ("dtd", "banded", "A surface with a banded texture."),
    ("fgvc_aircraft", "707-320", "A photo of a boeing 707-320, a type of aircraft."),  # hyphens kept
    ("fgvc_aircraft", "A300B4", "A photo of a a300b4, a type of aircraft."),
    ("fgvc_aircraft", "Boeing 717", "A photo of a boeing 717, a type of aircraft."),
    ("fgvc_aircraft", "F/A-18", "A photo of a f/a-18, a type of aircraft."),
    ("flowers102", "hard-leaved pocket orchid", "A photo of a hard leaved pocket orchid, a type of flower."),
    ("flowers102", "colts foot", "A photo of a colts foot, a type of flower."),
    ("flowers102", "cyclamen ", "A photo of a cyclamen , a type of flower."),  # the authors' trailing space, unstripped
    ("food101", "apple_pie", "A photo of apple pie, a type of food."),
    ("food101", "cheese_plate", "A photo of cheese plate, a type of food."),
    ("oxford_pets", "American Bulldog", "A photo of a american bulldog, a type of pet."),
    ("oxford_pets", "Abyssinian", "A photo of a abyssinian, a type of pet."),
    ("stanford_cars", "AM General Hummer SUV 2000", "A photo of a am general hummer suv."),
    ("stanford_cars", "Ford F-150 Regular Cab 2012", "A photo of a ford f 150 regular cab."),
    ("stanford_cars", "Ram C/V Cargo Van Minivan 2012", "A photo of a ram c/v cargo van minivan."),
    ("country211", "XK", "A photo I took in Kosovo."),
    ("country211", "AE", "A photo I took in United Arab Emirates."),
    ("country211", "TL", "A photo I took in Timor Leste."),  # pycountry's "Timor-Leste", hyphen as a space
    ("country211", "KR", "A photo I took in Korea, Republic of."),
])
def test_paper_rule_turns_the_raw_name_into_the_papers_prompt(dataset, raw_name, prompt):
    assert paper_prompt(dataset, raw_name) == prompt


def test_pcam_paper_prompts_are_whole_sentences():
    names, templates = class_prompts("pcam", "paper")
    assert templates == ["{}"]
    assert [templates[0].format(n) for n in names] == [
        "This is a photo of a healthy lymph node tissue.",
        "This is a photo of a lymph node tumor tissue.",
    ] == PCAM_PAPER_PROMPTS


def test_clean_lowercases_and_spaces_underscores_and_hyphens_only():
    assert clean("Apple_Pie-Deluxe") == "apple pie deluxe"
    assert clean("cyclamen ") == "cyclamen "


@pytest.mark.parametrize("prompt_set", PROMPT_SETS)
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_one_prompt_per_class(dataset, prompt_set):
    names, templates = class_prompts(dataset, prompt_set)
    expected = 999 if (dataset, prompt_set) == ("imagenet", "paper") else DATASETS[dataset].num_classes
    assert len(names) == expected
    assert len(prompt_class_indices(dataset, prompt_set)) == expected
    assert templates and all(t.count("{}") == 1 for t in templates)
    assert all(isinstance(n, str) and n.strip() for n in names)


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_shipped_raw_lists_have_the_registry_counts_and_no_repeats(dataset):
    raw = raw_classes(dataset)
    assert len(raw) == DATASETS[dataset].num_classes
    assert len(set(raw)) == len(raw)


def test_raw_lists_in_torchvision_order():
    assert raw_classes("caltech101")[:6] == ["Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes"]
    assert raw_classes("caltech256")[0] == "001.ak47" and raw_classes("caltech256")[-1] == "257.clutter"
    assert raw_classes("imagenet") == sorted(raw_classes("imagenet"))  # ImageFolder over val/<wnid>/
    assert raw_classes("food101") == sorted(raw_classes("food101"))  # sorted(meta keys): cheese_plate < cheesecake
    assert raw_classes("country211")[:3] == ["AD", "AE", "AF"]
    assert raw_classes("tinyimagenet")[:3] == ["n02124075", "n04067472", "n04540053"]  # wnids.txt, not sorted
    assert raw_classes("eurosat")[0] == "AnnualCrop" and raw_classes("fgvc_aircraft")[0] == "707-320"


def test_raw_classes_returns_a_fresh_list():
    raw_classes("cifar10").append("mutated")
    assert len(raw_classes("cifar10")) == 10


def test_paper_imagenet_drops_one_synset_and_keeps_wnid_order():
    raw = raw_classes("imagenet")
    kept = prompt_class_indices("imagenet", "paper")
    assert IMAGENET_DROPPED_WNID in raw
    assert [raw[i] for i in kept] == [w for w in raw if w != IMAGENET_DROPPED_WNID]
    assert prompt_class_indices("imagenet", "openai") == list(range(1000))
    names, _ = class_prompts("imagenet", "paper")
    dropped = raw.index(IMAGENET_DROPPED_WNID)
    assert dropped == 638
    # every later class moves up by one: the synset after the dropped one takes its place
    assert names[dropped] == imagenet_paper_name(raw[dropped + 1]) and names[-1] == imagenet_paper_name(raw[-1])


def test_paper_duplicates_are_kept():
    cars, _ = class_prompts("stanford_cars", "paper")
    repeated = {name: n for name, n in Counter(cars).items() if n > 1}
    assert repeated == {name: 2 for name in [
        "audi s4 sedan", "bentley continental gt coupe", "dodge caliber wagon", "dodge durango suv",
        "ford f 150 regular cab", "honda odyssey minivan", "volkswagen golf hatchback"]}
    caltech, _ = class_prompts("caltech101", "paper")
    assert caltech[:2] == ["person", "person"] and caltech.count("person") == 2


def test_openai_set_is_the_curated_names_with_one_template():
    curated = curated_class_names()
    for dataset in DATASETS:
        names, templates = class_prompts(dataset, "openai")
        assert templates == ["This is a photo of a {}."]
        if dataset in curated:
            assert names == curated[dataset]
    assert class_prompts("caltech256", "openai")[0] == [readable(c) for c in raw_classes("caltech256")]
    assert class_prompts("fgvc_aircraft", "openai")[0] == raw_classes("fgvc_aircraft")
    imagenet_names = dict(zip(raw_classes("imagenet"), curated["imagenet"], strict=True))
    assert class_prompts("tinyimagenet", "openai")[0] == [imagenet_names[w] for w in raw_classes("tinyimagenet")]


def test_unknown_dataset_or_prompt_set_lists_the_choices():
    with pytest.raises(CounterattackError, match="Unknown dataset 'mnist'.*cifar10.*tinyimagenet"):
        class_prompts("mnist")
    with pytest.raises(CounterattackError, match="Unknown dataset 'mnist'"):
        raw_classes("mnist")
    with pytest.raises(CounterattackError, match="Unknown dataset 'mnist'"):
        check_own_classes("mnist", [])
    with pytest.raises(CounterattackError, match="Unknown prompt set 'clip'.*paper, openai"):
        class_prompts("cifar10", "clip")


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_check_own_classes_accepts_the_shipped_list(dataset):
    check_own_classes(dataset, raw_classes(dataset))
    check_own_classes(dataset, tuple(raw_classes(dataset)))


def test_check_own_classes_names_the_first_difference_of_a_reordered_list():
    own = raw_classes("stl10")
    own[3], own[4] = own[4], own[3]
    with pytest.raises(CounterattackError) as error:
        check_own_classes("stl10", own)
    assert "stl10" in str(error.value)
    assert "index 3: expected 'cat', found 'deer'" in str(error.value)


def test_check_own_classes_refuses_a_shortened_list():
    own = raw_classes("food101")[:-1]
    with pytest.raises(CounterattackError) as error:
        check_own_classes("food101", own)
    message = str(error.value)
    assert "100 classes, expected 101" in message
    assert "index 100: expected 'waffles', found no class" in message


def test_check_own_classes_refuses_a_list_that_differs_inside():
    own = raw_classes("caltech101")
    own[50] = "BACKGROUND_Google"
    with pytest.raises(CounterattackError, match="index 50: expected 'helicopter', found 'BACKGROUND_Google'"):
        check_own_classes("caltech101", own)


def test_flowers102_is_checked_by_count_only():
    check_own_classes("flowers102", [str(i) for i in range(102)])  # torchvision reads no names from its files
    with pytest.raises(CounterattackError, match="101 classes, expected 102"):
        check_own_classes("flowers102", [str(i) for i in range(101)])


@pytest.mark.parametrize("prompt_set", ["paper", "openai"])
def test_prompts_command_prints_one_prompt_per_class_without_the_data(capsys, prompt_set):
    from counterattack.cli import main

    for dataset, info in DATASETS.items():
        assert main(["prompts", dataset, "--prompts", prompt_set]) == 0
        lines = capsys.readouterr().out.splitlines()
        expected = info.num_classes - (dataset == "imagenet" and prompt_set == "paper")
        assert len(lines) == expected, dataset
        names, templates = class_prompts(dataset, prompt_set)
        assert lines[0] == templates[0].format(names[0])
    assert main(["prompts", "cifar10"]) == 0
    first_two = capsys.readouterr().out.splitlines()[:2]
    assert first_two == ["This is a photo of a airplane.", "This is a photo of a automobile."]
    assert main(["prompts", "eurosat"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "A centered satellite photo of annualcrop."
    assert main(["prompts", "mnist"]) == 2
    assert "Unknown dataset 'mnist'" in capsys.readouterr().err


def test_image_folders_take_the_model_transform_or_the_papers(tmp_path, random_clip_dir):
    from counterattack import load_clip, load_dataset

    folder = write_image_folder(tmp_path / "imgs", {"cat": 1, "dog": 1}, size=(300, 400))
    clip = load_clip(f"local-dir:{random_clip_dir}")
    model = load_dataset(f"imagefolder:{folder}", clip)  # the model's own: resize the short side to 32, crop
    paper = load_dataset(f"imagefolder:{folder}", clip, transform="paper")  # Resize 256, CenterCrop 224
    assert model.dataset[0][0].shape == (3, 32, 32) and paper.dataset[0][0].shape == (3, 224, 224)
    assert model.fingerprint == paper.fingerprint and paper.image_ids == ["cat/0000.png", "dog/0000.png"]


# --- R-TPT's datasets (CoOp's layouts): UCF101 and the ImageNet variants ------------------------------------------

def test_imagenet_a_and_r_classes_are_200_imagenet_synsets_each():
    imagenet = raw_classes("imagenet")
    for dataset in ("imagenet_a", "imagenet_r"):
        wnids = raw_classes(dataset)
        assert len(wnids) == len(set(wnids)) == 200 and set(wnids) <= set(imagenet), dataset
        assert wnids == sorted(wnids)  # ImageFolder's order over <wnid>/ folders, as CoOp numbers them
    # Spot checks against the datasets' own code: ImageNet-A's 200-class index 0 is ImageNet's class 6
    # (thousand_k_to_200 = {..., 6: 0, ..., 11: 1, ...}); ImageNet-R's mask starts at ImageNet's class 1.
    assert raw_classes("imagenet_a")[:2] == [imagenet[6], imagenet[11]]
    assert raw_classes("imagenet_r")[:2] == [imagenet[1], imagenet[2]]
    assert raw_classes("imagenet_a")[-1] == imagenet[988] and raw_classes("imagenet_r")[-1] == imagenet[988]
    assert raw_classes("imagenet_a") != raw_classes("imagenet_r")


def test_imagenet_v2_and_sketch_share_imagenets_class_list():
    assert raw_classes("imagenet_v2") == raw_classes("imagenet_sketch") == raw_classes("imagenet")


def test_ucf101_classes_are_coops_camel_case_split():
    classes = raw_classes("ucf101")
    assert len(classes) == len(set(classes)) == 101
    assert classes[:3] == ["Apply_Eye_Makeup", "Apply_Lipstick", "Archery"] and classes[-1] == "Yo_Yo"
    # UCF101's classInd.txt order (Hammering before HammerThrow), not a sort of the renamed names.
    assert classes[34:36] == ["Hammering", "Hammer_Throw"] and classes[46:48] == ["Jumping_Jack", "Jump_Rope"]


@pytest.mark.parametrize("dataset, raw_name, prompt", [
    ("ucf101", "Apply_Eye_Makeup", "a photo of a person doing Apply Eye Makeup."),
    ("ucf101", "Yo_Yo", "a photo of a person doing Yo Yo."),
    ("imagenet_a", "n01498041", "a photo of a stingray."),
    ("imagenet_r", "n01443537", "a photo of a goldfish."),
    ("imagenet_v2", "n01440764", "a photo of a tench."),
    ("imagenet_sketch", "n03710721", "a photo of a maillot."),
    ("imagenet_sketch", IMAGENET_DROPPED_WNID, "a photo of a tights."),  # not in the TTC table: OpenAI's name
])
def test_r_tpt_datasets_paper_prompts(dataset, raw_name, prompt):
    assert paper_prompt(dataset, raw_name) == prompt


def test_imagenet_variants_paper_names_are_the_ttc_names_and_keep_every_class():
    curated = dict(zip(raw_classes("imagenet"), curated_class_names()["imagenet"], strict=True))
    for dataset in ("imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_sketch"):
        own = raw_classes(dataset)
        names, templates = class_prompts(dataset, "paper")
        assert templates == ["a photo of a {}."] and prompt_class_indices(dataset, "paper") == list(range(len(own)))
        assert names == [imagenet_paper_name(w) if w != IMAGENET_DROPPED_WNID else curated[w] for w in own]
        assert class_prompts(dataset, "openai") == ([curated[w] for w in own], [OPENAI_TEMPLATE])
