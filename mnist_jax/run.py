"""What a run is made of, built once before its epochs: the model's two formulations, the
loss, the optimizer, the batch transform, the steps, every seed's initial state and the
compiled epochs, and the description of all of it that config.json records (and that
--resume compares).

The parts a researcher swaps are arguments (fit() passes them through):
  model            a ModelConfig (the CNN, with a fast evaluation formulation) or any Flax
                   module called as `(images, *, train)` (and `mask=` if it takes one)
  loss_fn          `(logits, labels, params) -> [B]`, for training and evaluation alike
  tx, tx_name      an optax optimizer (default: Keras' Adam through optax.adam), and the
                   name config.json gives it
  batch_transform  `(batch, key) -> batch` before the model in training, its own key stream
  train_step, eval_step   whole steps, for what the arguments above do not cover
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mnist_jax import engine, steps
from mnist_jax.config import ModelConfig, TrainConfig, to_dict
from mnist_jax.model import (Apply, count_params, describe, formulations, init_variables,
                             jsonable, uses_xla_conv)

INIT_STREAM = 0
RUN_STREAM = 1
MNIST_SHAPE = (28, 28, 1)


@dataclass(frozen=True)
class Parts:
    """The swappable parts of a run (see the module docstring); None: the default."""

    loss_fn: steps.LossFn = steps.cross_entropy
    tx: optax.GradientTransformation | None = None
    tx_name: str | None = None
    batch_transform: steps.BatchTransform | None = None
    train_step: Callable | None = None
    eval_step: Callable | None = None

    def __post_init__(self):
        if self.train_step is not None and self.batch_transform is not None:
            raise TypeError("batch_transform is applied by the default train step: with your "
                            "own train_step, apply it there")

    def optimizer(self, learning_rate: float) -> optax.GradientTransformation:
        return self.tx if self.tx is not None else steps.adam(learning_rate)

    def training_step(self) -> Callable:
        if self.train_step is not None:
            return self.train_step
        return functools.partial(steps.train_step, loss_fn=self.loss_fn,
                                 batch_transform=self.batch_transform)

    def evaluation_step(self, eval_module: nn.Module) -> Callable:
        if self.eval_step is not None:
            return self.eval_step
        return functools.partial(steps.eval_step, loss_fn=self.loss_fn,
                                 apply_fn=Apply(eval_module))

    def describe(self, opt_state) -> dict:
        """What config.json records of these parts (compared on --resume)."""
        return {
            "loss": jsonable(self.loss_fn),
            "optimizer": describe_optimizer(self, opt_state),
            "batch_transform": jsonable(self.batch_transform),
            "steps": {"train_step": jsonable(self.training_step()),
                      "eval_step": (jsonable(self.eval_step) if self.eval_step is not None
                                    else "mnist_jax.steps.eval_step (the loss above, on the "
                                         "model's evaluation formulation)")},
        }


def describe_optimizer(parts: Parts, opt_state) -> dict:
    """The optimizer as it ran: the default Adam by its Keras hyperparameters; a given one by
    the caller's name (if any), optax's state types and any injected hyperparameters."""
    if parts.tx is None:
        hyper = _hyperparams(opt_state)
        return {"name": "adam", "implementation": "optax.inject_hyperparams(optax.adam), eps "
                "as Keras' epsilon (steps.adam)",
                "learning_rate": hyper["learning_rate"], "b1": hyper["b1"], "b2": hyper["b2"],
                "epsilon": steps.KERAS_ADAM["epsilon"]}
    hyper = _hyperparams(opt_state)
    return {"name": parts.tx_name or "unnamed optax transformation",
            "state": _state_types(opt_state), **({"hyperparams": hyper} if hyper else {})}


def _state_types(state) -> list[str]:
    """optax's own names for the optimizer state's parts, in order."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # an optax state NamedTuple
        inner = [v for v in state if isinstance(v, tuple)]
        return [type(state).__name__] + [t for v in inner for t in _state_types(v)]
    if isinstance(state, (tuple, list)):
        return [t for v in state for t in _state_types(v)]
    return []


def _hyperparams(state) -> dict:
    """Injected hyperparameters (optax.inject_hyperparams) found in an optimizer state,
    as floats at the state's step."""
    found = {}
    if isinstance(state, tuple):
        if hasattr(state, "hyperparams") and isinstance(state.hyperparams, dict):
            # float32 values written as their shortest decimal (0.001, not 0.0010000000474)
            found.update({k: float(str(np.float32(np.asarray(v).ravel()[0]))) for k, v in
                          state.hyperparams.items()})
        for v in state:
            if isinstance(v, tuple):
                found.update(_hyperparams(v))
    return found


def image_shape_of(model, image_shape=None) -> tuple[int, ...]:
    """The input shape: given, else a ModelConfig's or CNN's own, else MNIST's."""
    if image_shape is not None:
        return tuple(image_shape)
    config = model if isinstance(model, ModelConfig) else getattr(model, "config", None)
    return tuple(config.image_shape) if isinstance(config, ModelConfig) else MNIST_SHAPE


