"""The extension examples (experiments/examples.py) on tiny data: each trains through fit()
without editing mnist_jax/, and its run records and does what it says."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import examples
from mnist_jax import data, records, steps
from mnist_jax.config import TrainConfig
from mnist_jax.errors import UserError
from mnist_jax.train import fit

# Every example trains through fit(): the full suite only.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def splits():
    """The notebook's protocol on synthetic data: 200 train, 100 val = test."""
    return data.make_splits(data.synthetic(num_train=200, num_test=100, seed=0), "test")


def _config(out):
    return json.loads((out / records.CONFIG_FILE).read_text())


def _logits(state, images, train=False):
    """One seed's logits by the model's own apply, with every collection it has."""
    return state.apply_fn({"params": state.params, **state.model_state},
                          steps.normalize(jnp.asarray(images)), None, train=train)


ONE_EPOCH = TrainConfig(epochs=1)


@pytest.mark.parametrize("example", sorted(examples.EXAMPLES))
def test_every_example_trains_and_records_what_ran(example, splits, tmp_path):
    out = tmp_path / example
    result = examples.fit_example(example, ONE_EPOCH, splits, out, log=lambda line: None)
    row = result.history[0]
    assert np.isfinite(row["train_loss"]) and 0.0 <= row["val_accuracy"] <= 1.0
    config = _config(out)
    state = jax.tree.map(lambda x: x[0], result.states)
    expected = {
        "label_smoothing": lambda: (
            config["loss"] == "experiments.examples.smoothed_cross_entropy"
            and config["optimizer"]["name"].startswith("sgd, momentum 0.9")
            and config["optimizer"]["hyperparams"] == {"learning_rate": 0.05, "momentum": 0.9}
            and config["train"]["learning_rate"] is None),  # the given tx ran, not Adam
        "random_shift": lambda: (
            config["batch_transform"] == "experiments.examples.random_shift"),
        "batch_norm": lambda: (
            config["model"]["class"] == "experiments.examples.BatchNormCNN"
            and config["model"]["collections"] == ["params", "batch_stats"]
            and config["model"]["forward_flops_per_image"] == "unknown"),
        "l2_in_loss": lambda: config["loss"] == "experiments.examples.l2_cross_entropy",
        "adamw": lambda: (config["optimizer"]["name"] == "adamw(0.001, weight_decay=1e-4)"
                          and "ScaleByAdamState" in config["optimizer"]["state"]),
        "nnx_mlp": lambda: (
            config["model"]["class"].endswith("ToLinen")
            and config["model"]["fields"]["nnx_class"].endswith("NNXMLP")
            and config["model"]["num_params"] == 784 * 128 + 128 + 128 * 10 + 10),
    }[example]
    assert expected(), config
    if example != "label_smoothing":
        assert config["optimizer"]["name"] != "adam" or config["loss"].endswith("cross_entropy")
    if example == "label_smoothing":  # validation reports the loss that trained
        logits = _logits(state, splits.val.images)
        smoothed = examples.smoothed_cross_entropy(logits, jnp.asarray(splits.val.labels))
        plain = steps.cross_entropy(logits, jnp.asarray(splits.val.labels))
        np.testing.assert_allclose(row["val_loss"], float(smoothed.mean()), rtol=1e-5)
        np.testing.assert_allclose(row["val_cross_entropy"], float(plain.mean()), rtol=1e-5)
        assert abs(row["val_loss"] - row["val_cross_entropy"]) > 1e-3
    if example == "l2_in_loss":  # the penalty is part of the loss, not of cross-entropy
        kernels = [p for path, p in jax.tree_util.tree_leaves_with_path(state.params)
                   if "kernel" in jax.tree_util.keystr(path)]
        penalty = 0.5 * examples.L2_WEIGHT * sum(float(jnp.sum(k ** 2)) for k in kernels)
        np.testing.assert_allclose(row["val_loss"] - row["val_cross_entropy"], penalty,
                                   rtol=1e-3)


def test_random_shift_moves_images_by_at_most_two_pixels():
    image = np.zeros((1, 28, 28, 1), np.uint8)
    image[0, 10, 12, 0] = 255
    batch = {"image": jnp.asarray(np.repeat(image, 64, 0)), "label": jnp.zeros(64, jnp.int32),
             "mask": jnp.ones(64)}
    shifted = np.asarray(examples.random_shift(batch, jax.random.PRNGKey(0))["image"])
    where = np.argwhere(shifted[..., 0] == 255)  # one bright pixel per image, moved
    assert len(where) == 64
    assert np.abs(where[:, 1] - 10).max() == 2 and np.abs(where[:, 2] - 12).max() == 2
    assert len({tuple(w[1:]) for w in where}) > 10  # per-image shifts, not one for all
    again = examples.random_shift(batch, jax.random.PRNGKey(0))["image"]
    assert np.array_equal(shifted, again)


