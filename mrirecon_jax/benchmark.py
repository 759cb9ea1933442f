"""Benchmark job: compiled training throughput per device, model, image size, batch size and dtype.

Every row times the very train step that training uses (`train.make_steps`, corruptions drawn inside it), and
the same step without corruptions so their share is visible, plus inference. Figures are medians over timed
steps after warm-up, each step waited for with `block_until_ready`. FLOPs come from XLA's cost analysis of the
compiled step (what it executes: Winograd convolutions count fewer than direct ones); utilisation is against
the device's dense peak (a table for known accelerators; on a CPU, a matmul measured here in the same dtype).
With ``peer="torch"`` the same network's train step is also timed in PyTorch (``python -m tools.peer_torch``,
run as a separate process; torch is not a dependency) and each row gets ``peer_images_per_s`` and ``speed_vs_peer``
(ours without corruptions / the peer's, which has none). With ``trace_dir`` a JAX profiler trace of a few timed
steps (with corruptions) is written per row, for Perfetto (ui.perfetto.dev) or TensorBoard's profile plugin.

Scaling: each configuration is timed on 1, 2, 4, ... and all the devices present (one process), the per-device
batch held fixed as data parallelism uses it (the given batch size is the global batch on all devices), and each
row's ``scaling_efficiency`` is its images/s over the device count times the one-device row's. Beside the step
throughput, ``input_slices_per_s`` is what the grain loader delivers from a memory-mapped store of that image
size and batch (``data.stream.loader_throughput``, with cfg.data_workers). With several processes only the full
mesh is timed and process 0 writes the files.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from mrirecon_jax import cpu, distributed, train
from mrirecon_jax.config import Config, UserError
from mrirecon_jax.data import stream
from mrirecon_jax.models import unet

PEER_MODULE = "tools.peer_torch"  # run from the checkout's root
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PEERS = ("none", "torch")

THESIS_EPOCH_SLICES = 23_715  # 465 training subjects x 51 slices
# Thesis hours per epoch, scaled to a 23,715-slice epoch where its run had fewer slices (REFERENCE.md).
THESIS_HOURS_PER_EPOCH = {
    32: {"dGPU": 0.14},  # Table 5.2, original, 51 slices
    64: {"dGPU": 0.23, "iGPU": 16.43, "CPU": 14.61},  # Table 5.1, original, 51 slices
    128: {"dGPU": round(0.14 * THESIS_EPOCH_SLICES / (80 * 51), 2)},  # Table 5.3: 80 training subjects x 51
}
# Dense peak TFLOP/s by device kind (substring match): (bfloat16, float32). float32 on NVIDIA Ampere and later is
# the TF32 tensor-core peak, which XLA uses for float32 convolutions and matmuls at default precision.
ACCELERATOR_PEAK_TFLOPS = {
    "H200": (989.0, 494.0),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "L4": (121.0, 60.0),
    "A10G": (70.0, 35.0),
    "V100": (125.0, 15.7),
    "TPU v4": (275.0, 275.0),
    "TPU v5 lite": (197.0, 197.0),
    "TPU v5p": (459.0, 459.0),
    "TPU v6 lite": (918.0, 918.0),
}


def _median_seconds(fn, steps: int) -> tuple[float, float, float]:
    """(median, 10th, 90th percentile) wall time of `fn()`, which must block until its result is ready."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.percentile(times, 10)), float(np.percentile(times, 90))


def measured_matmul_tflops(dtype: str, size: int = 2048, repeats: int = 10) -> float:
    """Achieved TFLOP/s of a jitted square matmul in `dtype`: the practical peak of a CPU."""
    a = jnp.ones((size, size), unet.DTYPES[dtype])
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    seconds, _, _ = _median_seconds(lambda: matmul(a).block_until_ready(), repeats)
    return 2 * size ** 3 / seconds / 1e12


def device_peak_tflops(device, dtype: str) -> tuple[float, str]:
    """(peak dense TFLOP/s, where the figure comes from) for one device and dtype."""
    for name, peaks in ACCELERATOR_PEAK_TFLOPS.items():
        if name.lower() in device.device_kind.lower():
            return peaks[0 if dtype == "bfloat16" else 1], f"datasheet ({name})"
    if device.platform == "cpu":
        return measured_matmul_tflops(dtype), "measured 2048x2048 matmul"
    return float("nan"), "unknown device"


