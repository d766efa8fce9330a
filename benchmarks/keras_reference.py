"""The notebook's Keras model and its one-epoch fit, built from the project's configs.

The reference that benchmarks/epoch_speed.py times the JAX epoch against. Everything the
project's configs hold comes from them, so the Keras model is the Flax model's function
(mnist_jax/model.py) for any ModelConfig, and the defaults give the notebook's:

- ModelConfig: `image_shape` (the Input), per `conv_features` entry a VALID
  `Conv2D(features, kernel_size, activation="relu")` and a `MaxPooling2D(pool_size)`, then
  Flatten, per `dense_features` entry `Dense(features, activation="relu")` and
  `Dropout(dropout_rate)`, and `Dense(num_classes, activation="softmax")`. Keras' default
  initialisers (glorot_uniform kernels, zero biases) are the project's too. `conv_impl`
  and `pool_impl` choose how XLA computes the project's model and do not apply here.
- TrainConfig: Adam with `learning_rate` and Keras' defaults (beta_1 0.9, beta_2 0.999,
  epsilon 1e-7: the project's `steps.adam`), `batch_size` for training; `seed` for
  `seed_everything`. Validation runs at Keras' default, the training batch size, as in the
  notebook (`validation_batch_size`).
- Pixels: uint8 divided by `mnist_jax.steps.PIXEL_SCALE` into float32 [0, 1], as the
  notebook's `/255` and the project's `steps.normalize`.

Keras is an optional extra (`pip install -e '.[bench]'`): it is imported only when a
function here needs it, never when this module is imported.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mnist_jax.config import ModelConfig, TrainConfig
from mnist_jax.steps import PIXEL_SCALE

LOSS = "sparse_categorical_crossentropy"  # on the softmax output, integer labels
METRICS = ("accuracy",)


def import_keras():
    """(keras, tensorflow, None) with Keras on TensorFlow, the notebook's (unless
    KERAS_BACKEND says otherwise), or (None, None, why not): Keras is optional."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # the notebook's Keras
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TF's INFO lines drown the output
    try:
        import tensorflow as tf
        import keras
    except Exception as e:  # ImportError, or a broken install failing in other ways
        first_line = (str(e).strip().splitlines() or [""])[0]
        return None, None, f"{type(e).__name__}: {first_line}"
    try:
        # Keras is the CPU reference; on a GPU machine TF must not take the memory JAX uses.
        tf.config.set_visible_devices([], "GPU")
    except Exception:  # RuntimeError once TF has initialised its devices; harmless on CPU
        pass
    return keras, tf, None


def _keras(keras):
    if keras is None:
        import keras  # the backend is whatever KERAS_BACKEND says (default: TensorFlow)
    return keras


def build_model(model_config: ModelConfig = ModelConfig(),
                train_config: TrainConfig = TrainConfig(), keras=None):
    """The notebook's model for `model_config`, compiled as the notebook compiles it with
    `train_config`'s learning rate. `keras`: the module to use (default: import it)."""
    keras = _keras(keras)
    layers, cfg = keras.layers, model_config
    stack: list[Any] = [keras.Input(cfg.image_shape)]
    for features in cfg.conv_features:
        stack += [layers.Conv2D(features, cfg.kernel_size, activation="relu"),
                  layers.MaxPooling2D(cfg.pool_size)]
    stack.append(layers.Flatten())
    for features in cfg.dense_features:
        stack += [layers.Dense(features, activation="relu"), layers.Dropout(cfg.dropout_rate)]
    stack.append(layers.Dense(cfg.num_classes, activation="softmax"))
    model = keras.Sequential(stack)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=train_config.learning_rate),
                  loss=LOSS, metrics=list(METRICS))
    return model


def seed_everything(train_config: TrainConfig = TrainConfig(), keras=None) -> None:
    """Keras' global seed (Python, NumPy and the backend) from `train_config.seed`: call it
    before `build_model` for the same initial weights, dropout and shuffles each time."""
    _keras(keras).utils.set_random_seed(train_config.seed)


def validation_batch_size(train_config: TrainConfig = TrainConfig()) -> int:
    """The batch Keras' fit() validates at: its default, the training batch size."""
    return train_config.batch_size


def to_arrays(split) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a split as the notebook feeds them: float32 images in [0, 1]
    (uint8 / PIXEL_SCALE), the labels unchanged."""
    images, labels = split[0], split[1]
    return np.asarray(images).astype(np.float32) / np.float32(PIXEL_SCALE), np.asarray(labels)


def fit_epoch(model, train, val, train_config: TrainConfig = TrainConfig()) -> dict:
    """One `model.fit(..., epochs=1)` call, the notebook's epoch: a fresh shuffle, batches
    of `train_config.batch_size`, then validation on `val`. `train` and `val` as
    `to_arrays` gives them. Returns the epoch's train_loss, train_accuracy, val_loss and
    val_accuracy (None where Keras reported none)."""
    history = model.fit(train[0], train[1], batch_size=train_config.batch_size, epochs=1,
                        validation_data=val, verbose=0, shuffle=True)
    h = {k: float(v[-1]) for k, v in history.history.items()}
    return {"train_loss": h.get("loss"), "train_accuracy": h.get("accuracy"),
            "val_loss": h.get("val_loss"), "val_accuracy": h.get("val_accuracy")}


def jit_compile(model) -> bool | None:
    """Whether Keras compiled the model's steps with XLA (None if it cannot say)."""
    try:
        return bool(model.jit_compile)
    except Exception:
        return None
