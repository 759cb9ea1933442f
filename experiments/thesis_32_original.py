"""Thesis Table 5.2: 32 x 32 px, 51 central axial slices (48 mm slab), original corruptions."""

from experiments._thesis import thesis_config


def get_config():
    return thesis_config(image_size=32, corruptions="original")
