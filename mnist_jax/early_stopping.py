"""Early stopping as a pure value, with the semantics of Keras 3's EarlyStopping callback
(keras/src/callbacks/early_stopping.py, 3.15), epochs numbered from 1 here:

- an epoch improves iff `value - min_delta > best` (mode "max") or `value + min_delta < best`
  (mode "min"): strict, so a tie is no improvement and the first best epoch is kept;
  the first monitored epoch always improves (best starts unset), NaN never does;
- `wait` counts epochs since the last improvement; training stops at the end of the epoch
  where `wait >= patience` (never after the first epoch);
- with a `baseline`, an improvement resets `wait` only if it also beats the baseline;
- epochs before `start_from_epoch` are ignored;
- the best weights are restored at the end of training whether or not it stopped early
  (the loop does that from `best_epoch`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class EarlyStopping:
    mode: str = "max"  # "max" | "min"
    patience: int = 5
    min_delta: float = 0.0
    baseline: float | None = None
    start_from_epoch: int = 0  # Keras' 0-based count: epochs 1..start_from_epoch are ignored

    # What has been seen so far.
    best: float | None = None
    best_epoch: int | None = None
    wait: int = 0
    stopped_epoch: int | None = None
    improved: bool = False  # whether the latest update improved

    @property
    def should_stop(self) -> bool:
        return self.stopped_epoch is not None

    def _beats(self, value: float, reference: float | None) -> bool:
        if reference is None:
            return True  # as Keras: the first monitored value is the best so far, even NaN
        delta = abs(self.min_delta)
        if self.mode == "max":
            return value - delta > reference
        return value + delta < reference

    def update(self, epoch: int, value: float) -> "EarlyStopping":
        """The state after `epoch` (1-based) ended with the monitored `value`."""
        if epoch <= self.start_from_epoch:
            return dataclasses.replace(self, improved=False)
        wait = self.wait + 1
        if self._beats(value, self.best):
            beats_baseline = self.baseline is None or self._beats(value, self.baseline)
            return dataclasses.replace(self, best=value, best_epoch=epoch,
                                       wait=0 if beats_baseline else wait, improved=True)
        stopped = epoch if wait >= self.patience and epoch > 1 else None
        return dataclasses.replace(self, wait=wait, stopped_epoch=stopped, improved=False)
