"""Pure steps: functions of pytrees, no I/O, no clocks. They import only jax, flax and optax.

A batch is a dict of device arrays:
  "image": [B, H, W, C] uint8, "label": [B] int32, "mask": [B] float32 (1 = real example,
  0 = padding that fills the last batch of an epoch to a fixed shape).
Steps return sums and counts, never means, so the host divides once per epoch and no
padded example is counted. A step may return more sums than the standard ones
(`loss_sum`, `cross_entropy_sum`, `correct`, `count`): each `<name>_sum` (or `<name>`)
becomes a `<split>_<name>` column of history.csv, divided by the count.

The parts a researcher swaps, each an argument of fit() (train.py):
- the model: any Flax module called as `(images, *, train)`; one whose `__call__` also
  takes `mask` gets the batch's mask (so batch statistics can leave padding out). Every
  variable collection besides `params` (e.g. `batch_stats`) lives in
  `TrainState.model_state`, is updated by training and used by evaluation.
- the loss: `loss_fn(logits [B, K], labels [B], params) -> [B]`, per example; it may add a
  term of the parameters (weight decay). Training and evaluation use the same loss, and
  cross-entropy and accuracy are reported beside it.
- the batch transform: `batch_transform(batch, key) -> batch`, on the device before the
  model (augmentation), with its own key stream.
Every key derives from the state: `step_key(state, "dropout")`, `step_key(state,
"augment")`, ... (named streams of the run's `rng`, folded with the step).
"""

from __future__ import annotations

import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[jax.Array, jax.Array, Any], jax.Array]  # (logits, labels, params) -> [B]
BatchTransform = Callable[[Batch, jax.Array], Batch]  # (batch, key) -> batch

PIXEL_SCALE = 255.0  # uint8 pixels -> [0, 1], as the notebook's /255

# Key streams by name. Dropout and shuffling keep the numbers they always had (0, 1), so
# earlier results stay reproducible; any other name gets a fixed number from its CRC-32.
STREAMS = {"dropout": 0, "shuffle": 1}


def stream_id(name: str) -> int:
    return STREAMS.get(name, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def stream_key(rng, name: str, counter) -> jax.Array:
    """The key of stream `name` at `counter` (a step or an epoch), from the run's `rng`."""
    return jax.random.fold_in(jax.random.fold_in(rng, stream_id(name)), counter)


class TrainState(train_state.TrainState):
    """params, opt_state and step (from flax), plus `rng`: the run's key, and
    `model_state`: the model's variable collections other than params (batch statistics).
    Every random draw derives from `rng` and the step or epoch counter, so this one pytree
    is all a resumed run needs."""

    rng: jax.Array
    model_state: dict = struct.field(default_factory=dict)


def step_key(state: TrainState, name: str = "dropout") -> jax.Array:
    """The key of stream `name` for the state's current step."""
    return stream_key(state.rng, name, state.step)


def create_train_state(apply_fn, variables: dict, tx: optax.GradientTransformation,
                       rng) -> TrainState:
    """`variables`: what the model's init returned ({"params": ..., other collections})."""
    variables = dict(variables)
    params = variables.pop("params")
    state = TrainState.create(apply_fn=apply_fn, params=params, tx=tx, rng=rng,
                              model_state=variables)
    # An int32 array, not flax's Python 0: the first epoch then compiles the same program
    # as every later one.
    return state.replace(step=jnp.zeros((), jnp.int32))


KERAS_ADAM = {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.999, "epsilon": 1e-7}


def adam(learning_rate: float = KERAS_ADAM["learning_rate"], b1: float = KERAS_ADAM["b1"],
         b2: float = KERAS_ADAM["b2"], epsilon: float = KERAS_ADAM["epsilon"]
         ) -> optax.GradientTransformation:
    """The notebook's optimizer, Keras' Adam, as optax's own Adam.

    Keras adds epsilon to the square root of the *uncorrected* second moment; optax.adam
    adds its `eps` after bias correction. They agree when optax's eps is
    `epsilon / sqrt(1 - b2^t)` at step t = count + 1, given here as a schedule through
    optax.inject_hyperparams (which also keeps the learning rate in the optimizer state).
    """
    def eps(count):
        return epsilon / jnp.sqrt(1.0 - b2 ** (count + 1).astype(jnp.float32))

    return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate, b1=b1, b2=b2,
                                                eps=eps)


def cross_entropy(logits, labels, params=None) -> jax.Array:
    """Softmax cross-entropy on integer labels, per example: [B]. (`params` unused.)"""
    del params
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def normalize(images):
    """uint8 [B, H, W, C] -> float32 in [0, 1], on the device."""
    return images.astype(jnp.float32) / PIXEL_SCALE


def summed_metrics(logits, labels, per_example_loss, mask) -> Metrics:
    """The standard sums over a batch's real examples: the loss in use, cross-entropy,
    correct predictions and the example count."""
    return {
        "loss_sum": jnp.sum(per_example_loss * mask),
        "cross_entropy_sum": jnp.sum(cross_entropy(logits, labels) * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "count": jnp.sum(mask),
    }


def masked_mean(per_example, mask):
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn = cross_entropy,
               batch_transform: BatchTransform | None = None) -> tuple[TrainState, Metrics]:
    """One optimizer step on the mean loss over the batch's real examples.

    Padded examples (mask 0) get zero weight, so a padded last batch gives the same update
    as Keras' smaller last batch. Dropout draws from the state's "dropout" stream, the
    transform from its "augment" stream.
    """
    if batch_transform is not None:
        batch = batch_transform(batch, step_key(state, "augment"))
    images, labels, mask = normalize(batch["image"]), batch["label"], batch["mask"]
    mutable = list(state.model_state)

    def objective(params):
        logits, updates = state.apply_fn({"params": params, **state.model_state}, images, mask,
                                         train=True, rngs={"dropout": step_key(state)},
                                         mutable=mutable)
        per_example = loss_fn(logits, labels, params)
        return masked_mean(per_example, mask), (logits, per_example, updates)

    grads, (logits, per_example, updates) = jax.grad(objective, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads).replace(model_state=dict(updates))
    return state, summed_metrics(logits, labels, per_example, mask)


def eval_step(state: TrainState, batch: Batch, *, loss_fn: LossFn = cross_entropy,
              apply_fn=None) -> tuple[Metrics, jax.Array]:
    """The standard sums over the batch's real examples, and the predicted class of every
    example [B] (for confusion matrices).

    `apply_fn` (default: the state's) may be another formulation of the same model, one
    that runs faster without gradients; it takes the same variables.
    """
    apply_fn = apply_fn or state.apply_fn
    logits = apply_fn({"params": state.params, **state.model_state}, normalize(batch["image"]),
                      batch["mask"], train=False)
    metrics = summed_metrics(logits, batch["label"], loss_fn(logits, batch["label"], state.params),
                             batch["mask"])
    return metrics, jnp.argmax(logits, -1).astype(jnp.int32)
