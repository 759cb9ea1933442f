"""mrirecon-jax: repair brain MRI slices with a Flax U-Net and find what the repair changed."""

from mrirecon_jax import cpu

# Before JAX starts a backend: Eigen rather than YNNPACK for CPU convolutions (faster here; see cpu.py).
cpu.xla_flags()
