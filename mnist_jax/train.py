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

import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import cli, engine, interrupts, records, report, steps
from mnist_jax import resources
from mnist_jax.config import ModelConfig, TrainConfig
from mnist_jax.data import Splits
from mnist_jax.early_stopping import EarlyStopping
from mnist_jax.errors import UserError
from mnist_jax.model import CNN
from mnist_jax.progress import Progress
from mnist_jax.run import Parts, Run, build_run, expected_settings, train_record
from mnist_jax.run import init_state, init_states  # noqa: F401  (the public names)
from mnist_jax.recorder import (LATEST_DIR, Recorder, finished_with_settings,
                               seed_checkpoint_dir)
from mnist_jax.resources import ResourceSampler

def run_epoch(epochs: engine.Epochs, states, train_split: engine.Split,
              val_split: engine.Split, active: list[bool], on_chunk=None
              ) -> tuple[steps.TrainState, dict, dict]:
    """One epoch as fit() runs it (the benchmark times this same function): train the
    active seeds, validate, and fetch both sets of totals in the epoch's one host sync
    (besides waiting for each chunk when `on_chunk` reports progress).
    Returns (states, train_totals, val_totals), the totals as numpy arrays [K]."""
    states, train_totals = epochs.train(states, train_split, active, on_chunk)
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

    def active_at(self, epoch: int) -> bool:
        """Whether this seed trained in `epoch` and did not diverge there."""
        return self.epochs_run == epoch and self.diverged_epoch is None


@dataclass
class FitResult:
    states: steps.TrainState  # per seed: the best epoch's state when restore_best_weights
    history: list[dict]  # one row per seed per epoch it trained
    seeds: list[SeedResult]
    num_params: int

    @property
    def diverged(self) -> list[int]:
        return [s.seed for s in self.seeds if s.diverged_epoch is not None]


