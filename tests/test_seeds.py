"""Several seeds in one run: each seed is the one-seed run with its seed, and each stops
where Keras' EarlyStopping would, frozen from then on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax import data, engine
from mnist_jax.config import ModelConfig, TrainConfig
from mnist_jax.train import build_run, fit, run_epoch

SMALL = ModelConfig(conv_features=(8, 8), dense_features=(32,), dropout_rate=0.1)


def _epochs(tiny, seed, seeds, layout, epochs=2):
    run = build_run(SMALL, TrainConfig(seed=seed, seeds=seeds, layout=layout))
    train, val = engine.to_device(*tiny.train), engine.to_device(*tiny.test)
    states, history = run.states, []
    for _ in range(epochs):
        states, train_totals, val_totals = run_epoch(run.epochs, states, train, val,
                                                     [True] * seeds)
        history.append((train_totals, val_totals))
    return states, history


@pytest.mark.slow
@pytest.mark.parametrize("layout, exact", [("sequential", True), ("vmap", False), ("map", False)])
def test_seed_i_of_a_k_seed_run_is_the_one_seed_run_with_seed_i(tiny, layout, exact):
    """Sequential: bit for bit (the same compiled program). vmap: XLA batches the seeds'
    matmuls, which may sum in another order; map: another program, fused differently:
    equal to float32 rounding (rtol 1e-5 after two epochs, 32 steps)."""
    states, history = _epochs(tiny, seed=5, seeds=3, layout=layout)
    for i in range(3):
        one, one_history = _epochs(tiny, seed=5 + i, seeds=1, layout="sequential")
        mine = engine.seed_slice(states, i)
        for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(engine.seed_slice(one, 0))):
            if exact:
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for (t, v), (t1, v1) in zip(history, one_history):
            for key in ("loss_sum", "correct", "count"):
                for got, want in ((t[key][i], t1[key][0]), (v[key][i], v1[key][0])):
                    assert got == want if exact else got == pytest.approx(want, rel=1e-5)
    assert not np.array_equal(states.params["conv0"]["kernel"][0],
                              states.params["conv0"]["kernel"][1])  # seeds differ


@pytest.mark.slow
@pytest.mark.parametrize("layout, engine_", [("sequential", "scan"), ("vmap", "scan"),
                                             ("map", "scan"), ("sequential", "loop")])
def test_an_epoch_in_chunks_is_the_epoch_in_one_call(tiny, layout, engine_):
    """Progress bars and interrupts split the epoch into calls of one compiled loop (or of
    the loop engine's step); the split must not change a bit: the same steps, keys and
    order (16 steps in 1 or 5 uneven chunks, and one chunk per step), every chunk reported
    once, in order."""
    train, val = engine.to_device(*tiny.train), engine.to_device(*tiny.test)
    results = {}
    for chunks in (1, 5, 16):
        run = build_run(SMALL, TrainConfig(seed=3, seeds=2, layout=layout, engine=engine_,
                                           epoch_chunks=chunks))
        reported = []
        states, totals, _ = run_epoch(run.epochs, run.states, train, val, [True, True],
                                      on_chunk=reported.append)
        assert sum(reported) == 2 * 16 and len(reported) == chunks * (
            2 if layout == "sequential" else 1)
        results[chunks] = (jax.device_get(states), totals)
    for chunks in (5, 16):
        for a, b in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[chunks])):
            np.testing.assert_array_equal(a, b)
    if layout != "sequential" or engine_ != "scan":
        return  # vmap and map equal one seed to float32 rounding only (the test above);
        # the loop engine's epoch is checked against the scan engine's in test_steps
    # ...and the pure whole epoch, engine.scan_epoch, computes the same (seed 0 here).
    state = build_run(SMALL, TrainConfig(seed=3)).states
    whole, _ = jax.jit(engine.scan_epoch(32))(engine.seed_slice(state, 0), train)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(engine.seed_slice(results[1][0], 0))):
        np.testing.assert_array_equal(a, b)


# The quick tier (-m "not slow") keeps the CPU default, sequential seeds on the scan engine.
@pytest.mark.parametrize("layout, engine_", [
    ("sequential", "scan"), pytest.param("vmap", "scan", marks=pytest.mark.slow),
    pytest.param("map", "scan", marks=pytest.mark.slow),
    pytest.param("sequential", "loop", marks=pytest.mark.slow)])
def test_epochs_after_the_first_compile_nothing(tiny, layout, engine_):
    """fit()'s epoch (train chunks, validation, keeping the best) compiles in epoch 1 only;
    later epochs, one with a seed stopped, reuse the programs (no retrace per epoch)."""
    compiles = []

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    run = build_run(SMALL, TrainConfig(seed=0, seeds=2, layout=layout, engine=engine_,
                                       epoch_chunks=3))
    train, val = engine.to_device(*tiny.train), engine.to_device(*tiny.test)
    states, best = run.states, jax.tree.map(jnp.copy, run.states)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        for epoch, active in enumerate(([True, True], [True, True], [True, False]), start=1):
            if epoch == 2:
                compiles.clear()
            states, _, _ = run_epoch(run.epochs, states, train, val, active,
                                     on_chunk=lambda steps: None)
            best = run.epochs.keep_best(best, states, jnp.asarray([epoch == 2, active[1]]))
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert compiles == []


def _keras_stop_epoch(values, patience):
    """Keras 3's rule, written out: the first epoch always improves; a strict improvement
    resets the wait; stop at the end of the epoch where the wait reaches patience."""
    best, wait = -np.inf, 0
    for epoch, value in enumerate(values, start=1):
        if value > best:
            best, wait = value, 0
        else:
            wait += 1
            if wait >= patience and epoch > 1:
                return epoch
    return None


@pytest.mark.parametrize("layout", ["sequential", pytest.param("vmap", marks=pytest.mark.slow),
                                    pytest.param("map", marks=pytest.mark.slow)])
def test_each_seed_stops_where_keras_would_and_stays_frozen(tiny, layout):
    splits = data.make_splits(tiny, "test")
    # On val_loss: the synthetic data's accuracy reaches 1.0 in the same epoch for every
    # seed, its loss does not, so the seeds stop at different epochs.
    cfg = TrainConfig(seed=0, seeds=3, layout=layout, epochs=12, patience=1,
                      learning_rate=1e-2, monitor="val_loss", restore_best_weights=False)
    result = fit(SMALL, cfg, splits, None, log=lambda line: None)
    stops = []
    for i, seed in enumerate(result.seeds):
        rows = [r for r in result.history if r["seed"] == seed.seed]
        values = [-r["val_loss"] for r in rows]  # a loss falls: the rule for a rising value
        assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
        assert seed.early_stopping.stopped_epoch == _keras_stop_epoch(values, 1)
        assert seed.epochs_run == len(rows)
        # Not trained after it stopped: its final state has exactly its own epochs' steps.
        assert int(result.states.step[i]) == seed.epochs_run * 16
        stops.append(seed.epochs_run)
    assert len(set(stops)) > 1, stops  # else no seed was ever frozen while others trained
    assert max(stops) == max(r["epoch"] for r in result.history)  # ran until the last stopped
