"""Thesis Table 5.2: 32 x 32 px, 151 central axial slices (142 mm slab), augmented corruptions."""

from experiments._thesis import SLAB_151_MM, thesis_config


def get_config():
    return thesis_config(image_size=32, slab_mm=SLAB_151_MM, corruptions="augmented")