def fit(model: nn.Module | ModelConfig, train_config: TrainConfig, splits: Splits,
        out_dir: str | os.PathLike | records.RunDir | None = None, *, name: str = "model",
        resume: bool = False, loss_fn: steps.LossFn = steps.cross_entropy, tx=None,
        tx_name: str | None = None, batch_transform: steps.BatchTransform | None = None,
        train_step: Callable | None = None, eval_step: Callable | None = None,
        log: Callable[[str], None] = cli.log, progress: bool | None = None) -> FitResult:
    """Train `train_config.seeds` seeds with early stopping on `splits.val`; evaluate each
    seed's restored weights once on `splits.test`.

    Args:
      model: a ModelConfig (the CNN) or any Flax module called as `(images, *, train)`
        (and `mask=` if its __call__ takes one); its variable collections besides params
        (batch statistics) are trained, checkpointed and used by evaluation.
      out_dir: where the run's files go (recorder.py), claimed for this process
        (records.RunDir; or one already claimed); None writes nothing.
      resume: continue the run in `out_dir` after its last finished epoch (a new or empty
        folder starts afresh); refused if that run was started with other settings or parts.
      loss_fn: `(logits, labels, params) -> [B]` per example, for training, validation and
        test alike (cross-entropy and accuracy are reported beside it).
      tx, tx_name: an optax optimizer in place of Adam(train_config.learning_rate), and the
        name config.json records for it.
      batch_transform: `(batch, key) -> batch` on the device before each training step
        (augmentation), with the state's "augment" key stream.
      train_step: `(state, batch) -> (state, metrics)`, replacing the default step (which
        applies loss_fn and batch_transform); extra sums in `metrics` become history columns.
      eval_step: `(state, batch) -> (metrics, predictions)`, for validation and test.
      log: receives one line per epoch (and a few notes).
      progress: progress bars (tqdm, on stderr); None: when stderr is a terminal.

    A SIGINT or SIGTERM (interrupts.py) stops it at the next chunk of steps by raising
    interrupts.Interrupted; every finished epoch is on disk and resumable by then.
    """
    parts = Parts(loss_fn, tx, tx_name, batch_transform, train_step, eval_step)
    cfg = train_config
    recorder = Recorder(out_dir, cfg.seed_values, resume=resume)
    sampler = bars = None
    finished = False
    try:
        with interrupts.deferred():  # a signal waits for the next check(): never mid-JAX
            run = build_run(model, cfg, parts, image_shape=splits.train.images.shape[1:])
            seeds = [SeedResult(seed, EarlyStopping(mode=cfg.resolved_mode, patience=cfg.patience,
                                                    min_delta=cfg.min_delta))
                     for seed in cfg.seed_values]
            states = run.states
            best = jax.tree.map(jnp.copy, states)  # per seed, the state of its best epoch so far
            done, history = 0, []
            if resume:  # every refusal comes before the first write
                recorder.check_resumable(expected_settings(
                    model, cfg, parts, splits.train.images.shape[1:]), splits)
                done, states, best, history = resume_run(recorder, seeds, states, best, cfg.monitor)
            recorder.write_config(run_description(run, cfg, name, splits))
            log(describe_start(name, run, cfg, splits)
                + (f"; resuming after epoch {done}" if done else ""))
            place = run.epochs.placement
            train_split, val_split = place.to_device(*splits.train), place.to_device(*splits.val)
            sampler = ResourceSampler(cfg.resource_interval_s)
            log(f"[{name}] {sampler.gpu_note}")
            bars = Progress(name, cfg.epochs, done, progress)
            for epoch in range(done + 1, cfg.epochs + 1):
                interrupts.check()
                active = [s.active for s in seeds]
                if not any(active):
                    break
                sampler.begin_epoch()
                start = time.perf_counter()
                states, train_totals, val_totals = run_epoch(
                    run.epochs, states, train_split, val_split, active,
                    on_chunk=bars.epoch_started(epoch, sum(active) * engine.steps_per_epoch(
                        train_split.size, cfg.batch_size)))
                shared = {"epoch_time_s": time.perf_counter() - start,
                          "compiled": epoch == done + 1,  # this process's first: compiles
                          "seeds_trained": sum(active), **sampler.end_epoch()}
                rows = [end_of_epoch(seeds[i], epoch, cfg.monitor, train_totals, val_totals, i,
                                     shared) for i in np.flatnonzero(active)]
                best = keep_best(run.epochs, recorder, seeds, rows, epoch, states, best)
                history += rows
                recorder.write_history(history)
                recorder.save_latest(epoch, states, best)  # the epoch is finished on disk
                bars.epoch_ended()
                log(format_epoch(name, epoch, cfg.epochs, rows, sampler.has_gpu))
                for i in np.flatnonzero(active):
                    log_stop(log, name, seeds[i], epoch, cfg.monitor, len(seeds) > 1)
            bars.close()
            interrupts.check()  # a signal during the last epoch's save: the run resumes here
            final = best if cfg.restore_best_weights else states
            evaluate_test(run, final, splits, seeds, recorder)
            recorder.write_result(result_record(name, cfg, splits, seeds))
            # A signal during the test evaluation (one pass, not cut) stops here, with the
            # run finished on disk, rather than in the next model's first epoch.
            interrupts.check()
        finished = True
    finally:
        for part in (bars, sampler):
            if part is not None:
                part.close()
        recorder.close(failed=not finished)
    return FitResult(run.epochs.placement.real(final), history, seeds, run.num_params)


def keep_best(epochs: engine.Epochs, recorder: Recorder, seeds: list[SeedResult],
              rows: list[dict], epoch: int, states, best):
    """The best states after `epoch`: the improved seeds' new states, kept in memory (a
    copy, since the next epoch donates `states`) and saved as their best checkpoints."""
    improved = [s.active_at(epoch) and s.early_stopping.improved for s in seeds]
    if not any(improved):
        return best
    best = epochs.keep_best(best, states, np.asarray(improved))
    for i in np.flatnonzero(improved):
        row = next(r for r in rows if r["seed"] == seeds[i].seed)
        recorder.save_best(seeds[i].seed, epoch, engine.seed_slice(states, i),
                           {k: row[k] for k in BEST_METRICS})
    return best


