"""What a run writes into its folder, in one place: fit() says what happened, this module
decides where it goes. With no folder (out_dir None) every call does nothing.

A run folder holds:
  config.json          what ran: the model (class, fields, parameter count, FLOPs where
                       known, variable collections), loss, optimizer, batch transform and
                       steps; the training protocol, seeds, data; library versions, devices
  history.csv          one row per seed per epoch it trained: train/val loss and accuracy,
                       whether it improved, epoch time, resources (shared by the seeds)
  result.json          per seed: best and stop epochs, best value, whether it diverged, its
                       test loss and accuracy on the restored weights, its checkpoint (a
                       seed that diverged before any improvement: no result, all null)
  test_predictions.npz the test labels, every seed's predicted classes, and the images
                       some seed got wrong (what the report's figures need)
  checkpoints/seed_<S>/best/<epoch>/   Orbax checkpoint of seed S's best train state
  checkpoints/latest/<epoch>/          every seed's train state and best state after the
                       last finished epoch, for --resume (history.csv holds the rest)
  .lock                held by the process writing the folder (records.RunDir)
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from mnist_jax import processes, records
from mnist_jax.checkpointing import BestCheckpoint, LatestCheckpoint
from mnist_jax.errors import UserError

LATEST_DIR = "checkpoints/latest"


def seed_checkpoint_dir(seed: int) -> str:
    """The best-checkpoint folder of one seed, relative to its run folder."""
    return f"checkpoints/seed_{seed}/best"


def is_finished(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / records.RESULT_FILE).is_file()


def finished_with_settings(run_dir: str | os.PathLike, model, train_config, splits,
                           parts=None) -> bool:
    """For --resume: whether the run in `run_dir` is finished, and then was run with these
    settings and parts (else a one-line error: resuming must not mix settings in one study).
    `model`: a ModelConfig or a Flax module; `parts`: run.Parts (None: the defaults)."""
    if not is_finished(run_dir):
        return False
    from mnist_jax.run import expected_settings  # builds the model: only when needed

    check_same_settings(run_dir, expected_settings(model, train_config, parts,
                                                   splits.train.images.shape[1:]), splits)
    return True


def check_same_settings(run_dir: str | os.PathLike, expected: dict, splits) -> None:
    """Refuse (one line, naming the differences) a run folder whose config.json records
    other settings than `expected` (run.expected_settings: model, loss, optimizer,
    transform, steps, training protocol) or another data slice. Settings left "auto" are
    not compared (the run recorded what they resolved to); a setting its config.json does
    not record (written by an earlier version) counts as None there."""
    path = Path(run_dir) / records.CONFIG_FILE
    if not os.path.lexists(path):
        raise UserError(missing_config(run_dir))
    given = {**expected, "data": splits.record()}
    try:
        saved = records.read_json(path)
        if not isinstance(saved, dict):
            raise TypeError(f"a JSON {type(saved).__name__}, not an object")
        differences = [f"{key}: {_shown(saved, key)} there, {value!r} now"
                       for key, value in _leaves(records.json_roundtrip(given))
                       if value != "auto" and _at(saved, key) != value]
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"cannot resume: {path} is damaged ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if differences:
        raise UserError(f"cannot resume {run_dir}: it was started with other settings "
                        f"({'; '.join(differences[:3])})")


def missing_config(run_dir: str | os.PathLike) -> str:
    """Why a started run without config.json cannot be resumed (or kept as finished)."""
    held = [name for name in records.RUN_CONTENTS if (Path(run_dir) / name).exists()]
    return (f"cannot resume {run_dir}: its {records.CONFIG_FILE} is missing, so the settings "
            f"it was started with cannot be checked (it holds {', '.join(held)}); start it "
            f"again in a new --out")


def _shown(saved: dict, dotted: str) -> str:
    """A saved setting as the refusal shows it: its value, or that it is not recorded."""
    *parents, last = dotted.split(".")
    for part in parents:
        saved = saved.get(part) if isinstance(saved, dict) else None
    return repr(saved[last]) if isinstance(saved, dict) and last in saved else "not recorded"


def _leaves(tree: dict, prefix: str = ""):
    """(dotted key, value) of every non-dict value of nested dicts."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _at(tree: dict, dotted: str):
    """The value at a dotted key of nested dicts (None where absent)."""
    for part in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


