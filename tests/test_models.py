import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mrirecon_jax.config import Config, UserError
from mrirecon_jax.models import unet
from mrirecon_jax.train import build_model


def test_thesis_preset_matches_the_thesis_size():
    model = nnx.eval_shape(lambda: unet.UNet(unet.PRESETS["thesis"], rngs=nnx.Rngs(0)))  # shapes only
    assert 30.5e6 < unet.count_params(model) < 31.5e6  # "more than 31 million parameters", 64..1024 channels
    assert unet.PRESETS["thesis"].output_activation == "relu"


def test_tiny_preset_is_a_few_thousand_parameters():
    model = unet.UNet(unet.PRESETS["tiny"], rngs=nnx.Rngs(0))
    assert 1_000 < unet.count_params(model) < 10_000


@pytest.mark.parametrize("activation", sorted(unet.OUTPUT_ACTIVATIONS))
def test_output_shape_and_activation_range(activation):
    spec = unet.resolve_spec("tiny", activation)
    model = unet.UNet(spec, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 1))
    y = model(x)
    assert y.shape == (3, 32, 32, 1) and y.dtype == jnp.float32
    if activation in ("relu", "sigmoid", "clip"):
        assert float(y.min()) >= 0.0
    if activation in ("sigmoid", "clip"):
        assert float(y.max()) <= 1.0


def test_image_size_must_fit_the_poolings():
    with pytest.raises(UserError, match="multiple of 16"):
        build_model(Config(model="thesis", image_size=40))


def test_unknown_preset_and_activation_are_user_errors():
    with pytest.raises(UserError, match="--model='huge'"):
        unet.resolve_spec("huge")
    with pytest.raises(UserError, match="--output_activation"):
        unet.resolve_spec("tiny", "tanh")


def test_bfloat16_compute_stays_close_to_float32():
    x = jax.random.uniform(jax.random.key(2), (2, 32, 32, 1))
    y32 = build_model(Config(model="tiny", image_size=32))(x)
    y16 = build_model(Config(model="tiny", image_size=32, dtype="bfloat16"))(x)
    assert y16.dtype == jnp.float32  # the head casts back
    assert float(jnp.max(jnp.abs(y16 - y32))) < 0.05
    assert not np.array_equal(np.asarray(y16), np.asarray(y32))  # bfloat16 really was used
