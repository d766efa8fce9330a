"""fit(): the one place where data, model, steps, engine, early stopping, checkpoints and
resource sampling are wired together. Also `python -m mnist_jax.train`, one model's run.

A run trains `TrainConfig.seeds` independent seeds of one model together; the state is one
pytree with a leading seed axis. Per epoch: `run_epoch` (train, validate, one host fetch),
then per seed on the host: a finite check, Keras' early stopping, the best-state keeper
and the checkpoint. The run goes on until every seed has stopped; a stopped seed is not
trained again, so nothing recorded for it changes. At the end each seed's restored best
weights are evaluated once on the test split. What is written where: recorder.py.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import cli, engine, report, steps
from mnist_jax import resources
from mnist_jax.config import ModelConfig, TrainConfig, to_dict
from mnist_jax.data import Splits
from mnist_jax.early_stopping import EarlyStopping
from mnist_jax.model import CNN, build_model, count_params, init_params
from mnist_jax.recorder import Recorder, seed_checkpoint_dir
from mnist_jax.resources import ResourceSampler

INIT_STREAM = 0
RUN_STREAM = 1


def new_state(model: CNN, tx, seed: int) -> steps.TrainState:
    """One seed's initial train state, from the seed alone: parameters from one stream of
    its key, and the `rng` every later draw (dropout, shuffling) derives from."""
    root = jax.random.PRNGKey(seed)
    params = init_params(model, jax.random.fold_in(root, INIT_STREAM))
    return steps.create_train_state(model, params, tx, jax.random.fold_in(root, RUN_STREAM))


def init_state(model_config: ModelConfig, train_config: TrainConfig, tx=None, seed=None):
    """The model and one seed's initial train state (default seed: train_config.seed)."""
    model = build_model(model_config)
    tx = tx if tx is not None else steps.adam(train_config.learning_rate)
    return model, new_state(model, tx, train_config.seed if seed is None else seed)


def init_states(model_config: ModelConfig, train_config: TrainConfig, tx=None):
    """The model and every seed's initial state, stacked on a leading seed axis [K, ...].
    Seed i's state is exactly init_state(..., seed=train_config.seed + i)'s."""
    model = build_model(model_config)
    tx = tx if tx is not None else steps.adam(train_config.learning_rate)
    return model, engine.stack_seeds([new_state(model, tx, seed)
                                      for seed in train_config.seed_values])


@dataclass
class Run:
    """What the epochs need, built once: the formulations, initial states, compiled epochs."""

    model: CNN  # the training formulation
    eval_model: CNN  # the same function and parameters, formulated for evaluation
    states: steps.TrainState  # every leaf has a leading seed axis [K, ...]
    epochs: engine.Epochs


def build_run(model_config: ModelConfig, train_config: TrainConfig, *,
              train_step: Callable = steps.train_step, eval_step: Callable | None = None,
              tx=None) -> Run:
    """`eval_step(state, batch) -> (metrics, predictions)` defaults to steps.eval_step with
    the evaluation formulation of the model."""
    model, states = init_states(model_config, train_config, tx)
    eval_model = build_model(model_config, purpose="eval")
    engine_name = engine.resolve_engine(train_config.engine, model.config.conv_impl)
    layout = engine.resolve_layout(train_config.layout, engine_name)
    eval_step = eval_step or functools.partial(steps.eval_step, apply_fn=eval_model.apply)
    epochs = engine.compile_epochs(train_config.batch_size, train_config.eval_batch_size,
                                   engine_name, layout, train_step, eval_step)
    return Run(model, eval_model, states, epochs)


def run_epoch(epochs: engine.Epochs, states, train_split: engine.Split,
              val_split: engine.Split, active: list[bool]):
    """One epoch as fit() runs it (the benchmark times this same function): train the
    active seeds, validate, and fetch both sets of totals in the epoch's one host sync.
    Returns (states, train_totals, val_totals), the totals as numpy arrays [K]."""
    states, train_totals = epochs.train(states, train_split, active)
    val_totals, _ = epochs.evaluate(states, val_split)
    train_totals, val_totals = jax.device_get((train_totals, val_totals))
    return states, train_totals, val_totals


@dataclass
class SeedResult:
    seed: int
    early_stopping: EarlyStopping
    epochs_run: int = 0
    diverged_epoch: int | None = None
    test: dict | None = None  # test_loss, test_accuracy of the restored weights

    @property
    def active(self) -> bool:
        return not self.early_stopping.should_stop and self.diverged_epoch is None


@dataclass
class FitResult:
    states: steps.TrainState  # per seed: the best epoch's state when restore_best_weights
    history: list[dict]  # one row per seed per epoch it trained
    seeds: list[SeedResult]
    num_params: int

    @property
    def diverged(self) -> list[int]:
        return [s.seed for s in self.seeds if s.diverged_epoch is not None]


