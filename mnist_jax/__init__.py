"""mnist_jax: a pure-JAX, functional study of CNNs on MNIST.

What a study needs, in one namespace (README, "Extending"):

    import mnist_jax as mj

    splits = mj.make_splits(mj.load_mnist("../shared/mnist"), "holdout")
    result = mj.fit(mj.ModelConfig(conv_features=(32, 32)), mj.TrainConfig(seeds=3), splits,
                    "runs/mine", loss_fn=..., tx=..., batch_transform=...)
    mj.write_study_report("runs/mine", ["runs/mine"])

Names are imported on first use, so `import mnist_jax` is cheap and the report's part
(`write_study_report`, the configs) works where JAX cannot be imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    # configuration (no JAX)
    "ModelConfig": "mnist_jax.config",
    "TrainConfig": "mnist_jax.config",
    # data: MNIST through tensorflow-datasets' checksums, or an offline folder
    "load_mnist": "mnist_jax.data",
    "make_splits": "mnist_jax.data",
    "synthetic": "mnist_jax.data",
    "Splits": "mnist_jax.data",
    # training
    "fit": "mnist_jax.train",
    "FitResult": "mnist_jax.train",
    "run_epoch": "mnist_jax.train",
    "Parts": "mnist_jax.run",
    "build_run": "mnist_jax.run",
    "init_state": "mnist_jax.run",
    "init_states": "mnist_jax.run",
    # the pure steps and their pieces, for a step of one's own
    "TrainState": "mnist_jax.steps",
    "train_step": "mnist_jax.steps",
    "eval_step": "mnist_jax.steps",
    "cross_entropy": "mnist_jax.steps",
    "adam": "mnist_jax.steps",
    "step_key": "mnist_jax.steps",
    "CNN": "mnist_jax.model",
    # studies and their report (the report needs no JAX)
    "run_study": "mnist_jax.study",
    "write_study_report": "mnist_jax.report",
    "UserError": "mnist_jax.errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports lazily
    from mnist_jax.config import ModelConfig, TrainConfig  # noqa: F401
    from mnist_jax.data import Splits, load_mnist, make_splits, synthetic  # noqa: F401
    from mnist_jax.errors import UserError  # noqa: F401
    from mnist_jax.model import CNN  # noqa: F401
    from mnist_jax.report import write_study_report  # noqa: F401
    from mnist_jax.run import Parts, build_run, init_state, init_states  # noqa: F401
    from mnist_jax.steps import (TrainState, adam, cross_entropy, eval_step,  # noqa: F401
                                 step_key, train_step)
    from mnist_jax.study import run_study  # noqa: F401
    from mnist_jax.train import FitResult, fit, run_epoch  # noqa: F401


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mnist_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
