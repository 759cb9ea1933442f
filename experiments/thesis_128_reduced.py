"""Thesis Table 5.3: 100 subjects, 128 x 128 px, 51 central axial slices (48 mm slab), original corruptions."""

from experiments._thesis import REDUCED_SUBJECTS, thesis_config


def get_config():
    return thesis_config(image_size=128, max_subjects=REDUCED_SUBJECTS)
