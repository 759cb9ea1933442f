"""Thesis §5.3.3: 100 subjects, 64 x 64 px, 48 mm central coronal slab, original corruptions."""

from experiments._thesis import REDUCED_SUBJECTS, thesis_config


def get_config():
    return thesis_config(plane="coronal", max_subjects=REDUCED_SUBJECTS)
