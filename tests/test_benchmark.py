"""benchmarks/: the epoch-speed command in --tiny mode, and the Keras reference model it
times against, built from the project's configs (Keras 3 on JAX here, as conftest sets)."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import epoch_speed, keras_reference
from mnist_jax import data
from mnist_jax.config import ModelConfig, TrainConfig
from mnist_jax.model import count_params
from mnist_jax.steps import PIXEL_SCALE
from mnist_jax.train import init_state

from conftest import REPO

# The benchmark command in a subprocess, and Keras: the full suite only.
pytestmark = pytest.mark.slow


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_benchmark_runs_in_tiny_mode(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("-m", "benchmarks.epoch_speed", "--tiny", "--frameworks", "jax",
                "--variants", "2conv", "--compete", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    found = json.loads(out.read_text())
    assert found["settings"]["competing_processes"] == 1
    assert [row["competing_processes"] for row in found["epochs"]] == [1] * len(found["epochs"])
    result = found["results"]["2conv"]["jax"]
    assert result["num_params"] == 113_386  # the notebook's 2-conv model (Keras' count)
    assert result["timed_backend_compiles"] == 0  # the timed epochs compiled nothing
    assert result["timed_epochs"] >= 1 and "compile_s" in result


@pytest.mark.parametrize("variant, expected", [("2conv", 113_386), ("3conv", 37_674)])
def test_keras_reference_has_the_notebooks_parameter_counts(variant, expected):
    """The benchmark's variants, otherwise the default ModelConfig, counted by Keras."""
    model = keras_reference.build_model(epoch_speed.VARIANTS[variant], TrainConfig())
    assert model.count_params() == expected


@pytest.mark.parametrize("model_config", [
    ModelConfig(conv_features=(8, 16), dense_features=(64,), dropout_rate=0.3),
    ModelConfig(conv_features=(4, 6), kernel_size=5, pool_size=3, dense_features=(24, 12),
                dropout_rate=0.2, num_classes=5, image_shape=(30, 30, 3)),
], ids=["conv8-16-dense64", "every-field"])
def test_keras_reference_follows_the_model_config(model_config):
    """A non-default ModelConfig gives the Keras model of the project's Flax model: the same
    parameter count and the same weight shapes, and its dropout rate."""
    train_config = TrainConfig(learning_rate=3e-4)
    model = keras_reference.build_model(model_config, train_config)
    # The project's initial train state, by shape only (jax.eval_shape: no XLA compiles).
    state = jax.eval_shape(lambda: init_state(model_config, train_config)[1])
    assert model.count_params() == count_params(state.params)
    keras_shapes = sorted(tuple(w.shape) for w in model.weights)
    assert keras_shapes == sorted(tuple(p.shape) for p in jax.tree.leaves(state.params))
    assert tuple(model.input_shape[1:]) == model_config.image_shape
    assert tuple(model.output_shape[1:]) == (model_config.num_classes,)
    assert [layer.rate for layer in model.layers if hasattr(layer, "rate")] == (
        [model_config.dropout_rate] * len(model_config.dense_features))
    # The optimizer: TrainConfig's learning rate, Keras' epsilon (the project's steps.adam).
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(3e-4)
    assert model.optimizer.epsilon == 1e-7


def test_keras_reference_scales_pixels_as_the_project():
    images = np.array([0, 51, 255], np.uint8).reshape(3, 1, 1, 1)
    x, y = keras_reference.to_arrays((images, np.arange(3, dtype=np.int32)))
    assert x.dtype == np.float32 and np.array_equal(y, [0, 1, 2])
    np.testing.assert_array_equal(x.ravel(), np.array([0, 51, 255], np.float32) / PIXEL_SCALE)
    assert x.max() == 1.0


