"""Write cifar10_descriptions.json: 50 plain sentences per CIFAR-10 class, for DBD and COLA on the tiny CLIP.

DBD and COLA read class descriptions written by a language model (CuPL's, AWT's); those texts are their authors' and
are not shipped. For the README's runs on the tiny CLIP, this script writes sentences of its own instead: for each
class, ten visual traits written by hand here, each in five phrasings. Run it from the project root:

    python docs/examples/make_cifar10_descriptions.py     # writes docs/examples/cifar10_descriptions.json
"""

import json
from pathlib import Path

TRAITS = {
    "airplane": ["long metal wings", "a jet engine under each wing", "a row of small windows", "a tail fin",
                 "landing gear", "a white fuselage", "a pointed nose", "a runway below it", "a blue sky around it",
                 "contrails behind it"],
    "automobile": ["four wheels", "a windshield", "headlights", "a shiny painted body", "side mirrors",
                   "a licence plate", "doors with handles", "a road beneath it", "a grille at the front",
                   "tinted windows"],
    "bird": ["feathers", "a small beak", "two thin legs", "folded wings", "a perch on a branch", "bright plumage",
             "round dark eyes", "a fanned tail", "claws gripping a twig", "a sky or a tree behind it"],
    "cat": ["pointed ears", "whiskers", "soft fur", "slit pupils", "a long tail", "small paws", "a pink nose",
            "a curled sleeping pose", "a striped or spotted coat", "a house or a sofa around it"],
    "deer": ["antlers", "long thin legs", "a brown coat", "a white tail", "large ears", "a forest around it",
             "hooves", "a grassy meadow", "a slender neck", "dark eyes"],
    "dog": ["floppy ears", "a wet nose", "a wagging tail", "a collar", "a furry coat", "a tongue hanging out",
            "four paws", "a leash", "a snout", "a garden or a park around it"],
    "frog": ["green skin", "bulging eyes", "long back legs", "webbed feet", "a wide mouth", "a lily pad",
             "moist smooth skin", "a pond around it", "spots on its back", "a squatting pose"],
    "horse": ["a long mane", "hooves", "a long face", "a saddle", "a flowing tail", "a brown or white coat",
              "long muscular legs", "a field or a stable around it", "a bridle", "pointed ears"],
    "ship": ["a hull on the water", "a deck", "a mast or a funnel", "waves around it", "a harbour", "portholes",
             "containers or sails", "an anchor", "a bow cutting the sea", "a horizon behind it"],
    "truck": ["a large cargo box", "big wheels", "a cab with a high windshield", "a trailer", "a loading bed",
              "mud flaps", "a road or a highway", "bright headlights", "a heavy grille", "a company logo on its side"],
}
PHRASINGS = ["A photo of a {c}, which has {t}.", "A {c} with {t}.", "A picture showing a {c}: note {t}.",
             "You can tell it is a {c} by {t}.", "A small image of a {c} with {t}."]

if __name__ == "__main__":
    descriptions = {c: [p.format(c=c, t=t) for t in traits for p in PHRASINGS] for c, traits in TRAITS.items()}
    out = Path(__file__).with_name("cifar10_descriptions.json")
    out.write_text(json.dumps(descriptions, indent=1) + "\n", encoding="utf-8")
    print(f"{out}: {len(descriptions)} classes, {len(next(iter(descriptions.values())))} sentences each")
