"""Checkpoints with Orbax, in `<dir>/<epoch>/`.

BestCheckpoint: one seed's best train state, saved only when the monitored metric improves
(Keras' ModelCheckpoint(save_best_only=True)). LatestCheckpoint: everything the next epoch
needs to resume (every seed's train state and best state so far), after every epoch.

Orbax writes each save into a temporary folder and renames it when complete, and the
managers here delete temporary folders left by a killed process when they open: a
checkpoint on disk is complete or absent, never half-written.

One CheckpointManager keeps the latest save (LatestN(1)); since a save happens only on an
improvement, the latest save is the best. Choosing "best" here rather than with Orbax's
BestN keeps Keras' tie rule (the first best epoch wins; BestN keeps the last) and lets the
early-stopping value own best_epoch. Saves are synchronous: the state is small, and a save
that has returned is on disk.

Plain Orbax reads a checkpoint back without this module (nested dicts and lists of arrays):
    ocp.CheckpointManager(dir).restore(epoch, args=ocp.args.StandardRestore())
    ocp.StandardCheckpointer().restore(f"{dir}/{epoch}/default")
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from mnist_jax import processes
from mnist_jax.errors import CheckpointError


def _latest_only_manager(directory: Path) -> ocp.CheckpointManager:
    """A synchronous manager keeping only its latest save, which deletes on opening the
    temporary folders of saves a killed process left unfinished."""
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(1),
        enable_async_checkpointing=False,
        create=True,
        cleanup_tmp_directories=True,
    )
    try:
        return ocp.CheckpointManager(directory, options=options)
    except Exception as e:  # OSError, or Orbax refusing the folder
        processes.raise_if_lost(e)
        raise CheckpointError(f"cannot create checkpoint folder {directory}: "
                              f"{_describe(e)}") from None


def _save(manager: ocp.CheckpointManager, directory: Path, epoch: int, args,
          metrics: dict[str, float] | None = None) -> None:
    """One save, on disk when this returns; any failure (a full disk, ...) one line."""
    try:
        manager.save(epoch, args=args, metrics=metrics)
        manager.wait_until_finished()
    except Exception as e:  # OSError, or Orbax/TensorStore's own error types
        processes.raise_if_lost(e)
        raise CheckpointError(f"cannot write checkpoint {directory / str(epoch)}: "
                              f"{_describe(e)}") from None


# TensorStore's annotations at the end of its messages: [os_error_code='28'],
# [source locations='...'], [tensorstore_spec='{...}'] (a JSON spec of 2,000 characters).
_ANNOTATION = re.compile(r"\s*\[[a-z_ ]+='[^']*'\]")
_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")


def _describe(e: BaseException) -> str:
    """`Type: what went wrong`, one short line. An OS error by its name ("OSError: No space
    left on device"), also where TensorStore wraps it (a full disk, a file size limit) in a
    line naming Orbax's hidden temporary files and its spec; otherwise the first line
    without TensorStore's annotations, from the error Orbax wrapped when its own message
    ends in a TensorStore object's repr ("See full TensorStore details: <bound method")."""
    while ("See full TensorStore details" in str(e)
           and (e.__cause__ or e.__context__) is not None):
        e = e.__cause__ or e.__context__
    if isinstance(e, OSError) and e.strerror:
        return f"{type(e).__name__}: {e.strerror}"
    text = (str(e).splitlines() or [""])[0]
    code = _OS_ERROR_CODE.search(text)
    if code:
        return f"OSError: {os.strerror(int(code.group(1)))}"
    return f"{type(e).__name__}: {_ANNOTATION.sub('', text)}"


class BestCheckpoint:
    """The best state so far, under `directory/<epoch>/`. Use as a context manager."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).absolute()
        self._manager = _latest_only_manager(self.directory)

    def save(self, epoch: int, state, metrics: dict[str, float]) -> Path:
        """Save `state` as the checkpoint of `epoch`, with `metrics` (Python floats)."""
        metrics = {k: float(v) for k, v in metrics.items()}
        _save(self._manager, self.directory, epoch, ocp.args.StandardSave(state), metrics)
        return self.directory / str(epoch)

    @property
    def epoch(self) -> int | None:
        """The epoch of the checkpoint on disk, or None."""
        return self._manager.latest_step()

    def restore(self, like, epoch: int | None = None):
        """The saved state, with the structure, shapes and dtypes of `like`."""
        epoch = self.epoch if epoch is None else epoch
        if epoch is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        return restore_state(self.directory, epoch, like, manager=self._manager)

    def keep_only(self, epoch: int | None, state, metrics: dict[str, float]) -> None:
        """Make `epoch`'s checkpoint (None: none) the only one, saving `state` if it is not
        on disk: a resumed run's best may differ from what a killed run left here (a save
        for an epoch that did not finish)."""
        if epoch is not None and self.epoch == epoch:
            return
        for step in self._manager.all_steps():
            self._manager.delete(step)
        if epoch is not None:
            self.save(epoch, state, metrics)

    def close(self) -> None:
        self._manager.close()  # errors surface here; never swallow them

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LatestCheckpoint:
    """After every epoch, `{"states": ..., "best": ...}` (every seed, stacked) under
    `directory/<epoch>/`, only the latest kept. The host side (early stopping, epochs run)
    is rebuilt from history.csv, which is written before this save."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).absolute()
        self._manager = _latest_only_manager(self.directory)

    @property
    def epoch(self) -> int | None:
        return self._manager.latest_step()

    def save(self, epoch: int, states, best) -> None:
        _save(self._manager, self.directory, epoch, ocp.args.Composite(
            states=ocp.args.StandardSave(states), best=ocp.args.StandardSave(best)))

    def restore(self, like_states, like_best):
        """(epoch, states, best) of the latest checkpoint, shaped like the arguments."""
        epoch = self.epoch
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
        try:
            restored = self._manager.restore(epoch, args=ocp.args.Composite(
                states=ocp.args.StandardRestore(abstract(like_states)),
                best=ocp.args.StandardRestore(abstract(like_best))))
        except Exception as e:  # unreadable, or another model's shapes
            processes.raise_if_lost(e)
            raise CheckpointError(f"cannot resume from {self.directory / str(epoch)}: "
                                  f"{_describe(e)}") from None
        return epoch, restored["states"], restored["best"]

    def close(self) -> None:
        self._manager.close()


def restore_state(directory: str | os.PathLike, epoch: int, like, *, manager=None):
    """Read the state of `epoch` under `directory` into the structure of `like`."""
    directory = Path(directory).absolute()
    own = manager is None
    try:
        if own:
            manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
                read_only=True, create=False))
        if epoch not in manager.all_steps():
            raise CheckpointError(f"no checkpoint for epoch {epoch} in {directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
    except CheckpointError:
        raise
    except Exception as e:  # Orbax raises many types for unreadable or mismatched files
        processes.raise_if_lost(e)
        raise CheckpointError(f"cannot restore epoch {epoch} from {directory}: "
                              f"{_describe(e)}") from None
    finally:
        if own and manager is not None:
            manager.close()