def test_benchmark_times_the_keras_reference():
    """The benchmark's Keras side end to end on a few synthetic images, in this process
    (Keras on JAX: TensorFlow, the command's own backend, is not a test dependency)."""
    import keras

    args = epoch_speed.parse_args(["--tiny", "--frameworks", "keras", "--variants", "2conv",
                                   "--epochs", "1", "--batch-size", "16"])
    dataset = data.synthetic(num_train=64, num_test=32)
    summary, epochs = epoch_speed.run_benchmark(args, dataset, keras)
    result = summary["2conv"]["keras"]
    assert result["num_params"] == 113_386 and result["timed_epochs"] == 1
    assert [(r["phase"], r["framework"]) for r in epochs] == [("warmup", "keras"),
                                                              ("timed", "keras")]
    for row in epochs:
        assert row["seconds"] > 0 and all(np.isfinite(row[k]) for k in (
            "train_loss", "train_accuracy", "val_loss", "val_accuracy"))
    assert keras_reference.validation_batch_size(epoch_speed.train_config(args)) == 16


def test_keras_reference_imports_keras_only_when_used():
    code = ("import sys, benchmarks.keras_reference, benchmarks.epoch_speed; "
            "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules")
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr


def test_benchmark_times_the_epoch_modes_side_by_side():
    """--conv adds a model of those widths, --train-limit takes the first images, and
    --epoch-mode times fit()'s chunked epoch, one call and the former single scan in one
    run: the same epochs (every mode trains the same bits), each with its training time."""
    args = epoch_speed.parse_args(["--tiny", "--frameworks", "jax", "--conv", "4,6",
                                   "--train-limit", "96", "--epoch-mode",
                                   "chunked,one-call,scan", "--epochs", "1"])
    assert args.variants == ("conv4-6",)  # no default variants beside a --conv one
    dataset = epoch_speed.limited(data.synthetic(num_train=640, num_test=320), 96)
    assert [len(a.labels) for a in dataset] == [96, 16]  # as make_splits' limit
    summary, epochs = epoch_speed.run_benchmark(args, dataset, None)
    result = summary["conv4-6"]
    assert [c for c in result if isinstance(result[c], dict)] == ["jax", "jax-1call", "jax-scan"]
    state = jax.eval_shape(lambda: init_state(ModelConfig(conv_features=(4, 6)), TrainConfig())[1])
    assert result["jax-scan"]["num_params"] == count_params(state.params)
    for mode in ("jax-1call", "jax-scan"):
        assert result[mode]["train_ratio_over_jax"] > 0 and result[mode]["ratio_over_jax"] > 0
    for phase, round_ in (("warmup", 0), ("timed", 1)):
        rows = [r for r in epochs if (r["phase"], r["round"]) == (phase, round_)]
        assert len(rows) == 3
        for row in rows:
            assert 0 < row["train_seconds"] <= row["seconds"]
            for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
                assert row[key] == rows[0][key], (phase, row["framework"], key)


def test_benchmark_refuses_an_unknown_epoch_mode(capsys):
    with pytest.raises(SystemExit):
        epoch_speed.parse_args(["--tiny", "--epoch-mode", "chunked,fori"])
    assert "epoch modes must be a comma-separated subset of chunked,one-call,scan" in (
        capsys.readouterr().err)


def test_the_roofline_counts_the_steps_flops_and_times_every_listed_op(tmp_path):
    out = tmp_path / "roofline.json"
    proc = _run("-m", "benchmarks.roofline", "--variants", "2conv", "--steps", "2",
                "--repeats", "1", "--top", "5", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    found = json.loads(out.read_text())
    step = found["variants"][0]
    # A training step of batch 32 is about 3x the forward pass (the backward pass's two
    # matmuls per layer; conv0's input gradient is not needed), plus elementwise work:
    # 3 x 32 x 2.44 MFLOP (the model's own count) = 234 MFLOP.
    forward = ModelConfig(conv_features=(32, 32)).forward_flops
    assert step["flops_per_step"] == pytest.approx(3 * 32 * forward, rel=0.03)
    assert step["flops_per_step"] == pytest.approx(step["xla_cost_analysis"]["flops"], rel=0.01)
    assert all(op["seconds"] > 0 and op["bytes"] > 0 for op in step["ops"])
    assert found["floors"]["matmul_gflops"] > 0 and found["floors"]["memory_gbs"] > 0
    assert "| " in proc.stdout  # the markdown table
