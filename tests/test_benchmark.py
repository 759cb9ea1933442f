import json

import pytest

from mrirecon_jax import benchmark
from mrirecon_jax.config import Config, UserError


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


def test_benchmark_refuses_bad_output_and_bad_combinations(tmp_path):
    cfg = Config(model="tiny")
    with pytest.raises(UserError, match=".json"):
        benchmark.run_benchmark(cfg, ["tiny"], [32], [2], ["float32"], tmp_path / "bench.txt", steps=1)
    with pytest.raises(UserError, match="multiple of"):
        benchmark.run_benchmark(cfg, ["tiny"], [30], [2], ["float32"], tmp_path / "bench.json", steps=1)
    with pytest.raises(UserError, match="dtype"):
        benchmark.run_benchmark(cfg, ["tiny"], [32], [2], ["float16"], tmp_path / "bench.json", steps=1)
    assert not (tmp_path / "bench.json").exists()
