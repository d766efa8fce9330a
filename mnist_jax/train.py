"""fit(): the one place where data, model, steps, engine, early stopping, checkpoints and
resource sampling are wired together. Also `python -m mnist_jax.train`, one model's run.

A run folder holds:
  config.json   model and training configs, parameter count, library versions, devices
  history.csv   one row per epoch: train/val loss and accuracy, epoch time, resources
  result.json   best epoch, stop epoch, best metrics, the best checkpoint's path
  checkpoints/best/<epoch>/   Orbax checkpoint of the best train state
"""

from __future__ import annotations

import functools
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from mnist_jax import cli, engine, records, report, steps
from mnist_jax.checkpointing import BestCheckpoint
from mnist_jax.config import ModelConfig, TrainConfig, to_dict
from mnist_jax.data import Dataset
from mnist_jax.early_stopping import EarlyStopping
from mnist_jax.errors import TrainingDiverged
from mnist_jax.model import CNN, build_model, count_params, init_params
from mnist_jax import resources
from mnist_jax.resources import ResourceSampler

INIT_STREAM = 0
RUN_STREAM = 1


@dataclass
class FitResult:
    state: steps.TrainState  # the best epoch's state when restore_best_weights, else the last
    history: list[dict]
    early_stopping: EarlyStopping
    num_params: int


def init_state(model_config: ModelConfig, train_config: TrainConfig, tx=None):
    """The model and its initial train state, from the seed alone."""
    model = build_model(model_config)
    root = jax.random.PRNGKey(train_config.seed)
    params = init_params(model, jax.random.fold_in(root, INIT_STREAM))
    tx = tx if tx is not None else steps.adam(train_config.learning_rate)
    state = steps.create_train_state(model, params, tx, jax.random.fold_in(root, RUN_STREAM))
    return model, state


@dataclass
class Trainer:
    """What an epoch needs, built once per run: the initial state and compiled functions."""

    model: CNN  # the training formulation
    eval_model: CNN  # the same function and parameters, formulated for evaluation
    state: steps.TrainState
    engine_name: str
    train_epoch: Callable  # (state, split) -> (state, totals)
    evaluate: Callable  # (state, split) -> totals


def build_trainer(model_config: ModelConfig, train_config: TrainConfig, *,
                  train_step: Callable = steps.train_step, tx=None) -> Trainer:
    model, state = init_state(model_config, train_config, tx)
    eval_model = build_model(model_config, purpose="eval")
    engine_name = engine.resolve_engine(train_config.engine, model.config.conv_impl)
    eval_step = functools.partial(steps.eval_step, apply_fn=eval_model.apply)
    return Trainer(model, eval_model, state, engine_name,
                   engine.make_train_epoch(train_config.batch_size, engine_name, train_step),
                   engine.make_evaluate(train_config.eval_batch_size, eval_step))


def fit(model_config: ModelConfig, train_config: TrainConfig, data: Dataset,
        out_dir: str | Path | None = None, *, name: str = "model",
        train_step: Callable = steps.train_step, tx=None,
        log: Callable[[str], None] = cli.log) -> FitResult:
    """Train with early stopping; validate on `data.test` after every epoch.

    Args:
      out_dir: where the run's files go (see the module docstring); None writes nothing.
      train_step: `(state, batch, key) -> (state, metrics)`, e.g. another loss.
      tx: an optax optimizer in place of Adam(learning_rate).
      log: receives one line per epoch (and a few notes).
    Returns:
      The final state (best weights restored per the config), history and stopping state.
    """
    cfg = train_config
    trainer = build_trainer(model_config, cfg, train_step=train_step, tx=tx)
    model, state, engine_name = trainer.model, trainer.state, trainer.engine_name
    num_params = count_params(state.params)
    train_split = engine.to_device(*data.train)
    val_split = engine.to_device(*data.test)
    stopper = EarlyStopping(mode=cfg.resolved_mode, patience=cfg.patience,
                            min_delta=cfg.min_delta)
    out = records.claim_run_dir(out_dir) if out_dir is not None else None
    if out is not None:
        records.write_json(out / records.CONFIG_FILE, run_description(
            trainer, cfg, num_params, name, data))
    checkpoint = BestCheckpoint(out / records.CHECKPOINT_DIR) if out is not None else None

    history: list[dict] = []
    best_state = None
    ev = trainer.eval_model.config
    log(f"[{name}] conv {model.config.conv_features}, {num_params:,} parameters, "
        f"engine {engine_name} ({model.config.conv_impl} conv, {model.config.pool_impl} pool; "
        f"eval {ev.conv_impl} conv, {ev.pool_impl} pool), "
        f"{len(data.train.labels):,} train / {len(data.test.labels):,} val examples")
    sampler = ResourceSampler(cfg.resource_interval_s)
    try:
        log(f"[{name}] {sampler.gpu_note}")
        for epoch in range(1, cfg.epochs + 1):
            cli.progress(f"[{name}] epoch {epoch}/{cfg.epochs} running...")
            sampler.begin_epoch()
            start = time.perf_counter()
            state, train_totals = trainer.train_epoch(state, train_split)
            val_totals = trainer.evaluate(state, val_split)
            # The epoch's one host sync: both sets of totals at once.
            train_totals, val_totals = jax.device_get((train_totals, val_totals))
            seconds = time.perf_counter() - start
            row = {"epoch": epoch, **engine.mean_metrics("train", train_totals),
                   **engine.mean_metrics("val", val_totals),
                   "epoch_time_s": seconds, **sampler.end_epoch()}
            if not math.isfinite(row["train_loss"]):
                raise TrainingDiverged(f"[{name}] epoch {epoch}: training loss is "
                                       f"{row['train_loss']}; lower the learning rate")
            stopper = stopper.update(epoch, row[cfg.monitor])
            row["improved"] = stopper.improved
            if stopper.improved:
                # A copy: the next epoch donates (and so invalidates) the state's buffers.
                best_state = jax.tree.map(jnp.copy, state)
                if checkpoint is not None:
                    checkpoint.save(epoch, state, {k: row[k] for k in (
                        "train_loss", "train_accuracy", "val_loss", "val_accuracy")})
            history.append(row)
            if out is not None:
                records.write_history(out / records.HISTORY_FILE, history)
            log(format_epoch(name, epoch, cfg.epochs, row, sampler.has_gpu))
            if stopper.should_stop:
                log(f"[{name}] early stop after epoch {epoch}: no {cfg.monitor} improvement for "
                    f"{stopper.wait} epochs; best epoch {stopper.best_epoch}")
                break
    finally:
        sampler.close()
        if checkpoint is not None:
            checkpoint.close()

    if cfg.restore_best_weights and best_state is not None:
        state = best_state
    if out is not None:
        records.write_json(out / records.RESULT_FILE, {
            "name": name,
            "monitor": cfg.monitor,
            "best_epoch": stopper.best_epoch,
            "best_value": stopper.best,
            "stopped_epoch": stopper.stopped_epoch,
            "epochs_run": len(history),
            "restored_best_weights": cfg.restore_best_weights and best_state is not None,
            "best_checkpoint": (f"{records.CHECKPOINT_DIR}/{stopper.best_epoch}"
                                if stopper.best_epoch is not None else None),
        })
    return FitResult(state, history, stopper, num_params)


