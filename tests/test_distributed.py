"""Data parallelism over devices and processes: four forced CPU devices against one, and two processes on this
machine (jax.distributed on localhost, gloo collectives) that train, checkpoint and resume as one run.

Each check runs in child processes (device counts and the distributed runtime are fixed when JAX starts), one
child per scenario so each pays JAX's start once; the tests assert on what the children report.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, TEST_XLA_FLAGS, cli, error_line
from mrirecon_jax import benchmark, distributed
from mrirecon_jax.config import UserError

TINY = dict(model="tiny", image_size=16, slices=2, slab_mm=None, batch_size=4, corruptions="patch",
            learning_rate=3e-3, eval_batch_size=8)


def _python(code: str, *args, env=None, **popen):
    """A child Python running `code` on CPU from the checkout's root (its stdout's last line is its report)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _report(child, timeout=240) -> dict:
    out, err = child.communicate(timeout=timeout)
    assert child.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


FOUR_DEVICES = """
    import json, sys, tempfile
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mrirecon_jax import train
    from mrirecon_jax.config import Config, UserError

    cfg = Config(**json.loads(sys.argv[1]))
    images = np.random.default_rng(0).random((4, 16, 16, 1), np.float32)
    out = {"devices": jax.device_count()}
    params = {}
    for n in (1, 4):  # the same step, state and batch on one device and sharded over four
        mesh = train.make_mesh(jax.devices()[:n])
        graphdef, tx, state = train.init_train_state(cfg, mesh)
        step = train.make_train_step(cfg, graphdef, tx, train.parse_policy(cfg.corruptions))
        batch = train.global_batch(images, NamedSharding(mesh, P("data")))
        out[f"shards_{n}"] = len({shard.device for shard in batch.addressable_shards})
        out[f"losses_{n}"] = []
        for _ in range(2):
            state, loss = step(state, batch)
            out[f"losses_{n}"].append(float(loss))
        params[n] = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
        eval_step = train.make_eval_step(graphdef, train.parse_policy(cfg.corruptions), cfg.seed, cfg.nonnegative)
        summary, _ = train.evaluate_slices(eval_step, state["params"], np.concatenate([images] * 3)[:10], 6, mesh)
        out[f"eval_{n}"] = summary["ssim_slice"]
    out["max_param_difference"] = max(float(np.max(np.abs(a - b))) for a, b in zip(params[1], params[4]))
    try:
        train.train_and_evaluate(cfg.replace(batch_size=6), tempfile.mkdtemp())
    except UserError as err:
        out["refusal"] = str(err)
    print(json.dumps(out))
"""


def test_four_devices_train_and_evaluate_like_one_and_refuse_an_uneven_batch():
    four = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=4"
    child = _python(FOUR_DEVICES, json.dumps(TINY), env={"XLA_FLAGS": four})
    out = _report(child)
    assert out["devices"] == 4 and out["shards_1"] == 1 and out["shards_4"] == 4
    assert out["losses_4"] == pytest.approx(out["losses_1"], rel=1e-5)
    assert out["losses_1"][1] != out["losses_1"][0]  # the step changed the parameters
    assert out["max_param_difference"] < 1e-5
    assert out["eval_4"] == pytest.approx(out["eval_1"], rel=1e-6)
    assert out["refusal"] == "--batch_size=6 must be a multiple of the 4 devices."


TWO_PROCESSES = """
    import json, shutil, sys
    from jax.experimental import multihost_utils
    from mrirecon_jax import distributed, train
    from mrirecon_jax.config import Config

    process, port, root, tiny = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    distributed.initialize(distributed.Launch(f"localhost:{port}", 2, process, timeout_s=60))
    cfg = Config(**tiny, cache_dir=f"{root}/cache")
    straight = train.train_and_evaluate(cfg.replace(checkpoint_every_steps=2), f"{root}/run")
    if process == 0:  # back to the checkpoint at step 2, as if the run had stopped there
        shutil.rmtree(f"{root}/run/checkpoints/3")
    multihost_utils.sync_global_devices("rewound")
    resumed = train.train_and_evaluate(cfg, f"{root}/run")
    distributed.shutdown()
    print(json.dumps({"straight": straight, "resumed": resumed}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_as_one_run_write_once_and_resume_exactly(tmp_path):
    """Two processes, each with its share of the subjects, feed one global batch: they agree on every number,
    process 0 alone writes the records, and a run resumed from its step-2 checkpoint ends as the straight run."""
    port = _free_port()
    tiny = json.dumps({**TINY, "epochs": 1, "max_steps": 3})
    children = [_python(TWO_PROCESSES, i, port, tmp_path, tiny) for i in (0, 1)]
    reports = [_report(child) for child in children]
    timeless = [{name: {k: v for k, v in record.items() if k != "wall_time_s"} for name, record in report.items()}
                for report in reports]
    assert timeless[0] == timeless[1]  # the same loss and metrics on both processes
    straight, resumed = timeless[0]["straight"], timeless[0]["resumed"]
    assert straight["step"] == resumed["step"] == 3 and straight["device"].endswith(" in 2 processes")
    assert straight["device"].startswith("2 x ")
    for name in ("ssim_slice", "ssim_patch", "psnr_slice", "mse_slice", "train_loss"):
        assert resumed[name] == pytest.approx(straight[name], rel=1e-6, abs=1e-7), name
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Process 1 wrote no record, and the resumed run replaced the straight run's line after its checkpoint.
    assert [r["step"] for r in records] == [3]
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == ["2", "3"]
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["train_slices_per_process"]) == 2
    assert split["n_train_slices"] == sum(split["train_slices_per_process"]) == 2 * len(split["train_subjects"])
    assert not set(split["train_subjects"]) & set(split["val_subjects"])


def test_a_partial_launch_is_refused_in_one_sentence():
    code, _, err = cli("--mode=train", "--num_processes=2", "--process_id=0")
    assert "--coordinator_address, --num_processes and --process_id" in error_line(code, err)
    code, _, err = cli("--mode=list", "--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2")
    assert "--process_id=2 must be between 0" in error_line(code, err)
    code, _, err = cli("--mode=reconstruct", "--distributed")
    assert "runs in one process" in error_line(code, err)


def test_process_shares_are_disjoint_and_cover_every_subject():
    subjects = [f"s{i}" for i in range(7)]
    shares = [distributed.process_share(subjects, i, 3) for i in range(3)]
    assert sorted(s for share in shares for s in share) == subjects and [len(s) for s in shares] == [3, 2, 2]
    with pytest.raises(UserError, match="7 training subjects cannot be shared among 8 processes"):
        distributed.process_share(subjects, 0, 8)


def test_launcher_of_several_tasks_starts_the_runtime(monkeypatch):
    for name in distributed.LAUNCHER_TASKS_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.Launch().starts_runtime()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert distributed.Launch().starts_runtime() and not distributed.Launch(detect=False).starts_runtime()
    assert distributed.Launch("host:1234", 2, 1).starts_runtime()


def test_scaling_efficiency_is_against_the_same_per_device_batch_on_one_device():
    assert benchmark.device_counts(1) == [1] and benchmark.device_counts(6) == [1, 2, 4, 6]
    rows = [{"model": "tiny", "image_size": 32, "dtype": "float32", "n_devices": n, "batch_size": 2 * n,
             "images_per_s": rate} for n, rate in ((1, 100.0), (2, 150.0), (4, 320.0))]
    benchmark.add_scaling(rows)
    assert [r["scaling_efficiency"] for r in rows] == pytest.approx([1.0, 0.75, 0.8])
