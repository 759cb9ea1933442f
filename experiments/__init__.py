"""Named scenarios: each module has get_config() -> mrirecon_jax.config.Config."""
