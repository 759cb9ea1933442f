import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mrirecon_jax import train
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


def test_the_compiled_initialisation_gives_flax_s_own_parameters():
    """build_model initialises in one compiled program; the parameters are those of flax's eager initialisers for the
    run's seed, and another seed gives others."""
    cfg = Config(model="tiny", image_size=32, seed=5)
    key = jax.random.fold_in(jax.random.key(5), train.INIT_KEY)
    eager = nnx.state(unet.UNet(unet.PRESETS["tiny"], rngs=nnx.Rngs(params=key)), nnx.Param)
    compiled = nnx.state(build_model(cfg), nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, compiled, eager)
    other = nnx.state(build_model(cfg.replace(seed=6)), nnx.Param)
    assert not np.array_equal(other["head"]["kernel"][...], compiled["head"]["kernel"][...])


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


def test_space_to_depth_stacks_each_block_of_pixels_as_channels_and_depth_to_space_undoes_it():
    x = jax.random.uniform(jax.random.key(3), (2, 8, 12, 3))
    blocks = unet.space_to_depth(x, 2)
    assert blocks.shape == (2, 4, 6, 12)
    for a in range(2):
        for b in range(2):  # channel group (a, b) is the pixel at offset (a, b) of each block
            np.testing.assert_array_equal(blocks[..., (2 * a + b) * 3:(2 * a + b + 1) * 3], x[:, a::2, b::2])
    np.testing.assert_array_equal(unet.depth_to_space(blocks, 2), x)


def test_pixel_shuffle_u_net_has_no_full_size_level_and_predicts_each_pixel_of_a_block_from_its_own_channel():
    spec = unet.PRESETS["small_shuffle"]
    model = unet.UNet(spec, rngs=nnx.Rngs(0))
    assert model.down[0].conv1.kernel.shape == (3, 3, 4, 32)  # 2 x 2 blocks of one channel
    small = unet.count_params(unet.UNet(unet.PRESETS["small"], rngs=nnx.Rngs(0)))
    assert abs(unet.count_params(model) - small) < 0.05 * small
    x = jax.random.uniform(jax.random.key(4), (2, 64, 64, 1))
    assert model(x).shape == (2, 64, 64, 1)
    # A head that puts 1 in its channel (a, b) alone: the residual output is the input plus 1 at offset (a, b).
    model.head.kernel[...] = jnp.zeros_like(model.head.kernel[...])
    model.head.bias[...] = jnp.zeros(4).at[2 * 1 + 0].set(1.0)
    added = np.asarray(model(x) - x)[..., 0]
    np.testing.assert_allclose(added[:, 1::2, 0::2], 1.0, atol=1e-6)
    np.testing.assert_allclose(added[:, 0::2, :], 0.0, atol=1e-6)
    np.testing.assert_allclose(added[:, 1::2, 1::2], 0.0, atol=1e-6)
    with pytest.raises(UserError, match="multiple of 8 .*2 x 2 pixel blocks"):
        build_model(Config(model="small_shuffle", image_size=36))
    wide = nnx.eval_shape(lambda: unet.UNet(unet.PRESETS["small_shuffle_wide"], rngs=nnx.Rngs(0)))  # shapes only
    assert wide.down[0].conv1.kernel.shape == (3, 3, 4, 48) and wide.head.kernel.shape[-1] == 4
    assert 1.0e6 < unet.count_params(wide) < 1.1e6  # 1.05 M, as README says


def test_lite_preset_has_one_convolution_in_each_outermost_block_only():
    small = unet.UNet(unet.PRESETS["small"], rngs=nnx.Rngs(0))
    lite = unet.UNet(unet.PRESETS["small_lite"], rngs=nnx.Rngs(0))
    outermost = [(lite.down[0], small.down[0]), (lite.up_blocks[-1], small.up_blocks[-1])]
    assert all(block.conv2 is None and twin.conv2 is not None for block, twin in outermost)
    assert all(block.conv2 is not None for block in [*lite.down[1:], lite.bottleneck, *lite.up_blocks[:-1]])
    # The two 16 x 16 3x3 kernels (with biases) are all it lacks.
    assert unet.count_params(small) - unet.count_params(lite) == 2 * (3 * 3 * 16 * 16 + 16)
    assert lite(jnp.ones((2, 64, 64, 1))).shape == (2, 64, 64, 1)
