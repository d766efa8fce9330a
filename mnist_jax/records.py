"""Writing and reading a run's files. Every write is atomic (a temporary file in the same
folder, then os.replace), so an interrupted run never leaves a half-written file."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

from mnist_jax.errors import UserError

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
RESULT_FILE = "result.json"


def claim_run_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and its parents) for a run, refusing a folder that already holds
    files: nothing saved earlier is overwritten."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        used = any(path.iterdir())
    except OSError as e:
        raise UserError(f"cannot create run folder {path}: {e.strerror or e}") from None
    if used:
        raise UserError(f"run folder {path} already holds files (nothing was overwritten)")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    # os.open with 0o666 lets the umask set the permissions (mkstemp would force 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write (disk full) names the file it was for
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=2) + "\n")


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
    A row with more or fewer fields than the header (a cut or damaged file) is a ValueError
    naming its line."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, [])
            rows = []
            for fields in reader:
                if len(fields) != len(header):
                    raise ValueError(f"line {reader.line_num} has {len(fields)} fields, the "
                                     f"header {len(header)} (cut short or damaged)")
                rows.append({k: _parse(v) for k, v in zip(header, fields)})
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
