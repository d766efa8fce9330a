import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mnist_jax import engine, steps
from mnist_jax.config import ModelConfig, TrainConfig
from mnist_jax.train import init_state

SMALL = ModelConfig(conv_features=(8, 8), dense_features=(16,))


def _batch(tiny, n=32):
    return {"image": jnp.asarray(tiny.train.images[:n]), "label": jnp.asarray(tiny.train.labels[:n]),
            "mask": jnp.ones((n,), jnp.float32)}


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_train_step_lowers_the_loss_on_a_fixed_batch(tiny):
    _, state = init_state(ModelConfig(), TrainConfig(seed=0))
    batch = _batch(tiny)

    def loss(state):
        totals, _ = steps.eval_step(state, batch)
        return float(totals["loss_sum"] / totals["count"])

    before = loss(state)
    step = jax.jit(steps.train_step)
    for i in range(40):
        state, _ = step(state, batch)
    assert int(state.step) == 40
    assert loss(state) < 0.75 * before


def test_padded_examples_do_not_change_the_update(tiny):
    """A batch of 20 real examples padded to 32 gives the update of the 20 alone (Keras'
    short last batch)."""
    full = _batch(tiny, 32)
    padded = dict(full, mask=(jnp.arange(32) < 20).astype(jnp.float32))
    short = {k: v[:20] for k, v in full.items()}
    # No dropout, so the two batches draw no differently-shaped masks; plain SGD, so the
    # update is the gradient itself (Adam's first step would hide a wrong scale).
    model_cfg = ModelConfig(conv_features=(8, 8), dense_features=(16,), dropout_rate=0.0)
    _, state = init_state(model_cfg, TrainConfig(seed=0), tx=optax.sgd(1.0))
    s_pad, m_pad = jax.jit(steps.train_step)(state, padded)
    s_short, m_short = jax.jit(steps.train_step)(state, short)
    assert float(m_pad["count"]) == 20.0
    np.testing.assert_allclose(m_pad["loss_sum"], m_short["loss_sum"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s_pad.params), jax.tree.leaves(s_short.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_evaluate_counts_every_example_once(tiny):
    _, state = init_state(SMALL, TrainConfig(seed=0))
    split = engine.to_device(*tiny.test)  # 200 examples, eval batch 64: last batch padded
    totals, predictions = jax.device_get(engine.make_evaluate(64)(state, split))
    assert totals["count"] == 200 and predictions.shape == (200,)
    # The same sums and predictions as one batch holding everything.
    whole = {"image": split.images, "label": split.labels, "mask": jnp.ones((200,), jnp.float32)}
    reference, whole_predictions = jax.device_get(steps.eval_step(state, whole))
    assert totals["correct"] == reference["correct"]
    np.testing.assert_array_equal(predictions, whole_predictions)
    assert totals["correct"] == np.sum(predictions == tiny.test.labels)
    np.testing.assert_allclose(totals["loss_sum"], reference["loss_sum"], rtol=1e-5)


def test_a_split_smaller_than_the_eval_batch_is_one_batch_of_its_size(tiny):
    """Validation of 200 images at eval batch 1000 traces one batch of 200, not 1000 with
    800 masked: a wide model's small validation cost 10x its work. The same totals."""
    _, state = init_state(SMALL, TrainConfig(seed=0))
    split = engine.to_device(*tiny.test)
    shapes = []

    def eval_step(state, batch):
        shapes.append(batch["image"].shape[0])  # at trace time
        return steps.eval_step(state, batch)

    totals, predictions = jax.device_get(engine.make_evaluate(1000, eval_step)(state, split))
    assert set(shapes) == {200} and predictions.shape == (200,) and totals["count"] == 200
    padded, _ = jax.device_get(engine.make_evaluate(64)(state, split))
    assert totals["correct"] == padded["correct"]
    np.testing.assert_allclose(totals["loss_sum"], padded["loss_sum"], rtol=1e-5)


def _two_epochs(tiny, engine_name, seed=0):
    _, state = init_state(SMALL, TrainConfig(seed=seed))
    split = engine.to_device(*tiny.train)
    train_epoch = engine.make_train_epoch(32, engine_name)
    out = []
    for _ in range(2):
        state, totals = train_epoch(state, split)
        out.append(jax.device_get(totals))
    return state, out, train_epoch


@pytest.mark.slow
@pytest.mark.parametrize("engine_name", ["scan", "loop"])
def test_same_seed_same_result_bit_for_bit(tiny, engine_name):
    a, totals_a, _ = _two_epochs(tiny, engine_name)
    b, totals_b, _ = _two_epochs(tiny, engine_name)
    assert _leaves_equal(a.params, b.params) and _leaves_equal(a.opt_state, b.opt_state)
    assert totals_a == totals_b
    assert int(a.step) == 2 * 16  # 500 examples at batch 32: 16 steps, the last padded
    assert totals_a[0]["count"] == 500
    c, _, _ = _two_epochs(tiny, engine_name, seed=1)
    assert not _leaves_equal(a.params, c.params)


@pytest.mark.slow
def test_scan_and_loop_engines_train_the_same(tiny):
    a, totals_a, _ = _two_epochs(tiny, "scan")
    b, totals_b, _ = _two_epochs(tiny, "loop")
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(totals_a[1]["loss_sum"], totals_b[1]["loss_sum"], rtol=1e-4)


@pytest.mark.slow
def test_epochs_shuffle_differently_and_resume_from_the_state_alone(tiny):
    """The epoch's order derives from (rng, epoch): epoch 2 differs from epoch 1, and a
    state carried through a host round trip continues exactly."""
    _, state = init_state(SMALL, TrainConfig(seed=0))
    order1, _ = engine.epoch_order(state, 500, 32)
    later = state.replace(step=state.step + 16)
    order2, _ = engine.epoch_order(later, 500, 32)
    assert not np.array_equal(order1, order2)
    assert sorted(np.asarray(order1).ravel()[:500].tolist()) == list(range(500))

    split = engine.to_device(*tiny.train)
    train_epoch = engine.make_train_epoch(32, "scan")
    s1, _ = train_epoch(state, split)
    s1_host = jax.device_put(jax.device_get(s1))  # as if saved and restored
    s_direct, _ = train_epoch(s1, split)  # donates s1
    s_resumed, _ = train_epoch(s1_host, split)
    assert _leaves_equal(s_direct.params, s_resumed.params)


@pytest.mark.parametrize("engine_name", ["scan", pytest.param("loop", marks=pytest.mark.slow)])
def test_epochs_compile_once(tiny, engine_name):
    _, _, train_epoch = _two_epochs(tiny, engine_name)
    jitted = train_epoch.step_fn
    assert jitted._cache_size() == 1


@pytest.mark.slow
def test_another_loss_swaps_in_without_editing_the_library(tiny):
    def squared_error(logits, labels, params=None):
        return jnp.sum((jax.nn.softmax(logits) - jax.nn.one_hot(labels, 10)) ** 2, -1)

    step = jax.jit(functools.partial(steps.train_step, loss_fn=squared_error))
    _, state = init_state(SMALL, TrainConfig(seed=0))
    batch = _batch(tiny)
    logits = state.apply_fn({"params": state.params}, steps.normalize(batch["image"]),
                            batch["mask"], train=True, rngs={"dropout": steps.step_key(state)})
    _, metrics = step(state, batch)
    np.testing.assert_allclose(metrics["loss_sum"], squared_error(logits, batch["label"]).sum(),
                               rtol=1e-5)
    split = engine.to_device(*tiny.train)
    state, totals = engine.make_train_epoch(32, "scan", step)(state, split)
    assert totals["count"] == 500


def test_auto_engine_avoids_xla_cpu_convolution_inside_scan():
    assert engine.resolve_engine("auto", False, "cpu") == "scan"
    assert engine.resolve_engine("auto", True, "cpu") == "loop"
    assert engine.resolve_engine("auto", True, "gpu") == "scan"
    assert engine.resolve_engine("loop", False, "gpu") == "loop"


def _keras_adam_reference(grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-7):
    """Keras 3's Adam update, step by step in numpy (float64)."""
    w, m, v = 0.0, 0.0, 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        w -= lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
        out.append(w)
    return np.array(out)


def test_adam_matches_keras_epsilon_placement():
    # Tiny gradients make eps matter: here Keras' form and optax.adam's differ by ~2x.
    grads = [1e-6, -2e-6, 5e-7, 1e-6]
    tx = steps.adam(1e-3)
    w = jnp.zeros(())
    opt_state = tx.init(w)
    ours = []
    for g in grads:
        updates, opt_state = tx.update(jnp.asarray(g, jnp.float32), opt_state)
        w = w + updates
        ours.append(float(w))
    np.testing.assert_allclose(ours, _keras_adam_reference(grads), rtol=1e-5)
    plain = optax.adam(1e-3, eps=1e-7)
    first, _ = plain.update(jnp.asarray(grads[0], jnp.float32), plain.init(jnp.zeros(())))
    assert abs(float(first) - ours[0]) > 1e-5  # the difference this test is about is real


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside Keras
def test_adam_matches_keras_itself():
    import keras

    grads = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32) * 1e-3
    var = keras.Variable(np.zeros(3, np.float32))
    opt = keras.optimizers.Adam(1e-3)
    tx = steps.adam(1e-3)
    w = jnp.zeros(3)
    state = tx.init(w)
    for g in grads:
        opt.apply_gradients([(keras.ops.convert_to_tensor(g), var)])
        updates, state = tx.update(jnp.asarray(g), state)
        w = w + updates
    np.testing.assert_allclose(np.asarray(w), keras.ops.convert_to_numpy(var), rtol=1e-4, atol=1e-9)


@pytest.mark.slow
def test_a_batch_larger_than_the_data_is_the_whole_data(tiny):
    _, state = init_state(SMALL, TrainConfig(seed=0))
    split = engine.to_device(*tiny.train)
    state, totals = engine.make_train_epoch(10**9, "scan")(state, split)
    assert int(state.step) == 1 and totals["count"] == 500
