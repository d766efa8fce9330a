"""Extending the training without editing mnist_jax/: each example is a few lines that pass
another part to fit() (README, "Extending"), and runs from the command line:

    python -m experiments.examples label_smoothing --data-dir ../shared/mnist
    python -m experiments.examples batch_norm --data-dir ../shared/mnist --epochs 3

with the training flags of the depth study (--epochs, --seeds, --train-limit, --out, ...),
writing one run folder (default runs/examples/<name>/<date-time>). The examples:

- label_smoothing: cross-entropy on labels smoothed by 0.1, SGD with momentum 0.9 and a
  cosine learning-rate schedule (0.05 down to 0 over the run's steps).
- random_shift: each training image shifted by up to 2 pixels, on the device, drawn from
  the state's own "augment" key stream.
- batch_norm: a CNN with batch normalisation after each convolution, whose statistics
  leave the padding of the last batch out (it takes the batch's mask); its running
  statistics are trained, checkpointed, resumed and used for evaluation.
- l2_in_loss / adamw: weight decay, once as an L2 term the loss adds from the parameters,
  once as optax.adamw's decoupled decay.
- nnx_mlp: a Flax NNX module (a two-layer perceptron with dropout) through flax.nnx.bridge.

Each is tested on tiny data in tests/test_examples.py.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mnist_jax import cli, data, steps, study
from mnist_jax.config import ModelConfig, TrainConfig
from mnist_jax.train import fit

SMOOTHING = 0.1


def smoothed_cross_entropy(logits, labels, params=None):
    """Cross-entropy against labels smoothed by SMOOTHING, per example [B]."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), SMOOTHING)
    return optax.softmax_cross_entropy(logits, targets)


def label_smoothing(train_config: TrainConfig, steps_per_epoch: int) -> dict:
    schedule = optax.cosine_decay_schedule(0.05, train_config.epochs * steps_per_epoch)
    return {"loss_fn": smoothed_cross_entropy,
            "tx": optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9),
            "tx_name": "sgd, momentum 0.9, cosine decay from 0.05 to 0 over the run"}


MAX_SHIFT = 2


def random_shift(batch: steps.Batch, key) -> steps.Batch:
    """Shift every image by up to MAX_SHIFT pixels each way (zero fill), on the device."""
    images = batch["image"]  # [B, H, W, C] uint8
    b, h, w, c = images.shape
    m = MAX_SHIFT
    padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * m + 1)  # [B, 2]
    crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c))  # noqa: E731
    return {**batch, "image": jax.vmap(crop)(padded, offsets)}


class BatchNormCNN(nn.Module):
    """Conv, batch norm, ReLU, max-pool blocks, then the notebook's dense head. Batch
    statistics are over the batch's real examples only (`mask`)."""

    conv_features: tuple[int, ...] = (32, 32)
    dense_features: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, images, *, train: bool, mask=None):  # images [B, H, W, C]
        x = images
        for features in self.conv_features:
            x = nn.Conv(features, (3, 3), padding="VALID")(x)
            where = None if mask is None else jnp.broadcast_to(
                mask[:, None, None, None] > 0, x.shape)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.99)(x, mask=where)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(self.dense_features)(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


L2_WEIGHT = 5e-4


def l2_cross_entropy(logits, labels, params):
    """Cross-entropy plus L2_WEIGHT / 2 times the squared norm of every kernel, per example
    (the same penalty on each, so the batch mean adds it once)."""
    kernels = [p for path, p in jax.tree_util.tree_leaves_with_path(params)
               if "kernel" in jax.tree_util.keystr(path)]
    penalty = 0.5 * L2_WEIGHT * sum(jnp.sum(k ** 2) for k in kernels)
    return steps.cross_entropy(logits, labels) + penalty


class NNXMLP(nnx.Module):
    """A two-layer perceptron with dropout, written in Flax NNX."""

    def __init__(self, hidden: int = 128, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(28 * 28, hidden, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, images, *, train: bool):
        x = nnx.relu(self.hidden(images.reshape(images.shape[0], -1)))
        return self.out(self.dropout(x, deterministic=not train))


def nnx_mlp(hidden: int = 128) -> nn.Module:
    """NNXMLP as the linen module fit() takes."""
    return nnx.bridge.to_linen(NNXMLP, hidden)


# name -> (train_config, steps per epoch) -> fit()'s keyword arguments
EXAMPLES: dict[str, Callable[[TrainConfig, int], dict]] = {
    "label_smoothing": label_smoothing,
    "random_shift": lambda cfg, n: {"batch_transform": random_shift},
    "batch_norm": lambda cfg, n: {"model": BatchNormCNN()},
    "l2_in_loss": lambda cfg, n: {"loss_fn": l2_cross_entropy},
    "adamw": lambda cfg, n: {"tx": optax.adamw(cfg.learning_rate, weight_decay=1e-4),
                             "tx_name": f"adamw({cfg.learning_rate}, weight_decay=1e-4)"},
    "nnx_mlp": lambda cfg, n: {"model": nnx_mlp()},
}


def fit_example(example: str, train_config: TrainConfig, splits: data.Splits, out=None,
                **kwargs):
    """fit() with the example's parts (the notebook's CNN unless the example gives a model)."""
    steps_per_epoch = math.ceil(len(splits.train.labels) / train_config.batch_size)
    parts = EXAMPLES[example](train_config, steps_per_epoch)
    model = parts.pop("model", ModelConfig())
    return fit(model, train_config, splits, out, name=example, **parts, **kwargs)


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m experiments.examples",
                                description="Train the notebook's protocol with one of the "
                                            "extension examples and write its run folder.")
    parser.add_argument("example", choices=sorted(EXAMPLES))
    cli.add_training_args(parser, default_out="runs/examples")
    args = parser.parse_args(argv)

    def run():
        train_config = cli.train_config(args)
        with cli.claimed_out(args, lambda out: [out]) as claim:
            fit_example(args.example, train_config, cli.load_splits(args), claim,
                        resume=args.resume)
            study.write_report(claim.path, [claim.path])

    return cli.run_main(run, debug=args.debug, args=args)


if __name__ == "__main__":
    sys.exit(main())
