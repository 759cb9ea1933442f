"""Thesis Table 5.1: 64 x 64 px, 151 central axial slices (142 mm slab), original corruptions."""

from experiments._thesis import SLAB_151_MM, thesis_config


def get_config():
    return thesis_config(image_size=64, slab_mm=SLAB_151_MM, corruptions="original")