def fit(model_config: ModelConfig, train_config: TrainConfig, splits: Splits,
        out_dir: str | os.PathLike | None = None, *, name: str = "model",
        train_step: Callable = steps.train_step, eval_step: Callable | None = None, tx=None,
        log: Callable[[str], None] = cli.log) -> FitResult:
    """Train `train_config.seeds` seeds with early stopping on `splits.val`; evaluate each
    seed's restored weights once on `splits.test`.

    Args:
      out_dir: where the run's files go (recorder.py); None writes nothing.
      train_step: `(state, batch, key) -> (state, metrics)`, e.g. another loss.
      eval_step: `(state, batch) -> (metrics, predictions)`, for validation and test.
      tx: an optax optimizer in place of Adam(learning_rate).
      log: receives one line per epoch (and a few notes).
    """
    cfg = train_config
    run = build_run(model_config, cfg, train_step=train_step, eval_step=eval_step, tx=tx)
    states = run.states
    num_params = count_params(engine.seed_slice(states.params, 0))
    train_split, val_split = engine.to_device(*splits.train), engine.to_device(*splits.val)
    recorder = Recorder(out_dir, cfg.seed_values)
    recorder.write_config(run_description(run, cfg, num_params, name, splits))
    seeds = [SeedResult(seed, EarlyStopping(mode=cfg.resolved_mode, patience=cfg.patience,
                                            min_delta=cfg.min_delta))
             for seed in cfg.seed_values]
    best = jax.tree.map(jnp.copy, states)  # per seed, the state of its best epoch so far
    history: list[dict] = []
    log(describe_start(name, run, cfg, num_params, splits))
    sampler = ResourceSampler(cfg.resource_interval_s)
    try:
        log(f"[{name}] {sampler.gpu_note}")
        for epoch in range(1, cfg.epochs + 1):
            active = [s.active for s in seeds]
            if not any(active):
                break
            cli.progress(f"[{name}] epoch {epoch}/{cfg.epochs} running...")
            sampler.begin_epoch()
            start = time.perf_counter()
            states, train_totals, val_totals = run_epoch(run.epochs, states, train_split,
                                                         val_split, active)
            shared = {"epoch_time_s": time.perf_counter() - start,
                      "seeds_trained": sum(active), **sampler.end_epoch()}
            rows = [end_of_epoch(seeds[i], epoch, cfg.monitor, train_totals, val_totals, i,
                                 shared) for i in np.flatnonzero(active)]
            improved = [active[i] and seed.early_stopping.improved
                        and seed.diverged_epoch is None for i, seed in enumerate(seeds)]
            if any(improved):
                # A copy: the next epoch donates (and so invalidates) the states' buffers.
                best = engine.keep_best(best, states, jnp.asarray(improved))
                for i in np.flatnonzero(improved):
                    row = next(r for r in rows if r["seed"] == seeds[i].seed)
                    recorder.save_best(seeds[i].seed, epoch, engine.seed_slice(states, i), {
                        k: row[k] for k in ("train_loss", "train_accuracy", "val_loss",
                                            "val_accuracy")})
            history += rows
            recorder.write_history(history)
            log(format_epoch(name, epoch, cfg.epochs, rows, sampler.has_gpu))
            for i in np.flatnonzero(active):
                log_stop(log, name, seeds[i], epoch, cfg.monitor, len(seeds) > 1)
    finally:
        sampler.close()
        recorder.close()

    final = best if cfg.restore_best_weights else states
    evaluate_test(run, final, splits, seeds, recorder)
    recorder.write_result({
        "name": name,
        "monitor": cfg.monitor,
        "validation": splits.validation,
        "restored_best_weights": cfg.restore_best_weights,
        "seeds": [seed_record(s) for s in seeds],
    })
    return FitResult(final, history, seeds, num_params)


def end_of_epoch(seed: SeedResult, epoch: int, monitor: str, train_totals, val_totals,
                 i: int, shared: dict) -> dict:
    """Seed i's history row for `epoch`; updates its early stopping (or marks it diverged)."""
    pick = lambda totals: {k: np.asarray(v)[i] for k, v in totals.items()}  # noqa: E731
    row = {"epoch": epoch, "seed": seed.seed, **engine.mean_metrics("train", pick(train_totals)),
           **engine.mean_metrics("val", pick(val_totals))}
    seed.epochs_run = epoch
    if not all(math.isfinite(row[k]) for k in ("train_loss", "val_loss")):
        seed.diverged_epoch = epoch
        row.update(improved=False, diverged=True)
    else:
        seed.early_stopping = seed.early_stopping.update(epoch, row[monitor])
        row.update(improved=seed.early_stopping.improved, diverged=False)
    return {**row, **shared}


