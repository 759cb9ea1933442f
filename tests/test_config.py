"""The run's Config: its cross-field checks, each worded once in the flags' terms, and its JSON record."""

import pytest

from mrirecon_jax.config import Config, UserError


@pytest.mark.parametrize("changes, message", [
    (dict(slices=None), "exactly one of --slices and --slab_mm"),
    (dict(slices=4, slab_mm=20.0), "exactly one of --slices and --slab_mm"),
    (dict(slices=0), "--slices must be positive"),
    (dict(slices=None, slab_mm=-1.0), "--slab_mm must be positive"),
    (dict(val_slab_mm=0.0), "--val_slab_mm must be positive"),
    (dict(image_size=4), "--image_size must be at least 8"),
    (dict(val_fraction=1.0), "--val_fraction must be between 0 and 1"),
    (dict(max_subjects=1), "--max_subjects must be at least 2"),
    (dict(learning_rate=0.0), "--learning_rate must be positive"),
    (dict(batch_size=0), "--batch_size must be at least 1"),
    (dict(max_train_minutes=0.0), "--max_train_minutes must be positive"),
    (dict(foreground_weight=-1.0), "--foreground_weight must not be negative"),
    (dict(ema_decay=1.0), "--ema_decay must be at least 0 and below 1"),
    (dict(mask_input=1.5), "--mask_input must be a fraction from 0 to 1"),
    (dict(mask_slack_px=-1), "--mask_slack_px must not be negative"),
])
def test_impossible_settings_are_refused_in_one_sentence(changes, message):
    with pytest.raises(UserError, match=message):
        Config().replace(**changes)


def test_json_round_trip_ignores_unknown_fields_and_fills_missing_ones():
    cfg = Config(image_size=32, slices=None, slab_mm=48.0, model="tiny")
    assert Config.from_json(cfg.to_json()) == cfg
    assert Config.from_json('{"image_size": 32, "from_a_newer_version": 1}') == Config(image_size=32)


def test_validation_config_takes_the_validation_slab_and_nothing_else():
    cfg = Config(slices=None, slab_mm=142.0, val_slab_mm=48.0, image_size=32, seed=3)
    held_out = cfg.for_validation()
    assert (held_out.slices, held_out.slab_mm, held_out.val_slab_mm) == (None, 48.0, None)
    assert held_out.replace(slab_mm=142.0, val_slab_mm=48.0) == cfg
    plain = Config(slices=4)
    assert plain.for_validation() is plain
    assert Config(slices=4, val_slab_mm=8.0).for_validation().replace(slices=4, slab_mm=None) == Config(slices=4)
