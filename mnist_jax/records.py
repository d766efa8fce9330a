"""Writing and reading a run's files. Every write is atomic (a temporary file in the same
folder, then os.replace), so an interrupted run never leaves a half-written file."""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import itertools
import json
import math
import os
import stat
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from mnist_jax.errors import UserError

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
RESULT_FILE = "result.json"
PREDICTIONS_FILE = "test_predictions.npz"  # each seed's test predictions, for the figures
CHECKPOINTS_DIR = "checkpoints"
# What a run folder holds once its run has started (config.json is written first).
RUN_CONTENTS = (CONFIG_FILE, HISTORY_FILE, RESULT_FILE, PREDICTIONS_FILE, CHECKPOINTS_DIR)


LOCK_FILE = ".lock"  # held (flock) by the process writing the folder; the kernel frees it


class RunDir:
    """A folder claimed by one run: an exclusive lock on `<folder>/.lock` for as long as
    the run lives (released by the kernel even after SIGKILL), so two processes never
    write one folder. A fresh claim also requires the folder to hold nothing else; a
    resumed one (`resume=True`) takes the folder as it is. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, *, resume: bool = False,
                 what: str = "run folder", created: bool = False):
        self.path = Path(path)
        self._fd = None
        self._created = created or not self.path.exists()  # removed again if left unused
        lock = self.path / LOCK_FILE
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            new_lock = not os.path.lexists(lock)
            # O_NOFOLLOW: a .lock that is a symbolic link (planted, or copied in) is refused
            # rather than followed, which would truncate and overwrite the file it names.
            self._fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP and lock.is_symlink():
                raise UserError(f"{what} {self.path} is refused: its {LOCK_FILE} is a symbolic "
                                f"link, not a run's lock file (nothing was written)") from None
            raise UserError(f"cannot create {what} {self.path}: {e.strerror or e}") from None
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):
            self.close()
            raise UserError(f"{what} {self.path} is refused: its {LOCK_FILE} is not a regular "
                            f"file (nothing was written)")
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            raise UserError(f"{what} {self.path} is in use by another run"
                            f"{f' (pid {holder})' if holder else ''}") from None
        if not resume and any(p.name != LOCK_FILE for p in self.path.iterdir()):
            if new_lock:  # leave the folder as it was
                (self.path / LOCK_FILE).unlink(missing_ok=True)
            self.close()
            raise UserError(f"{what} {self.path} already holds files (nothing was "
                            f"overwritten): choose a new folder, or resume the run in it")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, exc_type, *exc) -> None:
        self.release(failed=exc_type is not None)

    def release(self, failed: bool) -> None:
        """End the claim. After a failure before anything was written, the claim is undone:
        a run that never started leaves no folder behind."""
        try:
            unused = failed and [p.name for p in self.path.iterdir()] == [LOCK_FILE]
            if unused:
                (self.path / LOCK_FILE).unlink()
                if self._created:
                    self.path.rmdir()
        except OSError:
            pass  # best effort: the folder holds nothing of value
        finally:
            self.close()


class SharedDir:
    """A folder another process claimed (process 0 of a multi-process run: processes.py),
    used by this one as it is: nothing held, nothing undone."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        pass

    def release(self, failed: bool) -> None:
        pass


def seed_has_result(seed: dict) -> bool:
    """Whether one seed of result.json has a result: a best epoch and test figures. A seed
    that diverged before any improvement has neither (result.json by an older version gave
    it the test figures of its initial weights: ignored)."""
    return seed.get("test_accuracy") is not None and seed.get("best_epoch") is not None


def new_run_dir(root: str | os.PathLike) -> Path:
    """A new, empty folder `<root>/<date-time>` (`-2`, `-3`, ... for runs started in the
    same second), created atomically so that two runs never get the same one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {root}: {e.strerror or e}") from None
    for n in itertools.count(1):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path  # RunDir(path, created=True) removes it again if the run never starts
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"cannot create {path}: {e.strerror or e}") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over."""
    atomic_write_files({path: data})


def atomic_write_files(files: dict[str | os.PathLike, bytes]) -> None:
    """Write several files all or none: each to a temporary file beside it, flushed to
    disk, and only once every one is written, each renamed over its file. A failure before
    the renames (a full disk, a read-only folder, a folder in the way) leaves every file as
    it was and no temporary file behind; the error names the file it was for."""
    staged: list[tuple[Path, Path]] = []  # (file, its temporary file)
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
            with _naming(path, tmp):
                if path.is_dir():  # found now, not by a rename after others were renamed
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
                # os.open with 0o666 lets the umask set the permissions (mkstemp: 0600).
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                staged.append((path, tmp))
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
        for path, tmp in staged:
            with _naming(path, tmp):
                os.replace(tmp, path)
    finally:
        for _, tmp in staged:  # those not renamed (after a failure)
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _naming(path: Path, tmp: Path):
    """An OSError inside names the file it was for (summary.json), never the hidden
    temporary file (a read-only folder, a full disk, a folder in the way of the rename)."""
    try:
        yield
    except OSError as e:
        if e.filename is None or e.filename in (str(tmp), os.fsencode(tmp)):
            if e.errno is None:
                e.filename = str(path)
                raise
            # A new error, as filename2 (the rename's) cannot be unset; OSError(...) is the
            # errno's subclass again (PermissionError, IsADirectoryError, ...).
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    """What write_json writes: indented JSON, NaN and infinities as null."""
    return (json.dumps(_json_safe(obj), indent=2) + "\n").encode("utf-8")


def json_roundtrip(obj: Any) -> Any:
    """`obj` as it reads back from write_json (tuples become lists, NaN None)."""
    return json.loads(json.dumps(_json_safe(obj)))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_history(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """One row per epoch; the columns are the union of the rows' keys, in first-seen order."""
    rows = list(rows)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """history.csv back as dicts of numbers (ints where whole, booleans as bool, blanks None).
    A row with more or fewer fields than the header (a cut or damaged file), or a field that
    is not a number ("nan" and "inf" are), is a ValueError naming its line (and column)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, [])
            rows = []
            for fields in reader:
                if len(fields) != len(header):
                    raise ValueError(f"line {reader.line_num} has {len(fields)} fields, the "
                                     f"header {len(header)} (cut short or damaged)")
                row = {k: _parse(v) for k, v in zip(header, fields)}
                for key, value in row.items():
                    if isinstance(value, str):
                        raise ValueError(f"line {reader.line_num}: column {key} holds "
                                         f"{value!r}, not a number")
                rows.append(row)
        except csv.Error as e:  # not a ValueError: e.g. an unclosed quote
            raise ValueError(f"line {reader.line_num}: {e}") from None
    return rows


def _parse(text: str):
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _json_safe(obj):
    """JSON has no NaN or infinity: write them as null rather than invalid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
