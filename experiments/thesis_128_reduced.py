"""Thesis Table 5.3: 100 subjects, 51 central axial slices (48 mm slab), 128 x 128 px, original corruptions."""

from experiments._thesis import thesis_config


def get_config():
    return thesis_config(image_size=128, max_subjects=100)
