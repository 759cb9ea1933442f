"""Thesis Table 5.1: 64 x 64 px, 51 central axial slices (48 mm slab), original corruptions."""

from experiments._thesis import thesis_config


def get_config():
    return thesis_config(image_size=64, corruptions="original")
