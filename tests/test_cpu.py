import platform

import jaxlib

from mrirecon_jax import cpu


def test_conv_flag_is_added_once_and_respects_the_user(monkeypatch):
    monkeypatch.setattr(jaxlib, "__version__", "0.10.2")
    env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    assert cpu.xla_flags(env)
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_enable_fast_math=false", cpu.CPU_CONV_FLAG]
    assert cpu.xla_flags(env) and env["XLA_FLAGS"].count(cpu.CPU_CONV_FLAG) == 1
    own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}  # the user's own choice stays
    assert not cpu.xla_flags(own) and own["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
    opted_out = {cpu.OPT_OUT: "0"}
    assert not cpu.xla_flags(opted_out) and "XLA_FLAGS" not in opted_out


def test_conv_flag_is_not_given_to_an_untested_jaxlib(monkeypatch):
    # An XLA flag the installed jaxlib does not know aborts the process, so only known versions get it.
    for version in ("0.9.0", "0.12.0", "1.0.0"):
        monkeypatch.setattr(jaxlib, "__version__", version)
        env = {}
        assert not cpu.xla_flags(env) and "XLA_FLAGS" not in env


def test_importing_the_package_configured_this_process():
    import os

    import jax

    flags = os.environ.get("XLA_FLAGS", "")
    known = cpu.CPU_CONV_FLAG_JAXLIB[0] <= tuple(map(int, jaxlib.__version__.split(".")[:2])) \
        < cpu.CPU_CONV_FLAG_JAXLIB[1]
    if known and os.environ.get(cpu.OPT_OUT, "1") != "0":
        assert cpu.CPU_CONV_FLAG in flags or "xla_cpu_experimental_ynn_fusion_type" in flags
    assert jax.numpy.ones(2).sum() == 2  # the backend starts with the flags


def test_keep_freed_memory(monkeypatch):
    assert not cpu.keep_freed_memory({cpu.OPT_OUT: "0"})
    kept = cpu.keep_freed_memory({})
    assert kept == cpu.KEEPING_FREED_MEMORY
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert kept
