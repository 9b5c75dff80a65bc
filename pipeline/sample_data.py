"""A small, learnable image dataset in the dogImages layout, generated on the spot.

It is the embedded default (no download) for the smoke run and the fixture of the
tests: `train/ valid/ test/`, class folders named like dogImages'
(`001.Affenpinscher` ...), JPEG files. Each class is a colour and a stripe
orientation, drawn at random positions and scales over noise, so a small network
learns it in seconds while chance stays at 1/num_classes.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.files import atomic_dir

# The 133 class folders of Udacity's dogImages.zip, in order.
DOG_BREEDS = """Affenpinscher Afghan_hound Airedale_terrier Akita Alaskan_malamute American_eskimo_dog
American_foxhound American_staffordshire_terrier American_water_spaniel Anatolian_shepherd_dog
Australian_cattle_dog Australian_shepherd Australian_terrier Basenji Basset_hound Beagle Bearded_collie
Beauceron Bedlington_terrier Belgian_malinois Belgian_sheepdog Belgian_tervuren Bernese_mountain_dog
Bichon_frise Black_and_tan_coonhound Black_russian_terrier Bloodhound Bluetick_coonhound Border_collie
Border_terrier Borzoi Boston_terrier Bouvier_des_flandres Boxer Boykin_spaniel Briard Brittany
Brussels_griffon Bull_terrier Bulldog Bullmastiff Cairn_terrier Canaan_dog Cane_corso
Cardigan_welsh_corgi Cavalier_king_charles_spaniel Chesapeake_bay_retriever Chihuahua Chinese_crested
Chinese_shar-pei Chow_chow Clumber_spaniel Cocker_spaniel Collie Curly-coated_retriever Dachshund
Dalmatian Dandie_dinmont_terrier Doberman_pinscher Dogue_de_bordeaux English_cocker_spaniel
English_setter English_springer_spaniel English_toy_spaniel Entlebucher_mountain_dog Field_spaniel
Finnish_spitz Flat-coated_retriever French_bulldog German_pinscher German_shepherd_dog
German_shorthaired_pointer German_wirehaired_pointer Giant_schnauzer Glen_of_imaal_terrier
Golden_retriever Gordon_setter Great_dane Great_pyrenees Greater_swiss_mountain_dog Greyhound Havanese
Ibizan_hound Icelandic_sheepdog Irish_red_and_white_setter Irish_setter Irish_terrier
Irish_water_spaniel Irish_wolfhound Italian_greyhound Japanese_chin Keeshond Kerry_blue_terrier
Komondor Kuvasz Labrador_retriever Lakeland_terrier Leonberger Lhasa_apso Lowchen Maltese
Manchester_terrier Mastiff Miniature_schnauzer Neapolitan_mastiff Newfoundland Norfolk_terrier
Norwegian_buhund Norwegian_elkhound Norwegian_lundehund Norwich_terrier
Nova_scotia_duck_tolling_retriever Old_english_sheepdog Otterhound Papillon Parson_russell_terrier
Pekingese Pembroke_welsh_corgi Petit_basset_griffon_vendeen Pharaoh_hound Plott Pointer Pomeranian
Poodle Portuguese_water_dog Saint_bernard Silky_terrier Smooth_fox_terrier Tibetan_mastiff
Welsh_springer_spaniel Wirehaired_pointing_griffon Xoloitzcuintli Yorkshire_terrier""".split()
assert len(DOG_BREEDS) == 133

DOG_CLASS_DIRS = [f"{i:03d}.{name}" for i, name in enumerate(DOG_BREEDS, start=1)]
SPLITS = ("train", "valid", "test")
# dogImages.zip's split sizes, for verification of a real download.
DOG_SPLIT_SIZES = {"train": 6680, "valid": 835, "test": 836}


def _class_style(index: int, num_classes: int) -> tuple[np.ndarray, float]:
    hue = index / num_classes
    rgb = np.array([math.cos(2 * math.pi * (hue + k / 3)) for k in range(3)]) * 0.5 + 0.5
    angle = math.pi * ((index * 0.618) % 1.0)
    return (rgb * 255).astype(np.float32), angle


def _draw(rng: np.random.Generator, index: int, num_classes: int, size: int) -> Image.Image:
    colour, angle = _class_style(index, num_classes)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    freq = rng.uniform(3.0, 5.0)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (x * math.cos(angle) + y * math.sin(angle)) + rng.uniform(0, 6.3))
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.45)
    blob = ((x - cx) ** 2 + (y - cy) ** 2 < r * r).astype(np.float32)
    background = rng.uniform(40, 215, size=3).astype(np.float32)
    img = background * (1 - blob[..., None]) + (colour * (0.55 + 0.45 * stripes[..., None])) * blob[..., None]
    img += rng.normal(0, 12, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def generate_dataset(root: str | os.PathLike, num_classes: int = 4,
                     per_class: tuple[int, int, int] = (24, 6, 6), size: int = 64,
                     seed: int = 0) -> Path:
    """Write `root/{train,valid,test}/NNN.Breed/Breed_NNNNN.jpg` and return root.

    Written to a temporary sibling and renamed, so `root` is either complete or absent.
    """
    if not 2 <= num_classes <= len(DOG_CLASS_DIRS):
        raise ValueError(f"num_classes must be in 2..{len(DOG_CLASS_DIRS)}, got {num_classes}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    serial = 0
    with atomic_dir(root) as tmp:
        for split, count in zip(SPLITS, per_class):
            for index in range(num_classes):
                class_dir = tmp / split / DOG_CLASS_DIRS[index]
                class_dir.mkdir(parents=True)
                for _ in range(count):
                    serial += 1
                    image = _draw(rng, index, num_classes, size)
                    image.save(class_dir / f"{DOG_BREEDS[index]}_{serial:05d}.jpg", quality=90)
    return root