class Recorder:
    """Writes one run's folder. `resume=True` takes a folder an earlier run of the same
    config left (or a new one); otherwise the folder must be new or empty.

    Of several processes (processes.py), process 0 writes the files and every process
    writes its part of the checkpoints (Orbax); a write that fails stops them all."""

    def __init__(self, out_dir: str | os.PathLike | records.RunDir | None,
                 seeds: tuple[int, ...], resume: bool = False):
        # A folder not claimed yet is claimed here (by process 0), and released by close().
        self._owns_dir = out_dir is not None and not isinstance(
            out_dir, (records.RunDir, records.SharedDir))
        if self._owns_dir:
            with processes.agreed():
                self._dir = (records.RunDir(out_dir, resume=resume) if processes.is_writer()
                             else records.SharedDir(out_dir))
        else:
            self._dir = out_dir
        self.out = self._dir.path if self._dir is not None else None
        self.seeds = seeds
        self._checkpoints: dict[int, BestCheckpoint] = {}
        self._latest: LatestCheckpoint | None = None

    def _write(self, write) -> None:
        """`write()` on process 0 (every process waits to hear that it worked)."""
        if self.out is not None:
            with processes.agreed():
                if processes.is_writer():
                    write()

    def write_config(self, description: dict) -> None:
        self._write(lambda: records.write_json(self.out / records.CONFIG_FILE, description))

    def check_resumable(self, expected: dict, splits) -> None:
        """Refuse to resume a finished run, one started with other settings than
        `expected` (run.expected_settings), or one whose config.json is gone (its settings
        cannot be checked). A folder holding none of a run's files starts afresh."""
        if self.out is None:
            return
        with processes.agreed():  # every process reads the folder before any writes to it
            if is_finished(self.out):
                raise UserError(f"{self.out} holds a finished run: nothing to resume")
            if os.path.lexists(self.out / records.CONFIG_FILE):
                check_same_settings(self.out, expected, splits)
            elif any((self.out / name).exists() for name in records.RUN_CONTENTS):
                raise UserError(missing_config(self.out))
            # else: stopped before writing anything (config.json is the run's first file)

    def read_history(self) -> list[dict]:
        path = self.out / records.HISTORY_FILE if self.out is not None else None
        if path is None or not path.exists():
            return []
        try:
            return records.read_history(path)
        except OSError as e:  # permissions, an I/O error: unreadable, not damaged
            raise UserError(f"cannot resume: {path} cannot be read ({e.strerror or e})") from None
        except ValueError as e:
            raise UserError(f"cannot resume: {path} is damaged ({e})") from None

    def latest(self, like_states, like_best):
        """(epoch, states, best) of the last finished epoch on disk, or None."""
        if self.out is None or not self._latest_checkpoint().epoch:
            return None
        return self._latest_checkpoint().restore(like_states, like_best)

    def save_latest(self, epoch: int, states, best) -> None:
        if self.out is not None:
            self._latest_checkpoint().save(epoch, states, best)

    def _latest_checkpoint(self) -> LatestCheckpoint:
        if self._latest is None:
            self._latest = LatestCheckpoint(self.out / LATEST_DIR)
        return self._latest

    def keep_only_best(self, seed: int, epoch: int | None, state, metrics: dict) -> None:
        """On resume: seed `seed`'s best checkpoint is `epoch`'s (None: no checkpoint)."""
        if self.out is not None:
            self._best_checkpoint(seed).keep_only(epoch, state, metrics)

    def write_history(self, history: list[dict]) -> None:
        self._write(lambda: records.write_history(self.out / records.HISTORY_FILE, history))

    def save_best(self, seed: int, epoch: int, state, metrics: dict[str, float]) -> None:
        """Seed `seed`'s state as its best checkpoint (replacing its previous best)."""
        if self.out is not None:
            self._best_checkpoint(seed).save(epoch, state, metrics)

    def _best_checkpoint(self, seed: int) -> BestCheckpoint:
        if seed not in self._checkpoints:
            self._checkpoints[seed] = BestCheckpoint(self.out / seed_checkpoint_dir(seed))
        return self._checkpoints[seed]

    def write_result(self, result: dict) -> None:
        self._write(lambda: records.write_json(self.out / records.RESULT_FILE, result))

    def write_predictions(self, labels: np.ndarray, predictions: np.ndarray,
                          images: np.ndarray, seeds: list[int] | None = None) -> None:
        """labels [N], predictions [K, N] (one row per seed of `seeds`, default every seed
        of the run; a seed without a result is left out) and the images [N, H, W, C], of
        which only those some seed misclassified are kept."""
        seeds = self.seeds if seeds is None else seeds

        def write():
            wrong = np.flatnonzero((predictions != labels[None, :]).any(axis=0))
            buffer = io.BytesIO()
            np.savez_compressed(buffer, seeds=np.asarray(seeds, np.int64),
                                labels=labels.astype(np.int8),
                                predictions=predictions.astype(np.int8),
                                wrong_indices=wrong, wrong_images=images[wrong, ..., 0])
            records.atomic_write_bytes(self.out / records.PREDICTIONS_FILE, buffer.getvalue())
        self._write(write)

    def close(self, failed: bool = False) -> None:
        """Close the checkpoint managers and end a claim made here (undone if the run
        `failed` before writing anything)."""
        errors = []
        for checkpoint in [*self._checkpoints.values(), *filter(None, [self._latest])]:
            try:
                checkpoint.close()
            except Exception as e:  # close every manager; report the first failure
                errors.append(e)
        self._checkpoints, self._latest = {}, None
        if self._owns_dir:
            self._dir.release(failed)
        if errors:
            raise errors[0]