def test_batch_statistics_leave_the_padding_out():
    """A batch of 20 real images padded to 32 gives the running statistics of the 20."""
    model = examples.BatchNormCNN(conv_features=(4,), dense_features=8)
    images = jax.random.uniform(jax.random.PRNGKey(0), (32, 28, 28, 1))
    variables = model.init(jax.random.PRNGKey(1), images[:1], train=False)
    mask = (jnp.arange(32) < 20).astype(jnp.float32)
    rngs = {"dropout": jax.random.PRNGKey(2)}
    _, padded = model.apply(variables, images.at[20:].set(9.0), train=True, mask=mask,
                            rngs=rngs, mutable=["batch_stats"])
    _, real = model.apply(variables, images[:20], train=True, mask=jnp.ones(20), rngs=rngs,
                          mutable=["batch_stats"])
    for a, b in zip(jax.tree.leaves(padded), jax.tree.leaves(real)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class Stop(Exception):
    """Ends a run after an epoch is on disk, as a kill would."""


def _stop_after(epoch: int):
    def log(line):
        if f"epoch {epoch}/" in line:
            raise Stop
    return log


def test_batch_norm_resumes_bit_for_bit_and_evaluates_with_its_statistics(splits, tmp_path):
    model, cfg = examples.BatchNormCNN(conv_features=(8,), dense_features=16), TrainConfig(
        epochs=3, seeds=2, patience=5)
    whole = fit(model, cfg, splits, tmp_path / "whole", log=lambda line: None)
    with pytest.raises(Stop):
        fit(model, cfg, splits, tmp_path / "cut", log=_stop_after(1))
    resumed = fit(model, cfg, splits, tmp_path / "cut", resume=True, log=lambda line: None)
    # (The optimizer is a static field, a new function object per run: compare the arrays.)
    assert len(jax.tree.leaves(whole.states)) == len(jax.tree.leaves(resumed.states))
    for a, b in zip(jax.tree.leaves(whole.states), jax.tree.leaves(resumed.states)):
        np.testing.assert_array_equal(a, b)
    assert [r["val_loss"] for r in whole.history] == [r["val_loss"] for r in resumed.history]
    stats = whole.states.model_state["batch_stats"]
    assert not np.allclose(jax.tree.leaves(stats)[0], 0.0)  # trained, not the initial zeros
    for i, seed in enumerate(whole.seeds):  # the test figure used the running statistics
        state = jax.tree.map(lambda x: x[i], whole.states)
        logits = _logits(state, splits.test.images)
        loss = steps.cross_entropy(logits, jnp.asarray(splits.test.labels)).mean()
        np.testing.assert_allclose(seed.test["test_loss"], float(loss), rtol=1e-5)
        fresh = state.replace(model_state=jax.tree.map(jnp.zeros_like, state.model_state))
        assert not np.allclose(_logits(fresh, splits.test.images[:8]), logits[:8])


def test_an_extra_metric_of_the_step_is_a_history_column(splits, tmp_path):
    def step(state, batch):  # also counts the examples of class 0
        state, metrics = steps.train_step(state, batch)
        return state, {**metrics, "zeros_sum": jnp.sum((batch["label"] == 0) * batch["mask"])}

    fit(examples.BatchNormCNN(conv_features=(4,), dense_features=8), ONE_EPOCH, splits,
        tmp_path / "run", train_step=step, log=lambda line: None)
    row = records.read_history(tmp_path / "run" / records.HISTORY_FILE)[0]
    assert row["train_zeros"] == pytest.approx(np.mean(splits.train.labels == 0))


def test_resume_with_another_optimizer_or_loss_is_refused(splits, tmp_path):
    model = nn.Sequential([lambda x, train: x.reshape(x.shape[0], -1), nn.Dense(10)])
    with pytest.raises(Stop):
        fit(model, TrainConfig(epochs=2), splits, tmp_path / "run", log=_stop_after(1))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    for change, word in [({"tx": optax.sgd(0.1), "tx_name": "sgd"}, "optimizer"),
                         ({"loss_fn": examples.smoothed_cross_entropy}, "loss")]:
        with pytest.raises(UserError, match=f"other settings.*{word}"):
            fit(model, TrainConfig(epochs=2), splits, tmp_path / "run", resume=True,
                log=lambda line: None, **change)
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert after == before


def test_batch_statistics_follow_every_seed_layout(splits):
    """The vmap and map layouts carry batch statistics as the sequential one does. Batched
    and single-seed matmuls round differently, and Adam turns a rounding-level gradient
    (a bias with next to no gradient) into a step of about the learning rate, so parameters
    agree to 1e-3 absolute after an epoch, losses to 1e-4 relative, statistics to 1e-5."""
    model = examples.BatchNormCNN(conv_features=(8,), dense_features=16)
    results = {layout: fit(model, TrainConfig(epochs=1, seeds=2, engine="scan", layout=layout),
                           splits, None, log=lambda line: None)
               for layout in ("sequential", "vmap", "map")}
    reference = results.pop("sequential")
    for layout, result in results.items():
        np.testing.assert_allclose([r["val_loss"] for r in result.history],
                                   [r["val_loss"] for r in reference.history], rtol=1e-4)
        for a, b in zip(jax.tree.leaves(reference.states.model_state),
                        jax.tree.leaves(result.states.model_state)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=layout)
        for a, b in zip(jax.tree.leaves(reference.states.params),
                        jax.tree.leaves(result.states.params)):
            np.testing.assert_allclose(a, b, atol=1e-3, err_msg=layout)
