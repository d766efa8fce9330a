"""Progress bars for a run (tqdm, on stderr): one for the epochs, one for the steps of the
current epoch (all seeds together), with rate and ETA. Only on a terminal by default; in
logs and pipes the run prints its one line per epoch and nothing else.

The steps bar moves once per finished chunk of the compiled epoch (engine.compile_epochs'
`chunks`), never per step, so it costs the epoch nothing measurable (benchmarks/
epoch_speed.py --progress). Every chunk is also where an interrupt is honoured.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from mnist_jax import interrupts


class Progress:
    def __init__(self, name: str, epochs: int, done: int = 0, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.name = name
        self._run = tqdm(total=epochs, initial=done, desc=f"[{name}] epochs", unit="epoch",
                         position=0, leave=False, file=sys.stderr, disable=not self.enabled,
                         dynamic_ncols=True)
        self._epoch = None

    def epoch_started(self, epoch: int, total_steps: int):
        """The chunk callback for `epoch`: moves the steps bar, honours an interrupt."""
        if not self.enabled:
            return lambda steps: interrupts.check()
        self._close_epoch()
        self._epoch = tqdm(total=total_steps, desc=f"[{self.name}] epoch {epoch}", unit="step",
                           position=1, leave=False, file=sys.stderr, dynamic_ncols=True)

        def on_chunk(steps: int) -> None:
            self._epoch.update(steps)
            interrupts.check()

        return on_chunk

    def epoch_ended(self) -> None:
        self._close_epoch()
        self._run.update(1)

    def _close_epoch(self) -> None:
        if self._epoch is not None:
            self._epoch.close()
            self._epoch = None

    def close(self) -> None:
        self._close_epoch()
        self._run.close()