def format_epoch(name: str, epoch: int, epochs: int, row: dict, has_gpu: bool) -> str:
    """One line per epoch, Keras' metrics followed by the notebook's resource figures."""
    mark = "*" if row.get("improved") else " "
    line = (f"[{name}] epoch {epoch:>{len(str(epochs))}}/{epochs}  "
            f"loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.4f}  "
            f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}{mark} "
            f"{row['epoch_time_s']:6.1f}s | cpu {row['cpu_percent_mean']:3.0f}% "
            f"(proc {row['process_cpu_percent_mean']:3.0f}%)  rss {row['rss_mb_peak']:,.0f} MB  "
            f"ram {row['ram_used_mb_peak']:,.0f} MB")
    if has_gpu and "gpu_util_percent_mean" in row:
        line += (f"  gpu {row['gpu_util_percent_mean']:3.0f}% (peak {row['gpu_util_percent_peak']:.0f}%)"
                 f"  vram {row['vram_used_mb_peak']:,.0f}/{row['vram_total_mb']:,.0f} MB")
    return line


def run_description(trainer: Trainer, train_config: TrainConfig, num_params: int, name: str,
                    data: Dataset) -> dict:
    """What config.json records: enough to rerun and to know where the run ran."""
    return {
        "name": name,
        "model": to_dict(trainer.model.config),
        "eval_formulation": {"conv_impl": trainer.eval_model.config.conv_impl,
                             "pool_impl": trainer.eval_model.config.pool_impl},
        "train": {**to_dict(train_config), "engine": trainer.engine_name,
                  "mode": train_config.resolved_mode},
        "num_params": num_params,
        "data": {"train_examples": len(data.train.labels),
                 "val_examples": len(data.test.labels)},
        "versions": resources.package_versions(
            "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow-datasets"),
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in jax.local_devices()],
        "host": {"machine": platform.machine(), "cpu_model": resources.cpu_model(),
                 "cpu_count": os.cpu_count()},
    }


def main(argv=None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m mnist_jax.train",
        description="Train one CNN on MNIST with the notebook's protocol and write its run "
                    "folder (config, history, best checkpoint, summary, curves).")
    parser.add_argument("--conv", type=cli.int_tuple, default=(32, 32), metavar="F,F,...",
                        help="conv features, one per conv block (default: 32,32)")
    cli.add_training_args(parser, default_out="runs/train")
    args = parser.parse_args(argv)

    def run():
        model_config = cli.model_config(args, ModelConfig(conv_features=args.conv))
        train_config = cli.train_config(args)
        out = cli.check_out_dir(args.out, args.default_out)
        data = cli.load_data(args)
        name = "conv" + "-".join(map(str, model_config.conv_features))
        fit(model_config, train_config, data, out, name=name)
        summary = report.write_study_report(out, [out])
        print(report.format_table(summary))
        print(f"wrote {out}")

    return cli.run_main(run)


if __name__ == "__main__":
    sys.exit(main())