def _flops(compiled) -> Optional[float]:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def _memory_bytes(compiled) -> Optional[int]:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


TRACED_STEPS = 3


def _time_train_step(cfg: Config, mesh, batch, steps: int, warmup: int, trace_dir: Optional[Path] = None) -> dict:
    graphdef, tx, state = train.init_train_state(cfg, mesh)
    train_step = train.make_train_step(cfg, graphdef, tx, train.parse_policy(cfg.corruptions))
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def one_step():
        holder["state"], loss = compiled(holder["state"], batch)
        loss.block_until_ready()

    for _ in range(warmup):
        one_step()
    median, p10, p90 = _median_seconds(one_step, steps)
    if trace_dir is not None:  # after the timing, so that tracing costs nothing there
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            for _ in range(TRACED_STEPS):
                one_step()
    params = holder["state"]["params"]
    return {"compile_s": compile_s, "step_s": median, "step_s_p10": p10, "step_s_p90": p90,
            "flops_per_step": _flops(compiled), "compiled_memory_bytes": _memory_bytes(compiled),
            "graphdef": graphdef, "params": params}


def benchmark_one(cfg: Config, mesh, steps: int = 20, warmup: int = 3, trace_dir: Optional[Path] = None) -> dict:
    """One row: train step with and without corruptions, and inference, for one configuration; with
    `trace_dir`, also a profiler trace of the train step (with corruptions) there."""
    device = mesh.devices.flat[0]
    n_dev = mesh.devices.size
    images = np.random.default_rng(0).random((cfg.batch_size, cfg.image_size, cfg.image_size, 1), np.float32)
    batch = train.shared_batch(images, NamedSharding(mesh, P("data")))
    with_corruptions = _time_train_step(cfg, mesh, batch, steps, warmup, trace_dir)
    without = _time_train_step(cfg.replace(corruptions="none"), mesh, batch, steps, warmup)
    apply = train.model_apply(with_corruptions["graphdef"], mask_input=bool(cfg.mask_input))
    reconstruct = jax.jit(lambda params, x: train.reconstruct_corrupted(apply, params, x, cfg.nonnegative))
    reconstruct = reconstruct.lower(with_corruptions["params"], batch).compile()
    for _ in range(warmup):
        reconstruct(with_corruptions["params"], batch).block_until_ready()
    infer_s, _, _ = _median_seconds(lambda: reconstruct(with_corruptions["params"], batch).block_until_ready(),
                                    steps)
    peak, peak_source = device_peak_tflops(device, cfg.dtype)
    flops = with_corruptions["flops_per_step"]
    step_s = with_corruptions["step_s"]
    tflops = flops / step_s / 1e12 if flops else None
    memory = device.memory_stats() or {}
    images_per_s = cfg.batch_size / step_s
    return {
        "device": device.device_kind, "platform": device.platform, "n_devices": n_dev, "model": cfg.model,
        "image_size": cfg.image_size, "batch_size": cfg.batch_size, "dtype": cfg.dtype, "loss": cfg.loss,
        "corruptions": cfg.corruptions, "conv_impl": cfg.conv_impl,
        "compile_s": round(with_corruptions["compile_s"], 3),
        "steps_per_s": 1.0 / step_s, "step_s_p10": with_corruptions["step_s_p10"],
        "step_s_p90": with_corruptions["step_s_p90"], "images_per_s": images_per_s,
        "images_per_s_per_device": images_per_s / n_dev,
        "images_per_s_no_corruption": cfg.batch_size / without["step_s"],
        "corruption_share": 1.0 - without["step_s"] / step_s,
        "inference_images_per_s": cfg.batch_size / infer_s,
        "flops_per_step": flops, "tflops_per_s": tflops, "peak_tflops": peak, "peak_source": peak_source,
        "utilization": tflops / peak if tflops and peak == peak else None,
        "peak_memory_bytes": memory.get("peak_bytes_in_use"),
        "compiled_memory_bytes": with_corruptions["compiled_memory_bytes"],
        "thesis_epoch_hours": THESIS_EPOCH_SLICES / images_per_s / 3600,
        "thesis_hours_per_epoch": THESIS_HOURS_PER_EPOCH.get(cfg.image_size, {}),
        "trace_dir": str(trace_dir) if trace_dir is not None else None,
    }


