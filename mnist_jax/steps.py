"""Pure steps: functions of pytrees, no I/O, no clocks. They import only jax, flax and optax.

A batch is a dict of device arrays:
  "image": [B, H, W, C] uint8, "label": [B] int32, "mask": [B] float32 (1 = real example,
  0 = padding that fills the last batch of an epoch to a fixed shape).
Steps return sums and counts, never means, so the host divides once per epoch and no
padded example is counted.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

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


class KerasAdamState(NamedTuple):
    count: jax.Array  # [] int32, steps taken
    mu: optax.Updates  # first moment, the shape of params
    nu: optax.Updates  # second moment


def scale_by_keras_adam(b1: float = 0.9, b2: float = 0.999,
                        eps: float = 1e-7) -> optax.GradientTransformation:
    """Adam's direction exactly as Keras 3 computes it (keras/src/optimizers/adam.py):
    `sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`. Keras adds eps to the square root
    of the uncorrected second moment ("epsilon hat"); optax.adam adds it after bias
    correction, which is a larger eps in the early steps."""

    def init(params):
        return KerasAdamState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params),
                              jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, grads)
        nu = jax.tree.map(lambda v, g: v + (g * g - v) * (1 - b2), state.nu, grads)
        count = state.count + 1
        t = count.astype(jnp.float32)
        alpha = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        direction = jax.tree.map(lambda m, v: alpha * m / (jnp.sqrt(v) + eps), mu, nu)
        return direction, KerasAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def adam(learning_rate: float = 1e-3) -> optax.GradientTransformation:
    """The notebook's optimizer: Keras' Adam (beta_1 0.9, beta_2 0.999, epsilon 1e-7)."""
    return optax.chain(scale_by_keras_adam(), optax.scale_by_learning_rate(learning_rate))


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


def eval_step(state: TrainState, batch: Batch, *, loss_fn: LossFn = cross_entropy,
              apply_fn=None) -> tuple[Metrics, jax.Array]:
    """Loss sum, correct count and example count over the batch's real examples, and the
    predicted class of every example [B] (for confusion matrices).

    `apply_fn` (default: the state's) may be another formulation of the same model, one
    that runs faster without gradients.
    """
    apply_fn = apply_fn or state.apply_fn
    logits = apply_fn({"params": state.params}, normalize(batch["image"]), train=False)
    metrics = _summed_metrics(logits, batch["label"], loss_fn(logits, batch["label"]), batch["mask"])
    return metrics, jnp.argmax(logits, -1).astype(jnp.int32)