BEST_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def resume_run(recorder: Recorder, seeds: list[SeedResult], states, best, monitor: str):
    """Where an earlier run in the recorder's folder stopped: (epochs done, states, best,
    history). Early stopping is rebuilt by replaying history.csv through the same pure
    updates, so it is exactly the state the run had; history rows of an epoch that did not
    finish (written before its latest checkpoint) are dropped, and each seed's best
    checkpoint is made to match its best epoch."""
    if recorder.out is None:  # nothing was written: a fresh start
        return 0, states, best, []
    point = recorder.latest(states, best)
    done, states, best = point if point is not None else (0, states, best)
    written = recorder.read_history()
    path = recorder.out / records.HISTORY_FILE
    if not all(isinstance(row.get(k), int) for row in written for k in ("epoch", "seed")):
        raise UserError(f"cannot resume: {path} is damaged (a row without a whole epoch "
                        f"and seed number)")
    history = [row for row in written if row["epoch"] <= done]
    if any(row["epoch"] > done + 1 for row in written):  # only epoch done + 1 may be unfinished
        raise UserError(f"cannot resume: {path} has epoch {max(r['epoch'] for r in written)} "
                        f"but the latest checkpoint ({LATEST_DIR}) is "
                        f"{f'epoch {done}' if done else 'missing'}")
    by_seed = {s.seed: s for s in seeds}
    for row in history:
        seed = by_seed.get(row["seed"])
        if seed is None:
            raise UserError(f"cannot resume: {path} has seed {row['seed']}, not one of "
                            f"{list(by_seed)}")
        if row["epoch"] != seed.epochs_run + 1 or not seed.active:
            after = (f"after it stopped in epoch {seed.epochs_run}" if not seed.active else
                     f"after its epoch {seed.epochs_run}" if seed.epochs_run else
                     "without its epoch 1")
            raise UserError(f"cannot resume: {path} has seed {seed.seed}'s epoch "
                            f"{row['epoch']} {after}")
        end_of_epoch(seed, row["epoch"], monitor, *replay_totals(row, path), 0, {})
    for seed in seeds:  # a seed still training then has a row for every epoch up to `done`
        if seed.active and seed.epochs_run != done:
            missing = sorted({seed.epochs_run + 1, done})
            raise UserError(f"cannot resume: {path} lacks seed {seed.seed}'s epoch"
                            f"{'s' if done > seed.epochs_run + 1 else ''} "
                            f"{'-'.join(map(str, missing))} (the latest checkpoint is epoch {done})")
    for i, seed in enumerate(seeds):
        rows = {r["epoch"]: r for r in history if r["seed"] == seed.seed}
        epoch = seed.early_stopping.best_epoch
        recorder.keep_only_best(seed.seed, epoch, engine.seed_slice(best, i),
                                {k: rows[epoch][k] for k in BEST_METRICS} if epoch else {})
    recorder.write_history(history)
    return done, states, best, history


def replay_totals(row: dict, path=records.HISTORY_FILE):
    """Totals that end_of_epoch turns back into `row`'s means (count 1: exact). A row of
    `path` that would replay as something it does not say is refused (UserError): a loss
    or accuracy missing or not finite in an epoch not marked diverged (replayed, it would
    mark the seed diverged, or move its best epoch, without a word), or an epoch marked
    diverged whose losses are finite."""
    where = f"cannot resume: {path} is damaged (seed {row['seed']}'s epoch {row['epoch']}"
    diverged = row.get("diverged") is True
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        value = row.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} has no number in column {key})")
        if not math.isfinite(value) and not diverged:
            raise UserError(f"{where} has {key} {value}, but is not marked diverged)")
    if diverged and all(math.isfinite(row[k]) for k in ("train_loss", "val_loss")):
        raise UserError(f"{where} is marked diverged, but its losses are finite)")
    one = lambda prefix: {"loss_sum": np.array([row[f"{prefix}_loss"]]),  # noqa: E731
                          "correct": np.array([row[f"{prefix}_accuracy"]]),
                          "count": np.array([1.0])}
    return one("train"), one("val")


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
    if seed.diverged_epoch == epoch and es.best_epoch is None:
        log(f"{who} diverged in epoch {epoch} (loss not finite) before any improvement: "
            f"stopped, with no result (no test figures, no checkpoint)")
    elif seed.diverged_epoch == epoch:
        log(f"{who} diverged in epoch {epoch} (loss not finite): stopped; its best epoch "
            f"({es.best_epoch}) is kept as its result")
    elif es.stopped_epoch == epoch:
        log(f"{who} early stop after epoch {epoch}: no {monitor} improvement for "
            f"{es.wait} epochs; best epoch {es.best_epoch}")


def evaluate_test(run: Run, final, splits: Splits, seeds: list[SeedResult],
                  recorder: Recorder) -> None:
    """Every seed's final (restored) weights on the test split, once. A seed without a
    best epoch (it diverged before any improvement: its `final` is its initial state), or
    whose final weights give a non-finite test loss (diverged, not restored), has no
    result: its `test` stays None and test_predictions.npz leaves it out."""
    totals, predictions = run.epochs.evaluate(final, run.epochs.placement.to_device(*splits.test))
    totals, predictions = jax.device_get((totals, predictions))
    kept = []
    for i, (seed, means) in enumerate(zip(seeds, engine.per_seed_means("test", totals))):
        usable = (seed.early_stopping.best_epoch is not None
                  and all(math.isfinite(v) for v in means.values()))
        seed.test = means if usable else None
        if usable:
            kept.append(i)
    recorder.write_predictions(splits.test.labels, np.asarray(predictions)[kept],
                               splits.test.images, seeds=[seeds[i].seed for i in kept])


