import gzip
import json
import sys

import pytest
from flax import nnx

from mrirecon_jax import benchmark
from mrirecon_jax.config import Config, UserError
from mrirecon_jax.models import unet


def test_benchmark_writes_one_row_per_combination(tmp_path):
    out = tmp_path / "bench.json"
    cfg = Config(model="tiny", corruptions="augmented", loss="ssim")
    rows = benchmark.run_benchmark(cfg, models=["tiny"], image_sizes=[32], batch_sizes=[2, 4], dtypes=["float32"],
                                   output=out, steps=3)
    written = json.loads(out.read_text())
    assert written["rows"] == json.loads(json.dumps(rows)) and len(rows) == 2
    assert written["meta"]["backend"] == "cpu" and written["meta"]["jax_version"]
    for row, batch in zip(rows, (2, 4)):
        assert row["batch_size"] == batch and row["image_size"] == 32 and row["model"] == "tiny"
        assert row["images_per_s"] == pytest.approx(batch * row["steps_per_s"])
        assert row["flops_per_step"] > 0 and 0 < row["utilization"]
        assert row["tflops_per_s"] == pytest.approx(row["flops_per_step"] * row["steps_per_s"] / 1e12)
        assert row["step_s_p10"] <= 1 / row["steps_per_s"] <= row["step_s_p90"]
        assert row["thesis_epoch_hours"] == pytest.approx(23_715 / row["images_per_s"] / 3600)
        assert row["thesis_hours_per_epoch"] == {"dGPU": 0.14}
        assert row["compiled_memory_bytes"] > 0 and row["peak_source"].startswith("measured")
    # FLOPs grow with the batch.
    assert rows[1]["flops_per_step"] > 1.5 * rows[0]["flops_per_step"]
    table = out.with_suffix(".md").read_text()
    assert table.count("| tiny | 32 |") == 2


def test_benchmark_writes_a_profiler_trace_per_row(tmp_path):
    cfg = Config(model="tiny", corruptions="none", loss="mse")
    rows = benchmark.run_benchmark(cfg, ["tiny"], [32], [2], ["float32"], tmp_path / "bench.json", steps=1,
                                   trace_dir=tmp_path / "traces")
    assert rows[0]["trace_dir"] == str(tmp_path / "traces" / "tiny_32px_b2_float32")
    traces = list((tmp_path / "traces" / "tiny_32px_b2_float32").rglob("*.xplane.pb"))
    perfetto = list((tmp_path / "traces" / "tiny_32px_b2_float32").rglob("perfetto_trace.json.gz"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0 and len(perfetto) == 1
    events = json.loads(gzip.decompress(perfetto[0].read_bytes()))
    steps = [e for e in events.get("traceEvents", events) if e.get("name") == "PjitFunction(jit(train_step))"]
    assert len(steps) >= benchmark.TRACED_STEPS  # (the profiler may log each call on two tracks)


def test_benchmark_refuses_bad_output_and_bad_combinations(tmp_path):
    cfg = Config(model="tiny")
    with pytest.raises(UserError, match=".json"):
        benchmark.run_benchmark(cfg, ["tiny"], [32], [2], ["float32"], tmp_path / "bench.txt", steps=1)
    with pytest.raises(UserError, match="multiple of"):
        benchmark.run_benchmark(cfg, ["tiny"], [30], [2], ["float32"], tmp_path / "bench.json", steps=1)
    with pytest.raises(UserError, match="dtype"):
        benchmark.run_benchmark(cfg, ["tiny"], [32], [2], ["float16"], tmp_path / "bench.json", steps=1)
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(UserError, match="trace_dir"):
        benchmark.run_benchmark(cfg, ["tiny"], [32], [2], ["float32"], tmp_path / "bench.json", steps=1,
                                trace_dir=tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "mine"
    assert not (tmp_path / "bench.json").exists()


def test_fastest_matching_peer_attaches_to_each_row():
    rows = [{"model": "thesis", "image_size": 64, "batch_size": 8, "dtype": d, "images_per_s_no_corruption": v}
            for d, v in (("float32", 10.0), ("bfloat16", 6.0))]
    peers = [{"framework": "torch 2.13.0+cpu", "model": "thesis", "image_size": 64, "batch_size": 8,
              "dtype": "float32", "images_per_s": 8.0, "memory_format": "contiguous"},
             {"framework": "torch 2.13.0+cpu", "model": "thesis", "image_size": 64, "batch_size": 8,
              "dtype": "float32", "images_per_s": 6.0, "memory_format": "channels_last"},
             {"framework": "torch 2.13.0+cpu", "model": "thesis", "image_size": 32, "batch_size": 8,
              "dtype": "bfloat16-autocast", "images_per_s": 3.0}]
    benchmark.attach_peer(rows, peers)
    assert rows[0]["peer_images_per_s"] == 8.0 and rows[0]["speed_vs_peer"] == pytest.approx(1.25)  # the faster
    assert rows[0]["peer"] == "torch 2.13.0+cpu, contiguous"
    assert "peer_images_per_s" not in rows[1]  # no bfloat16 peer at 64 px


def test_peer_needs_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(UserError, match="torch==2.13.0"):
        benchmark.peer_rows(["tiny"], [16], [2], ["float32"], steps=1)


def test_torch_peer_times_the_same_network():
    pytest.importorskip("torch")
    rows = benchmark.peer_rows(["tiny"], [16], [2], ["float32"], steps=2)
    assert [r["memory_format"] for r in rows] == ["contiguous", "channels_last"]
    row = rows[0]
    assert row["model"] == "tiny" and row["image_size"] == 16 and row["dtype"] == "float32"
    ours = unet.count_params(unet.UNet(unet.PRESETS["tiny"], rngs=nnx.Rngs(0)))
    assert row["params"] == ours and row["images_per_s"] == pytest.approx(2 / row["step_s"])
