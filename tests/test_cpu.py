"""The CPU settings change what XLA compiles and how the process allocates, checked in fresh processes."""

import os
import platform
import subprocess
import sys

import jaxlib
import pytest

from conftest import ROOT
from mrirecon_jax import cpu

REGION = "--xla_cpu_copy_insertion_use_region_analysis=true"

COMPILED_CONV = """
import mrirecon_jax, jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
print("ynn" in f.lower(jnp.ones((1, 32, 32, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text().lower())
"""

FREED_MEMORY = """
import sys, numpy as np
from mrirecon_jax import cpu
kept = cpu.keep_freed_memory()
page = 4096
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
blocks = [np.ones(8 * 2 ** 20, np.uint8) for _ in range(32)]  # 256 MiB in blocks big enough for mmap
before = rss()
del blocks
print(kept, (before - rss()) / 2 ** 20)
"""


def _python(code: str, **env) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XLA_FLAGS": "", **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_importing_the_package_gives_eigen_convolutions_unless_opted_out():
    version = tuple(int(p) for p in jaxlib.__version__.split(".")[:2])
    first, end = cpu.CPU_FLAGS[cpu.CPU_CONV_FLAG]
    if not first <= version < end:
        pytest.skip(f"jaxlib {jaxlib.__version__} is not known to accept {cpu.CPU_CONV_FLAG}")
    assert _python(COMPILED_CONV) == ["False"]  # no YNNPACK fusion of the convolution
    assert _python(COMPILED_CONV, **{cpu.OPT_OUT: "0"}) == ["True"]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_keeps_freed_blocks_in_the_heap():
    kept, returned = _python(FREED_MEMORY)
    assert kept == "True" and float(returned) < 16  # freed, but still the process's
    kept, returned = _python(FREED_MEMORY, **{cpu.OPT_OUT: "0"})
    assert kept == "False" and float(returned) > 200  # given back to the kernel at once


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
