"""Early stopping against sequences worked by hand with Keras 3's rules (see the module
docstring of mnist_jax.early_stopping), and against Keras itself (in the test extra)."""

import random

import pytest

from mnist_jax.early_stopping import EarlyStopping


def run(values, **kwargs):
    es = EarlyStopping(**kwargs)
    epochs_run = 0
    for epoch, value in enumerate(values, start=1):
        es = es.update(epoch, value)
        epochs_run = epoch
        if es.should_stop:
            break
    return es, epochs_run


def test_notebook_3conv_pattern_best_11_stops_16():
    values = [0.950, 0.960, 0.970, 0.975, 0.980, 0.981, 0.982, 0.983, 0.984, 0.985, 0.9894,
              0.988, 0.9894, 0.987, 0.986, 0.985, 0.999, 0.999, 0.999, 0.999]
    es, epochs_run = run(values, mode="max", patience=5)
    assert (es.best_epoch, es.stopped_epoch, epochs_run) == (11, 16, 16)
    assert es.best == 0.9894  # the tie at epoch 13 does not count: strict improvement


def test_notebook_2conv_pattern_best_16_runs_all_20():
    values = [0.97 + 0.001 * i for i in range(16)] + [0.98, 0.982, 0.984, 0.983]
    es, epochs_run = run(values, mode="max", patience=5)
    assert (es.best_epoch, es.stopped_epoch, epochs_run) == (16, None, 20)
    assert es.wait == 4


def test_patience_zero_stops_at_the_first_non_improvement_but_never_after_epoch_one():
    assert run([0.5, 0.4, 0.6], mode="max", patience=0)[0].stopped_epoch == 2
    es, _ = run([0.5], mode="max", patience=0)
    assert not es.should_stop and es.best_epoch == 1


def test_min_mode_with_min_delta():
    # 0.949 is lower than 0.95 but not by more than min_delta 0.01: no improvement.
    es, epochs_run = run([1.0, 0.95, 0.949, 0.90], mode="min", patience=1, min_delta=0.01)
    assert (es.best_epoch, es.stopped_epoch, epochs_run, es.best) == (2, 3, 3, 0.95)


def test_baseline_blocks_the_reset_of_wait():
    # Every value improves on the best but not on the baseline 0.9, so wait keeps growing;
    # Keras checks patience only on epochs that do not improve.
    es, epochs_run = run([0.5, 0.6, 0.7], mode="max", patience=2, baseline=0.9)
    assert (es.best_epoch, es.wait, es.stopped_epoch) == (3, 3, None)
    es, epochs_run = run([0.5, 0.6, 0.6], mode="max", patience=2, baseline=0.9)
    assert (es.best_epoch, es.stopped_epoch) == (2, 3)


def test_start_from_epoch_ignores_the_first_epochs():
    es, _ = run([0.99, 0.98, 0.5, 0.4, 0.3], mode="max", patience=2, start_from_epoch=2)
    assert (es.best_epoch, es.stopped_epoch) == (3, 5)


def test_nan_never_improves_after_the_first_value():
    es, _ = run([0.5, float("nan"), float("nan")], mode="max", patience=2)
    assert (es.best_epoch, es.stopped_epoch) == (1, 3)


def test_update_is_pure():
    es = EarlyStopping(mode="max", patience=1)
    after = es.update(1, 0.5)
    assert es.best is None and es.wait == 0 and after.best == 0.5 and after.improved


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_keras_on_random_sequences(seed):
    import keras

    rng = random.Random(seed)
    for trial in range(25):
        mode = rng.choice(["max", "min"])
        patience = rng.randint(0, 4)
        min_delta = rng.choice([0.0, 0.01])
        baseline = rng.choice([None, None, 0.5])
        start_from_epoch = rng.choice([0, 0, 2])
        values = [round(rng.uniform(0, 1), 2)
                  for _ in range(rng.randint(start_from_epoch + 1, 15))]
        options = dict(mode=mode, patience=patience, min_delta=min_delta, baseline=baseline,
                       start_from_epoch=start_from_epoch)

        callback = keras.callbacks.EarlyStopping(monitor="m", **options)
        stop = type("Model", (), {"stop_training": False})()
        callback.set_model(stop)
        callback.on_train_begin()
        keras_epochs = 0
        for epoch, value in enumerate(values):
            callback.on_epoch_end(epoch, {"m": value})
            keras_epochs = epoch + 1
            if stop.stop_training:
                break

        es, epochs_run = run(values, **options)
        assert epochs_run == keras_epochs, (values, options)
        assert es.best_epoch == callback.best_epoch + 1
        assert (es.stopped_epoch or 0) == (callback.stopped_epoch + 1 if stop.stop_training else 0)
