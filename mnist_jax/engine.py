"""The compiled epoch: data resident on the device, batches gathered there, no per-step
host syncs.

`run_steps` is the pure chunk of an epoch (a loop over steps start..stop) and `scan_epoch`
the pure whole epoch; `compile_epochs` is the one place where they meet jit, vmap over
seeds and donation, and returns the `Epochs` that fit() and the benchmark run on a state
with a leading seed axis. An epoch runs as TrainConfig.epoch_chunks (20) calls of one
compiled chunk program: between chunks the host moves the progress bar and honours an
interrupt, waiting for chunk j only once chunk j + 1 is queued; the results are bit for
bit those of one call (tested). `make_train_epoch` and `make_evaluate` compile one seed's
epoch and validation pass (the sequential layout's parts). Totals are device scalars
(loss_sum, correct, count) that the host divides once per epoch.

Every key derives from the state (steps.stream_key): the step's streams (dropout, augment)
from (state.rng, step), the shuffle from (state.rng, epoch), with epoch = step //
steps_per_epoch. A run resumed from a saved state therefore draws exactly the same numbers
as one that never stopped. The totals take their structure from the step itself
(jax.eval_shape), so a step that returns another sum gets it totalled too.

Two engines compute the same thing:
- "scan": the steps of a chunk are one XLA program (a loop over the batches). No per-step
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
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mnist_jax import steps
from mnist_jax.errors import ConfigError

class Split(NamedTuple):
    """One split of a dataset on the device (a pytree, so it can be a jit argument)."""

    images: jax.Array  # [N, H, W, C] uint8
    labels: jax.Array  # [N] int32

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


def to_device(images: np.ndarray, labels: np.ndarray, device=None) -> Split:
    """Put a split on the device (or sharding) once, as uint8 images and int32 labels."""
    return Split(jax.device_put(np.asarray(images, np.uint8), device),
                 jax.device_put(np.asarray(labels, np.int32), device))


SEEDS_AXIS, DATA_AXIS = "seeds", "data"


class Placement(NamedTuple):
    """Where a run's seeds and batches go. `mesh` None: one device, nothing sharded.
    Otherwise a Mesh with a "seeds" axis (the state's leading seed axis is split over it:
    each device trains its own seeds, no communication between them) and a "data" axis
    (each batch split over it, parameters replicated, gradients summed by XLA). `padded`
    seeds: the real ones plus inactive copies up to a multiple of the seeds axis."""

    mesh: Mesh | None
    seeds: int
    padded: int

    @property
    def data_parallel(self) -> int:
        return self.mesh.shape[DATA_AXIS] if self.mesh is not None else 1

    def describe(self) -> dict:
        """What config.json records of the placement."""
        devices = list(self.mesh.devices.flat) if self.mesh is not None else jax.devices()[:1]
        return {"devices": len(devices), "device_kind": str(devices[0].device_kind),
                "processes": jax.process_count(),
                "mesh": dict(self.mesh.shape) if self.mesh is not None else None,
                "padded_seeds": self.padded - self.seeds}

    def words(self) -> str:
        """The placement in a few words, for the run's first line."""
        if self.mesh is None:
            return "1 device"
        shape = self.mesh.shape
        pad = f" ({self.padded - self.seeds} inactive padding)" if self.padded > self.seeds else ""
        return (f"{self.mesh.devices.size} devices: seeds over {shape[SEEDS_AXIS]}{pad}, "
                f"data over {shape[DATA_AXIS]}")

    def states(self, states):
        """States with a leading seed axis [K, ...], padded to `padded` with copies of the
        first seed (never trained: inactive) and sharded over the seeds axis. (From the
        host: every process holds the same initial states, and places its devices' part.)"""
        if self.mesh is None:
            return states
        pad = self.padded - self.seeds

        def padded(x):
            x = np.asarray(x)
            return np.concatenate([x, np.repeat(x[:1], pad, 0)])
        return self.put_seeds(jax.tree.map(padded, states))

    def put_seeds(self, tree):
        """Host arrays with a (padded) leading seed axis, on the device(s) as the compiled
        epochs return such arrays (sharded over the seeds axis): so a program's first call
        and its later ones, fed its own outputs, share one compilation."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return jax.device_put(tree, NamedSharding(self.mesh, P(SEEDS_AXIS)))

    def real(self, tree):
        """The real seeds of a tree with a (padded) leading seed axis; with a mesh, whole
        on every device (an all-gather over the seeds axis), so that every process can read
        every seed's numbers."""
        if self.mesh is None:
            return tree
        return _gathered_head(self.mesh, self.seeds)(tree)

    def pad(self, flags) -> np.ndarray:
        """Per-seed flags for the padded seeds (False for the padding), as a host array
        (a jit argument that every process gives alike)."""
        return np.array([*map(bool, flags), *[False] * (self.padded - len(flags))])

    def to_device(self, images: np.ndarray, labels: np.ndarray) -> "Split":
        """A split on the device(s), replicated over the mesh."""
        sharding = NamedSharding(self.mesh, P()) if self.mesh is not None else None
        return to_device(images, labels, sharding)

    def constrain(self, batch: steps.Batch) -> steps.Batch:
        """A batch split over the data axis (inside vmap over the seeds axis)."""
        if self.data_parallel == 1:
            return batch
        return jax.lax.with_sharding_constraint(batch, NamedSharding(self.mesh, P(DATA_AXIS)))