def result_record(name: str, cfg: TrainConfig, splits: Splits, seeds: list[SeedResult]) -> dict:
    """What result.json records: the protocol and each seed's outcome."""
    return {"name": name, "monitor": cfg.monitor, "validation": splits.validation,
            "restored_best_weights": cfg.restore_best_weights,
            "seeds": [seed_record(s) for s in seeds]}


def seed_record(seed: SeedResult) -> dict:
    """One seed's outcome. `has_result` is false for a seed with no test figures (it
    diverged before any improvement): its test_* are null and so is its checkpoint."""
    es = seed.early_stopping
    return {
        "seed": seed.seed,
        "has_result": seed.test is not None,
        "outcome": seed_outcome(seed),
        "best_epoch": es.best_epoch,
        "best_value": es.best,
        "stopped_epoch": es.stopped_epoch,
        "epochs_run": seed.epochs_run,
        "diverged_epoch": seed.diverged_epoch,
        "best_checkpoint": (f"{seed_checkpoint_dir(seed.seed)}/{es.best_epoch}"
                            if es.best_epoch is not None else None),
        **(seed.test or {"test_loss": None, "test_accuracy": None}),
    }


def seed_outcome(seed: SeedResult) -> str:
    """How a seed's training ended, in words (result.json)."""
    es = seed.early_stopping
    if seed.diverged_epoch is not None and seed.test is None:
        return (f"diverged in epoch {seed.diverged_epoch} (loss not finite)"
                + (" before any improvement" if es.best_epoch is None else "")
                + ": no result")
    if seed.diverged_epoch is not None:
        return (f"diverged in epoch {seed.diverged_epoch} (loss not finite), after its best "
                f"epoch {es.best_epoch}, whose result is kept")
    if es.stopped_epoch is not None:
        return f"stopped early after epoch {es.stopped_epoch}; best epoch {es.best_epoch}"
    return f"ran {seed.epochs_run} epochs; best epoch {es.best_epoch}"


def describe_start(name: str, run: Run, cfg: TrainConfig, splits: Splits) -> str:
    seeds = cfg.seed_values
    return (f"[{name}] {describe_model(run)}, {run.num_params:,} parameters, "
            f"{len(seeds)} seed(s) {seeds[0]}..{seeds[-1]} ({run.epochs.layout}; "
            f"{run.epochs.placement.words()}), engine "
            f"{run.epochs.engine}, {len(splits.train.labels):,} train / "
            f"{len(splits.val.labels):,} val ({splits.validation}) / "
            f"{len(splits.test.labels):,} test examples")


def describe_model(run: Run) -> str:
    """The model in a few words: the CNN by its conv blocks and formulations, any other
    module by its class."""
    if isinstance(run.model, CNN):
        m, ev = run.model.config, run.eval_model.config
        return (f"conv {m.conv_features} ({m.conv_impl} conv, {m.pool_impl} pool; eval "
                f"{ev.conv_impl} conv, {ev.pool_impl} pool)")
    return type(run.model).__name__


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


def run_description(run: Run, train_config: TrainConfig, name: str, splits: Splits) -> dict:
    """What config.json records: what ran (model, loss, optimizer, transform, steps), the
    protocol, the data, and where it ran; enough to rerun it."""
    return {
        "name": name,
        **run.description,
        "train": {**train_record(train_config, run.parts), "engine": run.epochs.engine,
                  "layout": run.epochs.layout, "mode": train_config.resolved_mode,
                  "seed_values": list(train_config.seed_values)},
        "data": splits.record(),
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
        name = "conv" + "-".join(map(str, model_config.conv_features))
        with cli.claimed_out(args, lambda out: [out]) as claim:
            out = claim.path
            splits = cli.load_splits(args)
            if args.resume and finished_with_settings(out, model_config, train_config, splits):
                cli.log(f"[{name}] finished in an earlier run: kept")
            else:
                fit(model_config, train_config, splits, claim, name=name, resume=args.resume)
            from mnist_jax import study  # (study.py imports fit from here)

            study.write_report(out, [out])
            cli.check_finite([(name, report.diverged_seeds(out))])

    return cli.run_main(run, debug=args.debug, args=args)


if __name__ == "__main__":
    sys.exit(main())
