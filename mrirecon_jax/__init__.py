"""mrirecon-jax: repair brain MRI slices with a Flax U-Net and find what the repair changed."""

from mrirecon_jax import cpu

# Before JAX starts a backend: the XLA CPU flags measured faster for this network (see cpu.py).
cpu.xla_flags()