def device_counts(n: int) -> list[int]:
    """The device counts a scaling series times: 1, 2, 4, ... below `n`, and `n`."""
    return [2 ** i for i in range(n.bit_length()) if 2 ** i < n] + [n]


def add_scaling(rows: Sequence[dict]) -> None:
    """Each row's scaling efficiency: images/s / (device count x the images/s of the same configuration on one
    device); None where that row was not timed."""
    def key(r):
        return r["model"], r["image_size"], r["batch_size"] // r["n_devices"], r["dtype"]
    single = {key(r): r["images_per_s"] for r in rows if r["n_devices"] == 1}
    for row in rows:
        one = single.get(key(row))
        row["scaling_efficiency"] = row["images_per_s"] / (row["n_devices"] * one) if one else None


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as a Markdown table (one line per configuration; peer columns when a peer was timed)."""
    with_peer = any("peer_images_per_s" in r for r in rows)
    header = ("| device | model | px | batch | dtype | compile s | img/s | img/s no corr. | corr. share | "
              "infer img/s | GFLOP/step | TFLOP/s | util. | mem MiB | h/thesis epoch | thesis h/epoch | scaling | "
              "input slices/s |"
              + (" peer img/s | vs peer |" if with_peer else ""))
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        memory = r["peak_memory_bytes"] or r["compiled_memory_bytes"]
        thesis = ", ".join(f"{k} {v}" for k, v in r["thesis_hours_per_epoch"].items()) or "-"
        peer = (f" {r['peer_images_per_s']:.1f} | {r['speed_vs_peer']:.2f}x |" if "peer_images_per_s" in r
                else " - | - |") if with_peer else ""
        lines.append(
            f"| {r['device']} x{r['n_devices']} | {r['model']} | {r['image_size']} | {r['batch_size']} | {r['dtype']} "
            f"| {r['compile_s']:.1f} | {r['images_per_s']:.1f} | {r['images_per_s_no_corruption']:.1f} "
            f"| {100 * r['corruption_share']:.1f} % | {r['inference_images_per_s']:.1f} "
            f"| {(r['flops_per_step'] or float('nan')) / 1e9:.1f} | {(r['tflops_per_s'] or float('nan')):.3f} "
            f"| {100 * (r['utilization'] or float('nan')):.1f} % | {(memory or float('nan')) / 2 ** 20:.0f} "
            f"| {r['thesis_epoch_hours']:.2f} | {thesis} | {_percent(r.get('scaling_efficiency'))} "
            f"| {r.get('input_slices_per_s') or float('nan'):.0f} |{peer}")
    return "\n".join(lines)


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def peer_rows(models: Sequence[str], image_sizes: Sequence[int], batch_sizes: Sequence[int],
              dtypes: Sequence[str], steps: int) -> list[dict]:
    """Time the same U-Net train step (MSE, Adam, no corruptions) in PyTorch through tools/peer_torch.py.

    Raises UserError when torch cannot be imported or the script fails."""
    try:
        import torch  # noqa: F401  (only checks that the peer can run)
    except ImportError:
        raise UserError("--peer=torch needs PyTorch (pip install torch==2.13.0; it is not in requirements.txt).") \
            from None
    rows = []
    for model in models:
        command = [sys.executable, "-m", PEER_MODULE, f"--model={model}",
                   f"--image_sizes={','.join(map(str, image_sizes))}",
                   f"--batch_sizes={','.join(map(str, batch_sizes))}", f"--steps={steps}"]
        if "bfloat16" in dtypes:
            command.append("--bf16")
        logging.info("Timing the PyTorch peer: %s", " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"The PyTorch peer ({PEER_MODULE}) failed: {last}")
        rows += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return rows


def attach_peer(rows: Sequence[dict], peers: Sequence[dict]) -> None:
    """Add the fastest matching peer's images/s (same model, size, batch; bfloat16 <-> its autocast; any memory
    format) to each row."""
    for row in rows:
        peer_dtype = {"float32": "float32", "bfloat16": "bfloat16-autocast"}.get(row["dtype"])
        match = [p for p in peers if (p["model"], p["image_size"], p["batch_size"], p["dtype"])
                 == (row["model"], row["image_size"], row["batch_size"], peer_dtype)]
        if match:
            best = max(match, key=lambda p: p["images_per_s"])
            row["peer"] = ", ".join(str(best[k]) for k in ("framework", "optimizer", "memory_format") if k in best)
            row["peer_images_per_s"] = best["images_per_s"]
            row["speed_vs_peer"] = row["images_per_s_no_corruption"] / best["images_per_s"]


def run_benchmark(cfg: Config, models: Sequence[str], image_sizes: Sequence[int], batch_sizes: Sequence[int],
                  dtypes: Sequence[str], output: Path, steps: int = 20, peer: str = "none",
                  trace_dir: Optional[Path] = None) -> list[dict]:
    """Benchmark every combination, write `output` (JSON) and `output` with .md, and return the rows; with
    peer="torch", time the PyTorch peer afterwards and attach its figures; with `trace_dir`, write a profiler
    trace per row into a subfolder named after it (the profiler adds a timestamped folder, so nothing is
    overwritten)."""
    output = Path(output)
    if output.suffix != ".json":
        raise UserError(f"--output={output} must be a .json file (the Markdown table goes beside it).")
    if peer not in PEERS:
        raise UserError(f"Unknown --peer={peer!r}; choose one of {', '.join(PEERS)}.")
    if trace_dir is not None:
        try:
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"--trace_dir={trace_dir} cannot be made a folder ({err.strerror}).") from None
    mesh = train.make_mesh()
    counts = device_counts(mesh.devices.size) if jax.process_count() == 1 else [mesh.devices.size]
    combinations = list(itertools.product(models, image_sizes, batch_sizes, dtypes))
    for model, size, batch, dtype in combinations:  # check every combination before timing anything
        train.build_model(cfg.replace(model=model, image_size=int(size), batch_size=int(batch), dtype=dtype))
        train.check_batch(int(batch), mesh, "--batch_sizes")
    rows, input_rates = [], {}
    for model, size, batch, dtype in combinations:
        for count in counts:
            row_cfg = cfg.replace(model=model, image_size=int(size), batch_size=int(batch) * count // mesh.devices.size,
                                  dtype=dtype)
            logging.info("Benchmarking %s %d px, batch %d, %s on %d device(s).", model, size, row_cfg.batch_size,
                         dtype, count)
            name = f"{model}_{size}px_b{row_cfg.batch_size}_{dtype}" + (f"_{count}dev" if len(counts) > 1 else "")
            row_trace = None if trace_dir is None else Path(trace_dir) / name
            row = benchmark_one(row_cfg, train.make_mesh(mesh.devices.flat[:count]), steps=steps, trace_dir=row_trace)
            rate_key = (int(size), row_cfg.batch_size // jax.process_count())
            if rate_key not in input_rates:
                input_rates[rate_key] = stream.loader_throughput(*rate_key, cfg.data_workers)
            rows.append({**row, "input_slices_per_s": input_rates[rate_key]})
    add_scaling(rows)
    if peer == "torch":
        attach_peer(rows, peer_rows(models, image_sizes, batch_sizes, dtypes, steps))
    meta = {"jax_version": jax.__version__, "backend": jax.default_backend(),
            "devices": [d.device_kind for d in jax.devices()], "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "timed_steps": steps, "cpu_keeps_freed_memory": cpu.KEEPING_FREED_MEMORY,
            "n_processes": jax.process_count(), "data_workers": cfg.data_workers}
    if not distributed.is_writer():
        return rows
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = markdown_table(rows)
    output.with_suffix(".md").write_text(
        f"# Benchmark\n\n{json.dumps(meta)}\n\n{table}\n\nThesis h/epoch: Tables 5.1-5.3 of the thesis, scaled "
        f"to a {THESIS_EPOCH_SLICES:,}-slice epoch; h/thesis epoch: the same epoch at this row's img/s.\n")
    print(table)
    return rows
