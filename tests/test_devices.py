"""Seeds and batches over several devices (engine.Placement): CPU devices forced with
XLA's flag, which must be set before JAX starts, so each check runs in a subprocess.

Tolerances: spread over devices, XLA partitions the vmapped program so that each device
runs its own seeds' matmuls (one seed's instead of a batch of four), and data parallelism
sums each batch's gradient in parts; float32 sums in another order agree to rounding, not
bit for bit (rtol 1e-5 on losses, atol 1e-6 on parameters, as the vmap-against-sequential
test in test_seeds.py)."""

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

FORCE_4 = "--xla_force_host_platform_device_count=4"


def _run(code: str, *args, timeout=900):
    env_code = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = {FORCE_4!r}
    """) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", env_code, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


SEEDS_AND_DATA = """
    import json, sys
    from pathlib import Path
    import jax, numpy as np
    from mnist_jax import data, records, train
    from mnist_jax.config import ModelConfig, TrainConfig
    assert len(jax.devices()) == 4
    splits = data.make_splits(data.synthetic(num_train=200, num_test=100, seed=0), "test")
    model = ModelConfig(conv_features=(8, 8), dense_features=(16,), dropout_rate=0.1)
    out = Path(sys.argv[1])
    def fit(name, **kw):
        return train.fit(model, TrainConfig(epochs=2, **kw), splits, out / name,
                         log=lambda line: None)
    def same(a, b):
        losses = [[r[k] for r in x.history] for x in (a, b) for k in ("val_loss",)]
        np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
        assert [r["seed"] for r in a.history] == [r["seed"] for r in b.history]
        for x, y in zip(jax.tree.leaves(a.states.params), jax.tree.leaves(b.states.params)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        for x, y in zip(a.seeds, b.seeds):
            np.testing.assert_allclose(x.test["test_loss"], y.test["test_loss"], rtol=1e-5)
            assert x.test["test_accuracy"] == y.test["test_accuracy"]
    # 3 seeds on a seeds axis of 4: padded with an inactive seed, never recorded
    same(fit("one3", seeds=3, devices=1, layout="vmap"), fit("four3", seeds=3, devices=4))
    run = out / "four3"
    assert sorted({r["seed"] for r in records.read_history(run / records.HISTORY_FILE)}) == [0, 1, 2]
    assert [s["seed"] for s in records.read_json(run / records.RESULT_FILE)["seeds"]] == [0, 1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest", "seed_0", "seed_1", "seed_2"]
    assert np.load(run / records.PREDICTIONS_FILE)["predictions"].shape == (3, 100)
    config = records.read_json(run / records.CONFIG_FILE)
    assert config["placement"] == {"devices": 4, "device_kind": "cpu", "processes": 1,
                                   "mesh": {"seeds": 4, "data": 1}, "padded_seeds": 1}
    assert config["train"]["layout"] == "vmap"
    # data parallel: the same training as one device with the same global batch
    same(fit("dp1", seeds=1, devices=1, layout="vmap"), fit("dp4", seeds=1, data_parallel=4))
    assert records.read_json(out / "dp4" / records.CONFIG_FILE)["placement"]["mesh"] == {
        "seeds": 1, "data": 4}
    print("ok")
"""


def test_seeds_and_batches_over_four_devices_train_as_one(tmp_path):
    proc = _run(SEEDS_AND_DATA, str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


BAD_FLAGS = """
    import contextlib, io, json, sys
    from mnist_jax import train
    common, cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    results = []
    for flags in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = train.main(common + flags)
        results.append([status, err.getvalue()])
    print(json.dumps(results))
"""

CASES = [
    (["--batch-size", "30", "--data-parallel", "4"],
     "error: a batch of 30 cannot be split evenly over a data axis of 4 devices"),
    (["--devices", "8"], "error: 8 devices asked for, but the cpu backend has 4"),
    (["--devices", "4", "--data-parallel", "3", "--batch-size", "33"],
     "error: a data axis of 3 does not divide 4 devices"),
    (["--devices", "4", "--layout", "sequential"],
     "error: the sequential layout runs on one device"),
]


def test_a_placement_that_cannot_work_is_one_line_before_the_data_is_read(tmp_path):
    """Refused before the data is loaded or anything compiled: the data folder named here
    does not exist, and its error would come first otherwise."""
    common = ["--data-dir", str(tmp_path / "no-data-here"), "--train-limit", "120",
              "--epochs", "1", "--seeds", "1", "--out", str(tmp_path / "run")]
    proc = _run(BAD_FLAGS, json.dumps(common), json.dumps([flags for flags, _ in CASES]),
                timeout=300)
    assert proc.returncode == 0, proc.stderr
    for (flags, message), (status, stderr) in zip(CASES, json.loads(proc.stdout.splitlines()[-1])):
        assert status == 2, (flags, stderr)
        assert stderr.startswith(message) and stderr.count("\n") == 1, (flags, stderr)
    assert not (tmp_path / "run").exists()