def new_state(module: nn.Module, tx, seed: int, image_shape) -> steps.TrainState:
    """One seed's initial train state, from the seed alone: every variable collection from
    one stream of its key, and the `rng` every later draw (dropout, shuffling, augmentation)
    derives from."""
    root = jax.random.PRNGKey(seed)
    variables = init_variables(module, jax.random.fold_in(root, INIT_STREAM), image_shape)
    return steps.create_train_state(Apply(module), variables, tx,
                                    jax.random.fold_in(root, RUN_STREAM))


def init_states(model, train_config: TrainConfig, tx=None, image_shape=None
                ) -> tuple[nn.Module, steps.TrainState]:
    """The training module and every seed's initial state, stacked on a leading seed axis
    [K, ...]. `model`: a ModelConfig or a Flax module."""
    module, _ = formulations(model)
    tx = tx if tx is not None else steps.adam(train_config.learning_rate)
    shape = image_shape_of(model, image_shape)
    return module, engine.stack_seeds([new_state(module, tx, seed, shape)
                                       for seed in train_config.seed_values])


def init_state(model, train_config: TrainConfig, tx=None, seed=None, image_shape=None
               ) -> tuple[nn.Module, steps.TrainState]:
    """The training module and one seed's initial train state (default seed:
    train_config.seed), exactly seed i's slice of init_states."""
    one = dataclasses.replace(train_config, seeds=1,
                              seed=train_config.seed if seed is None else seed)
    module, states = init_states(model, one, tx, image_shape)
    return module, engine.seed_slice(states, 0)


@dataclass
class Run:
    """What the epochs need, built once: the formulations, initial states, compiled epochs,
    and the description config.json records."""

    model: nn.Module  # the training formulation
    eval_model: nn.Module  # the same function and variables, formulated for evaluation
    states: steps.TrainState  # every leaf has a leading seed axis [K, ...] (padded: engine.Placement)
    epochs: engine.Epochs
    parts: Parts
    num_params: int
    description: dict  # model, loss, optimizer, transform, steps (config.json)


def build_run(model, train_config: TrainConfig, parts: Parts | None = None, *,
              image_shape=None, **part_kwargs) -> Run:
    """Every seed's state and the compiled epochs for `model` (a ModelConfig or a Flax
    module) with `parts` (or the Parts fields as keywords: loss_fn=, tx=, ...)."""
    parts = parts or Parts(**part_kwargs)
    module, eval_module = formulations(model)
    shape = image_shape_of(model, image_shape)
    _, states = init_states(module, train_config, parts.optimizer(train_config.learning_rate),
                            shape)
    one = engine.seed_slice(states, 0)
    xla_conv = uses_xla_conv(one.apply_fn, {"params": one.params, **one.model_state}, shape)
    placement = engine.make_placement(train_config.seeds, train_config.devices,
                                      train_config.data_parallel)
    engine_name = engine.resolve_engine(train_config.engine, xla_conv)
    layout = engine.resolve_layout(train_config.layout, engine_name,
                                   devices=1 if placement.mesh is None else placement.mesh.size)
    epochs = engine.compile_epochs(train_config.batch_size, train_config.eval_batch_size,
                                   engine_name, layout, parts.training_step(),
                                   parts.evaluation_step(eval_module), train_config.epoch_chunks,
                                   placement)
    description = {"model": model_record(module, eval_module, one),
                   **parts.describe(one.opt_state), "placement": placement.describe()}
    return Run(module, eval_module, placement.states(states), epochs, parts,
               count_params(one.params), description)


def model_record(module: nn.Module, eval_module: nn.Module, state) -> dict:
    """config.json's model: the training formulation, the evaluation one if it differs,
    and the variable collections the state carries."""
    record = {**describe(module, state.params),
              "collections": ["params", *state.model_state]}
    if eval_module is not module:
        record["eval_formulation"] = describe(eval_module, state.params)["fields"]
    return record


def expected_settings(model, train_config: TrainConfig, parts: Parts | None = None,
                      image_shape=None) -> dict:
    """What config.json must say of a run made with these arguments, for --resume: the
    model as given ("auto" formulations left for the run to resolve), the parts, and the
    training protocol (the learning rate only where the default Adam uses it)."""
    parts = parts or Parts()
    module, _ = formulations(model)
    shape = image_shape_of(model, image_shape)
    params = jax.eval_shape(lambda: init_variables(module, jax.random.PRNGKey(0), shape))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params["params"])
    opt_state = parts.optimizer(train_config.learning_rate).init(zeros)
    given = model if isinstance(model, ModelConfig) else getattr(model, "config", None)
    record = describe(module, zeros)
    fields = {"config": to_dict(given)} if isinstance(given, ModelConfig) else record["fields"]
    return {"model": {"class": record["class"], "fields": fields},
            **parts.describe(opt_state),
            "train": train_record(train_config, parts)}


def train_record(train_config: TrainConfig, parts: Parts) -> dict:
    """The training protocol as config.json records it; `learning_rate` is None where a
    given optimizer makes it unused."""
    record = to_dict(train_config)
    if parts.tx is not None:
        record["learning_rate"] = None
    return record
