import os
import platform

import jax
import jaxlib

from mrirecon_jax import cpu

REGION = "--xla_cpu_copy_insertion_use_region_analysis=true"


def test_cpu_flags_are_added_once_and_respect_the_user(monkeypatch):
    monkeypatch.setattr(jaxlib, "__version__", "0.10.2")
    env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    assert cpu.xla_flags(env) == [cpu.CPU_CONV_FLAG, REGION]
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_enable_fast_math=false", cpu.CPU_CONV_FLAG, REGION]
    assert cpu.xla_flags(env) == [] and env["XLA_FLAGS"].count(cpu.CPU_CONV_FLAG) == 1
    own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}  # the user's own choice stays
    assert cpu.xla_flags(own) == [REGION]
    assert own["XLA_FLAGS"].split() == ["--xla_cpu_experimental_ynn_fusion_type=", REGION]
    opted_out = {cpu.OPT_OUT: "0"}
    assert cpu.xla_flags(opted_out) == [] and "XLA_FLAGS" not in opted_out


def test_flags_are_only_given_to_jaxlibs_known_to_accept_them(monkeypatch):
    # An XLA flag the installed jaxlib does not know aborts the process.
    monkeypatch.setattr(jaxlib, "__version__", "0.11.2")
    assert cpu.xla_flags({}) == [cpu.CPU_CONV_FLAG]
    for version in ("0.9.0", "0.12.0", "1.0.0"):
        monkeypatch.setattr(jaxlib, "__version__", version)
        env = {}
        assert cpu.xla_flags(env) == [] and "XLA_FLAGS" not in env


def test_importing_the_package_configured_this_process():
    version = tuple(map(int, jaxlib.__version__.split(".")[:2]))
    expected = [flag for flag, (first, end) in cpu.CPU_FLAGS.items() if first <= version < end]
    if os.environ.get(cpu.OPT_OUT, "1") != "0":
        flags = os.environ.get("XLA_FLAGS", "")
        assert all(flag.split("=")[0] in flags for flag in expected)
    assert float(jax.numpy.ones(2).sum()) == 2.0  # the backend starts with those flags


def test_keep_freed_memory():
    assert not cpu.keep_freed_memory({cpu.OPT_OUT: "0"})
    kept = cpu.keep_freed_memory({})
    assert kept == cpu.KEEPING_FREED_MEMORY
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert kept
