"""The data room: NIfTI volumes to model-grid slices and back (host side, numpy).

- ``volumes``: finding, naming, reading and refusing NIfTI files (canonical RAS orientation).
- ``geometry``: plane, slab, display orientation, square field of view, resizing, the affine back to scanner space.
- ``normalise``: the clean slices' min-max frame, and the one normalisation of a model input (jittable).
- ``brain``: brain masks and skull stripping.
- ``align``: the aligned preprocessing (N4, registration to the template), its per-file cache, and the way back to
  the input's grid.
- ``prepare``: ``prepare_volume``, the one path from a volume to model-grid slices, used by every job.
- ``dataset``: the subject split, the dataset of a run and its on-disk cache; registration in worker processes.
- ``cache``: where the on-disk caches live, their atomic writes and forgiving reads.
- ``demo``: the demo source for machines without data.
"""