@functools.lru_cache(maxsize=None)
def _gathered_head(mesh: Mesh, seeds: int) -> Callable:
    """The first `seeds` entries of every leaf, replicated over `mesh` (compiled once)."""
    return jax.jit(lambda tree: jax.tree.map(lambda x: x[:seeds], tree),
                   out_shardings=NamedSharding(mesh, P()))


def make_placement(seeds: int, devices: int | None = None, data_parallel: int = 1
                   ) -> Placement:
    """The mesh for `seeds` seeds over `devices` devices (None: all of them, of every
    process of a multi-process run), with a data axis of `data_parallel`. One device: no
    mesh, nothing changes."""
    available = jax.devices()
    n = len(available) if devices is None else devices
    if n > len(available):
        raise ConfigError(f"{n} devices asked for, but the {jax.default_backend()} backend "
                          f"has {len(available)}")
    if jax.process_count() > 1 and n != len(available):
        raise ConfigError(f"a run over {jax.process_count()} processes uses every device of "
                          f"each ({len(available)}), not {n}")
    if n % data_parallel:
        raise ConfigError(f"a data axis of {data_parallel} does not divide {n} devices")
    if n == 1:
        return Placement(None, seeds, seeds)
    axes = (n // data_parallel, data_parallel)
    mesh = jax.make_mesh(axes, (SEEDS_AXIS, DATA_AXIS), devices=available[:n],
                         axis_types=(AxisType.Auto, AxisType.Auto))
    return Placement(mesh, seeds, -(-seeds // axes[0]) * axes[0])


def check_placement(train_config) -> None:
    """Refuse (ConfigError) the devices and layout of `train_config` where they cannot
    work, as make_placement and compile_epochs later would, but before any model or data
    exists. An "auto" layout is checked there, once the engine is known."""
    placement = make_placement(train_config.seeds, train_config.devices,
                               train_config.data_parallel)
    if placement.mesh is not None and train_config.layout not in ("auto", "vmap"):
        _refuse_layout(train_config.layout, placement.mesh.devices.size)


def _refuse_layout(layout: str, devices: int):
    raise ConfigError(f"the {layout} layout runs on one device: use layout 'vmap' to "
                      f"spread seeds over {devices} devices, or 1 device")


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Every example once per epoch; the last batch is padded (and masked) if short."""
    return math.ceil(num_examples / effective_batch_size(num_examples, batch_size))


def effective_batch_size(num_examples: int, batch_size: int) -> int:
    """A batch larger than the data is the whole data, as in Keras (and no huge padding)."""
    return min(batch_size, num_examples)


def epoch_order(state: steps.TrainState, num_examples: int, batch_size: int):
    """The shuffled example order of the state's current epoch, as [S, B] indices and a
    [S, B] float mask that is 0 on the padding of the last batch."""
    batch_size = effective_batch_size(num_examples, batch_size)
    num_steps = steps_per_epoch(num_examples, batch_size)
    epoch = state.step // num_steps
    order = jax.random.permutation(steps.stream_key(state.rng, "shuffle", epoch), num_examples)
    padding = num_steps * batch_size - num_examples
    order = jnp.concatenate([order, jnp.zeros((padding,), order.dtype)])
    mask = jnp.concatenate([jnp.ones((num_examples,), jnp.float32),
                            jnp.zeros((padding,), jnp.float32)])
    return order.reshape(num_steps, batch_size), mask.reshape(num_steps, batch_size)


def gather_batch(split: Split, indices, mask) -> steps.Batch:
    return {"image": split.images[indices], "label": split.labels[indices], "mask": mask}


def abstract_batch(split: Split, batch_size: int) -> steps.Batch:
    """The shapes and dtypes of one batch of `split` (for jax.eval_shape)."""
    b = effective_batch_size(split.size, batch_size)
    return {"image": jax.ShapeDtypeStruct((b, *split.images.shape[1:]), split.images.dtype),
            "label": jax.ShapeDtypeStruct((b,), split.labels.dtype),
            "mask": jax.ShapeDtypeStruct((b,), jnp.float32)}


def zero_totals(step: Callable, state, split: Split, batch_size: int, metrics_at: int):
    """Zeros shaped like the metrics `step(state, batch)` returns (at position
    `metrics_at` of its output): the running totals of one seed, traced, not run."""
    out = jax.eval_shape(step, state, abstract_batch(split, batch_size))
    # Host zeros: a jit argument that every process of a multi-process run gives alike.
    return jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), out[metrics_at])


def totals_maker(step: Callable, batch_size: int, metrics_at: int) -> Callable:
    """zero_totals for one step, traced once per data shape rather than every epoch:
    `zeros(state, split)` for one seed's state."""
    made = {}

    def zeros(state, split):
        key = (effective_batch_size(split.size, batch_size), split.images.shape[1:])
        if key not in made:
            made[key] = zero_totals(step, state, split, batch_size, metrics_at)
        return made[key]

    return zeros


def one_seed(states):
    """The shapes of one seed's state, out of states with a leading seed axis."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), states)


def _add(totals, metrics):
    return jax.tree.map(jnp.add, totals, metrics)


def mean_metrics(prefix: str, totals) -> dict[str, float]:
    """Host-side means of one seed's fetched totals, per example: `loss_sum` becomes
    {prefix}_loss, `correct` {prefix}_accuracy, any other `<name>_sum` {prefix}_<name>."""
    count = max(float(totals["count"]), 1.0)
    first = [k for k in ("loss_sum", "correct") if k in totals]  # Keras' columns lead
    return {f"{prefix}_{metric_name(key)}": float(totals[key]) / count
            for key in [*first, *sorted(set(totals) - {*first, "count"})]}


def metric_name(key: str) -> str:
    return "accuracy" if key == "correct" else key.removesuffix("_sum")


def per_seed_means(prefix: str, totals) -> list[dict[str, float]]:
    """mean_metrics for each seed of fetched totals with a leading seed axis [K]."""
    k = len(np.asarray(totals["count"]))
    return [mean_metrics(prefix, {key: np.asarray(v)[i] for key, v in totals.items()})
            for i in range(k)]


def run_steps(train_step: Callable = steps.train_step, constrain: Callable = None) -> Callable:
    """The pure chunk of an epoch, `(state, totals, split, order, mask, start, stop) ->
    (state, totals)`: steps `start..stop-1` of the epoch whose `order` and `mask` are given.
    A `lax.fori_loop`, so one compiled program runs chunks of any length (traced bounds).
    `constrain` places each gathered batch (Placement.constrain: over the data axis)."""
    constrain = constrain or (lambda batch: batch)

    def chunk(state, totals, split, order, mask, start, stop):
        def body(i, carry):
            return _step(train_step, *carry, split, order, mask, i, constrain)

        return jax.lax.fori_loop(start, stop, body, (state, totals))

    return chunk


def _step(train_step, state, totals, split, order, mask, i, constrain=lambda batch: batch):
    """Step i of the epoch: its batch, the update, the running totals."""
    state, metrics = train_step(state, constrain(gather_batch(split, order[i], mask[i])))
    return state, _add(totals, metrics)


def scan_epoch(batch_size: int, train_step: Callable = steps.train_step) -> Callable:
    """The pure epoch, `(state, split) -> (state, totals)`: its order and every step in one
    `lax.scan` of static length, no jit inside. The epoch as one program, the form the
    chunks replaced: the benchmark times it beside them (--epoch-mode scan), and a test
    checks the chunks compute the same bits."""

    def train_epoch(state, split):
        order, mask = epoch_order(state, split.labels.shape[0], batch_size)
        totals = zero_totals(train_step, state, split, batch_size, 1)

        def body(carry, _):
            return _run_step(train_step, *carry, split, order, mask), None

        (state, totals), _ = jax.lax.scan(body, (state, totals), None, length=order.shape[0])
        return state, totals

    return train_epoch


def _run_step(train_step, state, totals, split, order, mask):
    """The loop engine's step: it finds its position in the epoch from the state."""
    return _step(train_step, state, totals, split, order, mask, state.step % order.shape[0])


def chunk_bounds(num_steps: int, chunks: int) -> list[tuple[int, int]]:
    """`chunks` near-equal consecutive ranges of steps covering 0..num_steps."""
    edges = np.linspace(0, num_steps, min(chunks, num_steps) + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


OnChunk = Callable[[int], None]  # called with the steps (summed over seeds) just finished


def _drive(call, carry, bounds, on_chunk: OnChunk | None, seeds: int):
    """`carry = call(carry, start, stop)` for each chunk. With `on_chunk`, each chunk is
    reported once the device has finished it, one chunk late: the host waits for chunk j
    only after queueing chunk j + 1, so the device never idles for the host."""
    pending = None
    for start, stop in bounds:
        carry = call(carry, np.int32(start), np.int32(stop))
        if on_chunk is not None:
            if pending is not None:
                jax.block_until_ready(pending[0])
                on_chunk(pending[1])
            pending = (carry[1]["count"], (stop - start) * seeds)
    if pending is not None:
        jax.block_until_ready(pending[0])
        on_chunk(pending[1])
    return carry


def make_train_epoch(batch_size: int, engine: str, train_step: Callable = steps.train_step,
                     chunks: int = 1) -> Callable:
    """One seed's `train_epoch(state, split, on_chunk=None) -> (state, totals)`, compiled
    once per data shape, the state donated; run as `chunks` calls, with `on_chunk(steps)`
    after each (results do not depend on `chunks`).

    `train_step(state, batch, key) -> (state, metrics)` may be any step with that
    signature (another loss via functools.partial, a batch transform, ...).
    """
    order_fn = jax.jit(epoch_order, static_argnums=(1, 2))
    zeros = totals_maker(train_step, batch_size, 1)
    if engine == "scan":
        chunk_fn = jax.jit(run_steps(train_step), donate_argnums=0)

        def call(split, order, mask):
            return lambda carry, start, stop: chunk_fn(*carry, split, order, mask, start, stop)
    elif engine == "loop":
        # Only the state is donated: _drive waits on a chunk's totals after queueing the
        # next chunk, which takes them as input.
        chunk_fn = jax.jit(functools.partial(_run_step, train_step), donate_argnums=0)

        def call(split, order, mask):
            def steps_(carry, start, stop):
                for _ in range(int(stop - start)):
                    carry = chunk_fn(*carry, split, order, mask)
                return carry
            return steps_
    else:
        raise ValueError(f"engine must be 'scan' or 'loop', got {engine!r}")

    def train_epoch(state, split, on_chunk: OnChunk | None = None):
        order, mask = order_fn(state, split.size, batch_size)
        return _drive(call(split, order, mask), (state, _on_device(zeros(state, split))),
                      chunk_bounds(order.shape[0], chunks), on_chunk, 1)

    train_epoch.step_fn = chunk_fn  # exposed so tests can count traces
    return train_epoch


def _eval_batch(eval_step, batch_size, state, totals, split, start,
                constrain=lambda batch: batch):
    """Totals plus one batch from `start`, and the batch's predicted classes [B]. A split
    smaller than `batch_size` is one batch of its own size, not padded: a 100-image
    validation of a wide model padded to 1,000 cost 10x its work."""
    n = split.labels.shape[0]
    idx = start + jnp.arange(effective_batch_size(n, batch_size))
    mask = (idx < n).astype(jnp.float32)
    batch = constrain(gather_batch(split, jnp.minimum(idx, n - 1), mask))
    metrics, predictions = eval_step(state, batch)
    return _add(totals, metrics), predictions


def _evaluate_with(eval_batch, batch_size: int, zeros: Callable) -> Callable:
    # A Python loop of top-level calls: XLA:CPU runs its convolution ~6x slower inside a
    # loop program, and a validation pass is only N / batch_size (5-10) calls.
    def evaluate(state, split):
        totals = zeros(state, split)
        predictions = []
        for start in range(0, split.size, effective_batch_size(split.size, batch_size)):
            totals, batch_predictions = eval_batch(state, totals, split, np.int32(start))
            predictions.append(batch_predictions)
        return totals, jnp.concatenate(predictions, axis=-1)[..., :split.size]

    evaluate.eval_batch = eval_batch
    return evaluate


def make_evaluate(batch_size: int, eval_step: Callable = steps.eval_step) -> Callable:
    """One seed's `evaluate(state, split) -> (totals, predictions [N])` over every example
    of the split, in order."""
    eval_batch = jax.jit(functools.partial(_eval_batch, eval_step, batch_size))
    zeros = totals_maker(eval_step, batch_size, 0)
    return _evaluate_with(eval_batch, batch_size,
                          lambda state, split: _on_device(zeros(state, split)))


class Epochs(NamedTuple):
    """What fit() runs on a state with a leading seed axis [K, ...], compiled once.

    train(states, split, active, on_chunk=None) -> (states, totals): one epoch for the
        seeds where `active` [K] bool is True (the others' states come back unchanged), as
        `chunks` compiled calls, `on_chunk(steps)` after each finished one.
    evaluate(states, split) -> (totals, predictions [K, N]) for every seed.
    keep_best(best, states, improved [K] bool) -> best: each improved seed's new state.
    Totals are dicts of [K] device arrays (loss_sum, correct, count, and whatever other
    sums the step returns).
    """

    train: Callable
    evaluate: Callable
    keep_best: Callable
    engine: str
    layout: str
    placement: Placement


def compile_epochs(batch_size: int, eval_batch_size: int, engine: str, layout: str,
                   train_step: Callable = steps.train_step,
                   eval_step: Callable = steps.eval_step, chunks: int = 1,
                   placement: Placement | None = None) -> Epochs:
    """The one place where epochs meet jit, vmap and donation.

    "vmap": one program over the seed axis; a stopped seed's update is discarded with
    jnp.where (its compute is not saved). "map": one program running the seeds one after
    another (lax.map), a stopped seed skipped by lax.cond. "sequential": the one-seed
    programs, run seed after seed from Python; a stopped seed is skipped. Every layout
    runs an epoch as `chunks` calls of one compiled chunk program (progress, interrupts).

    `placement` (make_placement): with a mesh, the vmap layout runs each device's seeds
    (vmap's spmd_axis_name) and splits each batch over the data axis; states come padded
    to the seeds axis (Placement.states), and `active`, `improved` and the evaluation's
    results are per real seed.
    """
    placement = placement or Placement(None, 0, 0)
    if placement.mesh is not None and layout != "vmap":
        _refuse_layout(layout, placement.mesh.devices.size)
    one_batch = functools.partial(_eval_batch, eval_step, eval_batch_size,
                                  constrain=placement.constrain)
    keep_padded = jax.jit(keep_best)

    def keep(best, states, improved):
        return keep_padded(best, states, placement.pad(improved))
    train_zeros = totals_maker(train_step, batch_size, 1)
    eval_zeros = totals_maker(eval_step, eval_batch_size, 0)

    def seed_axis_zeros(zeros, states, split):  # one seed's zero totals, for every seed
        return placement.put_seeds(_seed_axis(zeros(one_seed(states), split),
                                              seed_count(states)))

    if layout in ("vmap", "map"):
        if engine != "scan":
            raise ConfigError(f"the {layout} layout needs the scan engine, not the loop engine "
                              f"(which engine 'auto' picks for XLA's convolution on CPU): use "
                              f"layout 'sequential' or engine 'scan'")
        chunk = run_steps(train_step, placement.constrain)
        spmd = SEEDS_AXIS if placement.mesh is not None else None
        if layout == "vmap":
            def masked_chunk(state, totals, split, order, mask, start, stop, active):
                new, totals = chunk(state, totals, split, order, mask, start, stop)
                return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, state), totals

            train_chunk = jax.vmap(masked_chunk, in_axes=(0, 0, None, 0, 0, None, None, 0),
                                   spmd_axis_name=spmd)
            eval_batch = jax.vmap(one_batch, in_axes=(0, 0, None, None), spmd_axis_name=spmd)
        else:  # "map": seeds one after another inside one program; lax.cond skips stopped ones
            def train_chunk(states, totals, split, orders, masks, start, stop, active):
                def one(xs):
                    state, tot, order, mask, on = xs
                    return jax.lax.cond(
                        on, lambda s, t: chunk(s, t, split, order, mask, start, stop),
                        lambda s, t: (s, t), state, tot)
                return jax.lax.map(one, (states, totals, orders, masks, active))

            def eval_batch(states, totals, split, start):
                return jax.lax.map(lambda xs: one_batch(*xs, split, start), (states, totals))

        train_chunk = jax.jit(train_chunk, donate_argnums=0)
        orders = jax.jit(jax.vmap(epoch_order, in_axes=(0, None, None)), static_argnums=(1, 2))
        evaluate_padded = _evaluate_with(jax.jit(eval_batch), eval_batch_size,
                                         functools.partial(seed_axis_zeros, eval_zeros))

        def evaluate(states, split):
            return placement.real(evaluate_padded(states, split))

        def train(states, split, active, on_chunk=None):
            training = sum(map(bool, active))  # counted on the host: no device round trip
            active = placement.pad(active)
            order, mask = orders(states, split.size, batch_size)
            totals = seed_axis_zeros(train_zeros, states, split)
            call = lambda carry, start, stop: train_chunk(  # noqa: E731
                *carry, split, order, mask, start, stop, active)
            states, totals = _drive(call, (states, totals), chunk_bounds(order.shape[1], chunks),
                                    on_chunk, training)
            return states, placement.real(totals)  # the states stay padded

        train.train_chunk = train_chunk  # exposed so tests can count traces
        return Epochs(train, evaluate, keep, engine, layout, placement)

    if layout == "sequential":
        train_one = make_train_epoch(batch_size, engine, train_step, chunks)
        evaluate_one = make_evaluate(eval_batch_size, eval_step)

        def train(states, split, active, on_chunk=None):
            results = [train_one(seed_slice(states, i), split, on_chunk) if on
                       else (seed_slice(states, i), train_zeros(one_seed(states), split))
                       for i, on in enumerate(active)]
            return stack_seeds([s for s, _ in results]), stack_seeds([t for _, t in results])

        def evaluate(states, split):
            results = [evaluate_one(seed_slice(states, i), split)
                       for i in range(seed_count(states))]
            return stack_seeds([t for t, _ in results]), jnp.stack([p for _, p in results])

        train.train_one = train_one  # exposed so tests can count traces
        return Epochs(train, evaluate, keep, engine, layout, placement)

    raise ValueError(f"layout must be 'vmap', 'map' or 'sequential', got {layout!r}")


def keep_best(best, states, improved):
    """Per seed, the new state where `improved` [K] is True, else the best so far (new
    buffers: the next epoch donates `states`)."""
    def pick(b, s):
        return jnp.where(improved.reshape(-1, *[1] * (s.ndim - 1)), s, b)
    return jax.tree.map(pick, best, states)


def seed_count(states) -> int:
    return int(jax.tree.leaves(states)[0].shape[0])


def seed_slice(states, i: int):
    """Seed i's state, out of a state with a leading seed axis."""
    return jax.tree.map(lambda x: x[i], states)


def stack_seeds(states: list):
    """One state with a leading seed axis, from one state per seed."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _on_device(tree):
    """Host arrays on the default device, as a compiled step returns them (one compilation
    for the first call and the later ones)."""
    return jax.tree.map(jnp.asarray, tree)


def _seed_axis(tree, k: int):
    return jax.tree.map(lambda x: np.broadcast_to(x, (k, *x.shape)), tree)


def resolve_layout(layout: str, engine: str, backend: str | None = None,
                   devices: int = 1) -> str:
    """ "auto": the seed layout measured faster for the backend (benchmarks/epoch_speed.py
    --seeds). XLA:CPU runs per-seed (batched) convolutions and matmuls under vmap 1.6-2.3x
    slower than the same seeds one after another; the loop engine cannot be vmapped. On
    several devices the seeds are spread over them, which needs vmap."""
    if layout != "auto":
        return layout
    backend = backend or jax.default_backend()
    return "vmap" if (backend != "cpu" or devices > 1) and engine == "scan" else "sequential"


def resolve_engine(engine: str, xla_conv: bool, backend: str | None = None) -> str:
    """ "auto": the engine measured fastest for the backend and the training formulation
    (`xla_conv`: whether its program holds XLA's convolution; model.uses_xla_conv).

    Scan everywhere, except XLA:CPU's own convolution, which runs several times slower
    inside a loop program than as a top-level op (about 6x for the convolution alone in
    ../shared/PERF_NOTES.md; an epoch of about 100 s against 12 s; README, Speed).
    """
    if engine != "auto":
        return engine
    backend = backend or jax.default_backend()
    return "loop" if backend == "cpu" and xla_conv else "scan"
