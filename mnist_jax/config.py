"""Frozen configuration. The defaults reproduce the Keras notebook; variants come from
`dataclasses.replace`. Tuples, not lists, so a config is hashable (the model holds its
ModelConfig as a static field)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mnist_jax.errors import ConfigError

CONV_IMPLS = ("auto", "xla", "patches")
POOL_IMPLS = ("auto", "window", "reshape")
ENGINES = ("auto", "loop", "scan")
LAYOUTS = ("auto", "vmap", "map", "sequential")


@dataclass(frozen=True)
class ModelConfig:
    """A CNN: conv blocks (3x3 VALID conv, ReLU, 2x2 max-pool), then a dense head.

    `conv_impl` and `pool_impl` choose how XLA computes the same function (see model.py);
    "auto" picks the fastest measured formulation for the backend at build time.
    """

    conv_features: tuple[int, ...] = (32, 32)
    kernel_size: int = 3
    pool_size: int = 2
    dense_features: tuple[int, ...] = (128,)
    dropout_rate: float = 0.5
    num_classes: int = 10
    image_shape: tuple[int, int, int] = (28, 28, 1)  # H, W, C
    conv_impl: str = "auto"
    pool_impl: str = "auto"

    def __post_init__(self):
        _require(len(self.conv_features) >= 1, "conv_features needs at least one conv block")
        _require(all(isinstance(f, int) and f > 0 for f in self.conv_features),
                 f"conv_features must be positive integers, got {self.conv_features}")
        _require(all(isinstance(f, int) and f > 0 for f in self.dense_features),
                 f"dense_features must be positive integers, got {self.dense_features}")
        _require(self.kernel_size >= 1 and self.pool_size >= 1,
                 "kernel_size and pool_size must be at least 1")
        _require(0.0 <= self.dropout_rate < 1.0,
                 f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        _require(self.num_classes >= 2, f"num_classes must be at least 2, got {self.num_classes}")
        _require(self.conv_impl in CONV_IMPLS, f"conv_impl must be one of {CONV_IMPLS}")
        _require(self.pool_impl in POOL_IMPLS, f"pool_impl must be one of {POOL_IMPLS}")
        self.feature_map_sizes()  # refuses a depth the image cannot hold

    def feature_map_sizes(self) -> list[tuple[int, int]]:
        """Spatial size (H, W) after each conv block; raises ConfigError below 1x1."""
        h, w, _ = self.image_shape
        k, p = self.kernel_size, self.pool_size
        blocks = f"conv_features {self.conv_features}"
        sizes = []
        for i, _ in enumerate(self.conv_features):
            if h < k or w < k:
                raise ConfigError(
                    f"{blocks}: the feature map vanishes after {i} conv blocks: its {h}x{w} "
                    f"map is smaller than block {i + 1}'s {k}x{k} kernel; use at most {i} "
                    f"conv blocks")
            h, w = h - k + 1, w - k + 1  # VALID conv
            if h < p or w < p:
                raise ConfigError(
                    f"{blocks}: the feature map vanishes after {i + 1} conv blocks: block "
                    f"{i + 1}'s {p}x{p} pooling takes its {h}x{w} map below 1x1; use at "
                    f"most {i} conv blocks")
            h, w = h // p, w // p  # VALID pooling floors
            sizes.append((h, w))
        return sizes

    @property
    def flatten_width(self) -> int:
        h, w = self.feature_map_sizes()[-1]
        return h * w * self.conv_features[-1]

    @property
    def forward_flops(self) -> int:
        """Floating-point operations of one image's forward pass: 2 per multiply-add of the
        convolutions and dense layers (bias, ReLU and pooling, under 2% here, left out).
        A convolution counts the outputs its VALID pooling reads, the ones the model
        computes (model.pooled_extent).
        Counted from the shapes rather than by XLA's cost analysis, which on GPU leaves out
        the convolutions it hands to cuDNN (an H100 reported 0.23 MFLOP for 2-conv)."""
        flops, channels = 0, self.image_shape[-1]
        h, w = self.image_shape[:2]
        k = self.kernel_size
        p = self.pool_size
        for features in self.conv_features:
            h, w = (h - k + 1) // p, (w - k + 1) // p  # after the pooling
            flops += 2 * (h * p) * (w * p) * k * k * channels * features
            channels = features
        width = self.flatten_width
        for features in (*self.dense_features, self.num_classes):
            flops += 2 * width * features
            width = features
        return flops

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The config of a config.json (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class TrainConfig:
    """The training protocol. Defaults: the notebook (Adam 1e-3, batch 32, 20 epochs,
    EarlyStopping on val_accuracy with patience 5 and restore_best_weights), one seed.

    `seeds` independent runs train together: run i uses seed `seed + i` for its
    initialisation, dropout and shuffling. `layout` says how they share the device:
    "vmap" (one compiled program over a seed axis), "map" (one program running them one
    after another), "sequential" (one after another from Python, compiled once), "auto"
    (the faster measured for the backend; engine.resolve_layout).

    `epoch_chunks`: each epoch runs as this many calls of one compiled program, so that a
    progress bar moves and an interrupt stops within a chunk; results do not depend on it.

    `devices` and `data_parallel`: a mesh over `devices` devices (None: all local ones) with
    a "data" axis of `data_parallel` (the batch split over it) and a "seeds" axis of the
    rest (each device trains its own seeds); one device changes nothing (engine.Placement).
    """

    seed: int = 0
    seeds: int = 1
    layout: str = "auto"
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    eval_batch_size: int = 1000
    monitor: str = "val_accuracy"
    mode: str = "auto"  # as Keras: "min" for a loss, "max" for an accuracy
    patience: int = 5
    min_delta: float = 0.0
    restore_best_weights: bool = True
    engine: str = "auto"
    resource_interval_s: float = 0.5
    epoch_chunks: int = 20
    devices: int | None = None  # None: every local device of the backend
    data_parallel: int = 1  # the size of the mesh's data axis; the seeds axis is the rest

    def __post_init__(self):
        _require(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        _require(self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}")
        _require(self.eval_batch_size >= 1,
                 f"eval batch size must be at least 1, got {self.eval_batch_size}")
        _require(math.isfinite(self.learning_rate) and self.learning_rate > 0,
                 f"learning rate must be a positive number, got {self.learning_rate}")
        _require(self.patience >= 0, f"patience must be 0 or more, got {self.patience}")
        _require(self.min_delta >= 0, f"min_delta must be 0 or more, got {self.min_delta}")
        _require(self.mode in ("auto", "max", "min"),
                 f"mode must be 'auto', 'max' or 'min', got {self.mode!r}")
        _require(self.monitor in ("val_accuracy", "val_loss", "train_accuracy", "train_loss"),
                 f"monitor must be val_accuracy, val_loss, train_accuracy or train_loss, "
                 f"got {self.monitor!r}")
        _require(self.engine in ENGINES, f"engine must be one of {ENGINES}, got {self.engine!r}")
        _require(self.seeds >= 1, f"seeds must be at least 1, got {self.seeds}")
        _require(0 <= self.seed and self.seed + self.seeds <= 2**32,
                 f"seeds {self.seed}..{self.seed + self.seeds - 1} must lie in [0, 2**32)")
        _require(self.layout in LAYOUTS, f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        _require(self.resource_interval_s > 0, "resource_interval_s must be positive")
        _require(self.epoch_chunks >= 1, f"epoch_chunks must be at least 1, got {self.epoch_chunks}")
        _require(self.devices is None or self.devices >= 1,
                 f"devices must be at least 1, got {self.devices}")
        _require(self.data_parallel >= 1,
                 f"data_parallel must be at least 1, got {self.data_parallel}")
        _require(self.batch_size % self.data_parallel == 0,
                 f"a batch of {self.batch_size} cannot be split evenly over a data axis of "
                 f"{self.data_parallel} devices: choose a batch size that {self.data_parallel} "
                 f"divides")

    @property
    def seed_values(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + self.seeds))

    @property
    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "min" if self.monitor.endswith("loss") else "max"


def to_dict(config: Any) -> dict:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(config)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
