"""Pure steps: functions of pytrees, no I/O, no clocks. They import only jax, flax and optax.

A batch is a dict of device arrays:
  "image": [B, H, W, C] uint8, "label": [B] int32, "mask": [B] float32 (1 = real example,
  0 = padding that fills the last batch of an epoch to a fixed shape).
Steps return sums and counts, never means, so the host divides once per epoch and no
padded example is counted.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]  # (logits [B, K], labels [B]) -> [B]

PIXEL_SCALE = 255.0  # uint8 pixels -> [0, 1], as the notebook's /255


class TrainState(train_state.TrainState):
    """params, opt_state and step (from flax), plus `rng`: the run's key. Every random
    draw derives from `rng` and the step or epoch counter, so this one pytree is all a
    resumed run needs."""

    rng: jax.Array


def create_train_state(model, params, tx: optax.GradientTransformation, rng) -> TrainState:
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=rng)
    # An int32 array, not flax's Python 0: the first epoch then compiles the same program
    # as every later one.
    return state.replace(step=jnp.zeros((), jnp.int32))


def adam(learning_rate: float = 1e-3) -> optax.GradientTransformation:
    """Keras' Adam defaults: beta_1 0.9, beta_2 0.999, epsilon 1e-7."""
    return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-7)


def cross_entropy(logits, labels):
    """Softmax cross-entropy on integer labels, per example: [B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def normalize(images):
    """uint8 [B, H, W, C] -> float32 in [0, 1], on the device."""
    return images.astype(jnp.float32) / PIXEL_SCALE


def _summed_metrics(logits, labels, per_example_loss, mask) -> Metrics:
    return {
        "loss_sum": jnp.sum(per_example_loss * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "count": jnp.sum(mask),
    }


def train_step(state: TrainState, batch: Batch, key, *,
               loss_fn: LossFn = cross_entropy) -> tuple[TrainState, Metrics]:
    """One optimizer step on the mean loss over the batch's real examples.

    `key` drives dropout. Padded examples (mask 0) get zero weight, so a padded last batch
    gives the same update as Keras' smaller last batch.
    """
    images, labels, mask = normalize(batch["image"]), batch["label"], batch["mask"]

    def objective(params):
        logits = state.apply_fn({"params": params}, images, train=True, rngs={"dropout": key})
        per_example = loss_fn(logits, labels)
        return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0), (logits, per_example)

    grads, (logits, per_example) = jax.grad(objective, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), _summed_metrics(logits, labels, per_example, mask)


def eval_step(state: TrainState, batch: Batch, *, loss_fn: LossFn = cross_entropy) -> Metrics:
    """Loss sum, correct count and example count over the batch's real examples."""
    logits = state.apply_fn({"params": state.params}, normalize(batch["image"]), train=False)
    return _summed_metrics(logits, batch["label"], loss_fn(logits, batch["label"]), batch["mask"])
