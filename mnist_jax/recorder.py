"""What a run writes into its folder, in one place: fit() says what happened, this module
decides where it goes. With no folder (out_dir None) every call does nothing.

A run folder holds:
  config.json          model and training configs, seeds, protocol, parameter count and
                       forward FLOPs, library versions, devices
  history.csv          one row per seed per epoch it trained: train/val loss and accuracy,
                       whether it improved, epoch time, resources (shared by the seeds)
  result.json          per seed: best and stop epochs, best value, whether it diverged, its
                       test loss and accuracy on the restored weights, its checkpoint
  test_predictions.npz the test labels, every seed's predicted classes, and the images
                       some seed got wrong (what the report's figures need)
  checkpoints/seed_<S>/best/<epoch>/   Orbax checkpoint of seed S's best train state
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from mnist_jax import records
from mnist_jax.checkpointing import BestCheckpoint

PREDICTIONS_FILE = "test_predictions.npz"


def seed_checkpoint_dir(seed: int) -> str:
    """The best-checkpoint folder of one seed, relative to its run folder."""
    return f"checkpoints/seed_{seed}/best"


class Recorder:
    def __init__(self, out_dir: str | os.PathLike | None, seeds: tuple[int, ...]):
        self.out = records.claim_run_dir(out_dir) if out_dir is not None else None
        self.seeds = seeds
        self._checkpoints: dict[int, BestCheckpoint] = {}

    def write_config(self, description: dict) -> None:
        if self.out is not None:
            records.write_json(self.out / records.CONFIG_FILE, description)

    def write_history(self, history: list[dict]) -> None:
        if self.out is not None:
            records.write_history(self.out / records.HISTORY_FILE, history)

    def save_best(self, seed: int, epoch: int, state, metrics: dict[str, float]) -> None:
        """Seed `seed`'s state as its best checkpoint (replacing its previous best)."""
        if self.out is None:
            return
        if seed not in self._checkpoints:
            self._checkpoints[seed] = BestCheckpoint(self.out / seed_checkpoint_dir(seed))
        self._checkpoints[seed].save(epoch, state, metrics)

    def write_result(self, result: dict) -> None:
        if self.out is not None:
            records.write_json(self.out / records.RESULT_FILE, result)

    def write_predictions(self, labels: np.ndarray, predictions: np.ndarray,
                          images: np.ndarray) -> None:
        """labels [N], predictions [K, N] (one row per seed) and the images [N, H, W, C],
        of which only those some seed misclassified are kept."""
        if self.out is None:
            return
        wrong = np.flatnonzero((predictions != labels[None, :]).any(axis=0))
        buffer = io.BytesIO()
        np.savez_compressed(buffer, seeds=np.asarray(self.seeds, np.int64),
                            labels=labels.astype(np.int8), predictions=predictions.astype(np.int8),
                            wrong_indices=wrong, wrong_images=images[wrong, ..., 0])
        records.atomic_write_bytes(self.out / PREDICTIONS_FILE, buffer.getvalue())

    def close(self) -> None:
        errors = []
        for checkpoint in self._checkpoints.values():
            try:
                checkpoint.close()
            except Exception as e:  # close every manager; report the first failure
                errors.append(e)
        self._checkpoints = {}
        if errors:
            raise errors[0]