def log_stop(log, name: str, seed: SeedResult, epoch: int, monitor: str, several: bool) -> None:
    who = f"[{name}] seed {seed.seed}" if several else f"[{name}]"
    es = seed.early_stopping
    if seed.diverged_epoch == epoch:
        log(f"{who} diverged in epoch {epoch} (loss not finite): stopped; its best epoch so "
            f"far ({es.best_epoch}) is kept")
    elif es.stopped_epoch == epoch:
        log(f"{who} early stop after epoch {epoch}: no {monitor} improvement for "
            f"{es.wait} epochs; best epoch {es.best_epoch}")


def evaluate_test(run: Run, final, splits: Splits, seeds: list[SeedResult],
                  recorder: Recorder) -> None:
    """Every seed's final (restored) weights on the test split, once."""
    totals, predictions = run.epochs.evaluate(final, engine.to_device(*splits.test))
    totals, predictions = jax.device_get((totals, predictions))
    for seed, means in zip(seeds, engine.per_seed_means("test", totals)):
        seed.test = means
    recorder.write_predictions(splits.test.labels, np.asarray(predictions), splits.test.images)


def seed_record(seed: SeedResult) -> dict:
    es = seed.early_stopping
    return {
        "seed": seed.seed,
        "best_epoch": es.best_epoch,
        "best_value": es.best,
        "stopped_epoch": es.stopped_epoch,
        "epochs_run": seed.epochs_run,
        "diverged_epoch": seed.diverged_epoch,
        "best_checkpoint": (f"{seed_checkpoint_dir(seed.seed)}/{es.best_epoch}"
                            if es.best_epoch is not None else None),
        **(seed.test or {}),
    }


def describe_start(name: str, run: Run, cfg: TrainConfig, num_params: int,
                   splits: Splits) -> str:
    m, ev = run.model.config, run.eval_model.config
    seeds = cfg.seed_values
    return (f"[{name}] conv {m.conv_features}, {num_params:,} parameters, "
            f"{len(seeds)} seed(s) {seeds[0]}..{seeds[-1]} ({run.epochs.layout}), engine "
            f"{run.epochs.engine} ({m.conv_impl} conv, {m.pool_impl} pool; eval {ev.conv_impl} "
            f"conv, {ev.pool_impl} pool), {len(splits.train.labels):,} train / "
            f"{len(splits.val.labels):,} val ({splits.validation}) / "
            f"{len(splits.test.labels):,} test examples")


def format_epoch(name: str, epoch: int, epochs: int, rows: list[dict], has_gpu: bool) -> str:
    """One line per epoch: Keras' metrics (means over the seeds trained, and each seed's
    val_acc, * where it improved), then the notebook's resource figures."""
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    val_acc = "  ".join(f"{r['val_accuracy']:.4f}{'*' if r['improved'] else ' '}" for r in rows)
    r0 = rows[0]  # the resource columns are shared by the seeds
    line = (f"[{name}] epoch {epoch:>{len(str(epochs))}}/{epochs}  "
            f"loss {mean('train_loss'):.4f}  acc {mean('train_accuracy'):.4f}  "
            f"val_loss {mean('val_loss'):.4f}  val_acc {val_acc} "
            f"{r0['epoch_time_s']:6.1f}s | cpu {r0['cpu_percent_mean']:3.0f}% "
            f"(proc {r0['process_cpu_percent_mean']:3.0f}%)  rss {r0['rss_mb_peak']:,.0f} MB  "
            f"ram {r0['ram_used_mb_peak']:,.0f} MB")
    if has_gpu and "gpu_util_percent_mean" in r0:
        line += (f"  gpu {r0['gpu_util_percent_mean']:3.0f}% (peak {r0['gpu_util_percent_peak']:.0f}%)"
                 f"  vram {r0['vram_used_mb_peak']:,.0f}/{r0['vram_total_mb']:,.0f} MB")
    return line


def run_description(run: Run, train_config: TrainConfig, num_params: int, name: str,
                    splits: Splits) -> dict:
    """What config.json records: enough to rerun and to know where the run ran."""
    return {
        "name": name,
        "model": to_dict(run.model.config),
        "eval_formulation": {"conv_impl": run.eval_model.config.conv_impl,
                             "pool_impl": run.eval_model.config.pool_impl},
        "train": {**to_dict(train_config), "engine": run.epochs.engine,
                  "layout": run.epochs.layout, "mode": train_config.resolved_mode,
                  "seed_values": list(train_config.seed_values)},
        "num_params": num_params,
        "forward_flops_per_image": run.model.config.forward_flops,
        "data": {"validation": splits.validation,
                 "train_examples": len(splits.train.labels),
                 "val_examples": len(splits.val.labels),
                 "test_examples": len(splits.test.labels)},
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
        splits = cli.load_splits(args)
        name = "conv" + "-".join(map(str, model_config.conv_features))
        result = fit(model_config, train_config, splits, out, name=name)
        summary = report.write_study_report(out, [out])
        print(report.format_text(summary))
        print(f"wrote {out}")
        cli.check_finite([(name, result.diverged)])

    return cli.run_main(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
