"""The compiled epoch: data resident on the device, batches gathered there, no host syncs.

`make_train_epoch` returns `train_epoch(state, split) -> (state, totals)` and
`make_evaluate` returns `evaluate(state, split) -> totals`; totals are device scalars
(loss_sum, correct, count) that the caller divides once per epoch.

Every key derives from the state: dropout from (state.rng, step), the shuffle from
(state.rng, epoch), with epoch = step // steps_per_epoch. A run resumed from a saved state
therefore draws exactly the same numbers as one that never stopped.

Two engines compute the same thing:
- "scan": the whole epoch is one XLA program (`lax.scan` over the batches). No per-step
  launch or dispatch cost; what GPUs want.
- "loop": one jitted step per batch, dispatched from Python; the step finds its batch from
  state.step, so nothing is copied from the host per step. XLA:CPU runs some ops (its
  convolution) much slower inside a scan than as top-level ops, so on CPU this can win
  for the "xla" conv formulation.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import steps

DROPOUT_STREAM = 0
SHUFFLE_STREAM = 1


class Split(NamedTuple):
    """One split of a dataset on the device (a pytree, so it can be a jit argument)."""

    images: jax.Array  # [N, H, W, C] uint8
    labels: jax.Array  # [N] int32

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


def to_device(images: np.ndarray, labels: np.ndarray, device=None) -> Split:
    """Put a split on the device once, as uint8 images and int32 labels."""
    return Split(jax.device_put(np.asarray(images, np.uint8), device),
                 jax.device_put(np.asarray(labels, np.int32), device))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Every example once per epoch; the last batch is padded (and masked) if short."""
    return math.ceil(num_examples / effective_batch_size(num_examples, batch_size))


def effective_batch_size(num_examples: int, batch_size: int) -> int:
    """A batch larger than the data is the whole data, as in Keras (and no huge padding)."""
    return min(batch_size, num_examples)


def step_key(state: steps.TrainState):
    """The dropout key of the state's current step."""
    return jax.random.fold_in(jax.random.fold_in(state.rng, DROPOUT_STREAM), state.step)


def epoch_order(state: steps.TrainState, num_examples: int, batch_size: int):
    """The shuffled example order of the state's current epoch, as [S, B] indices and a
    [S, B] float mask that is 0 on the padding of the last batch."""
    batch_size = effective_batch_size(num_examples, batch_size)
    num_steps = steps_per_epoch(num_examples, batch_size)
    epoch = state.step // num_steps
    key = jax.random.fold_in(jax.random.fold_in(state.rng, SHUFFLE_STREAM), epoch)
    order = jax.random.permutation(key, num_examples)
    padding = num_steps * batch_size - num_examples
    order = jnp.concatenate([order, jnp.zeros((padding,), order.dtype)])
    mask = jnp.concatenate([jnp.ones((num_examples,), jnp.float32),
                            jnp.zeros((padding,), jnp.float32)])
    return order.reshape(num_steps, batch_size), mask.reshape(num_steps, batch_size)


def gather_batch(split: Split, indices, mask) -> steps.Batch:
    return {"image": split.images[indices], "label": split.labels[indices], "mask": mask}


def zero_totals() -> steps.Metrics:
    return {"loss_sum": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.float32),
            "count": jnp.zeros((), jnp.float32)}


def _add(totals, metrics):
    return jax.tree.map(jnp.add, totals, metrics)


def mean_metrics(prefix: str, totals) -> dict[str, float]:
    """Host-side means of fetched totals: {prefix}_loss and {prefix}_accuracy."""
    count = max(float(totals["count"]), 1.0)
    return {f"{prefix}_loss": float(totals["loss_sum"]) / count,
            f"{prefix}_accuracy": float(totals["correct"]) / count}


def make_train_epoch(batch_size: int, engine: str,
                     train_step: Callable = steps.train_step) -> Callable:
    """`train_epoch(state, split) -> (state, totals)`, compiled once per data shape.

    `train_step(state, batch, key) -> (state, metrics)` may be any step with that
    signature (another loss via functools.partial, a batch transform, ...).
    """

    def run_step(state, totals, split, order, mask):
        i = state.step % order.shape[0]  # the step's position within its epoch
        batch = gather_batch(split, order[i], mask[i])
        state, metrics = train_step(state, batch, step_key(state))
        return state, _add(totals, metrics)

    if engine == "scan":
        @functools.partial(jax.jit, donate_argnums=0)
        def train_epoch(state, split):
            order, mask = epoch_order(state, split.labels.shape[0], batch_size)

            def body(carry, _):
                return run_step(*carry, split, order, mask), None

            (state, totals), _ = jax.lax.scan(body, (state, zero_totals()), None,
                                              length=order.shape[0])
            return state, totals

        return train_epoch

    if engine == "loop":
        order_fn = jax.jit(epoch_order, static_argnums=(1, 2))
        step_fn = jax.jit(run_step, donate_argnums=(0, 1))

        def train_epoch(state, split):
            order, mask = order_fn(state, split.size, batch_size)
            totals = zero_totals()
            for _ in range(order.shape[0]):
                state, totals = step_fn(state, totals, split, order, mask)
            return state, totals

        train_epoch.step_fn = step_fn  # exposed so tests can count traces
        return train_epoch

    raise ValueError(f"engine must be 'scan' or 'loop', got {engine!r}")


def make_evaluate(batch_size: int, eval_step: Callable = steps.eval_step) -> Callable:
    """`evaluate(state, split) -> totals` over every example of the split, in order."""

    @jax.jit
    def eval_batch(state, totals, split, start):
        n = split.labels.shape[0]
        idx = start + jnp.arange(batch_size)
        mask = (idx < n).astype(jnp.float32)
        batch = gather_batch(split, jnp.minimum(idx, n - 1), mask)
        return _add(totals, eval_step(state, batch))

    def evaluate(state, split):
        totals = zero_totals()
        for start in range(0, split.size, batch_size):
            totals = eval_batch(state, totals, split, np.int32(start))
        return totals

    evaluate.eval_batch = eval_batch
    return evaluate


def resolve_engine(engine: str, conv_impl: str, backend: str | None = None) -> str:
    """ "auto": the engine measured fastest for the backend and conv formulation.

    Scan everywhere, except XLA:CPU's own convolution, which runs about 10x slower inside
    a scan than as a top-level op (benchmarks/epoch_speed.py measures both).
    """
    if engine != "auto":
        return engine
    backend = backend or jax.default_backend()
    return "loop" if backend == "cpu" and conv_impl == "xla" else "scan"
