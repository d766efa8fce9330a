"""Bad input, case by case (issue 8): the real command in a subprocess gets ONE line
`error: ...` on stderr and exit status 2, never a traceback, names where the value came
from (flag, environment variable, file), and leaves files saved earlier byte-identical.

Each row of CASES is one command line. Its arguments and expected message may name the
case's paths, filled in per case:
  {tmp}     the case's tmp_path
  {data}    {tmp}/mnist, a data folder the case's `make` may build
  {new}     {tmp}/new-run, an --out folder that must still not exist afterwards
  {file}    {tmp}/a-file, a regular file (always made)
  {study}   {tmp}/study, a copy of a finished two-model study (cases with study=True)
  {shared}  the real MNIST folder (../shared/mnist or $MNIST_JAX_DATA_DIR), never modified

Most rows fail before any training, so each costs the command's import time (about 3.5 s
for a training command on the development CPU, 1.5 s for the report).
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from mnist_jax import cli, records, report
from mnist_jax.data import DATA_DIR_ENV
from mnist_jax.errors import UserError

from conftest import REPO, SMALL_STUDY_FLAGS

STUDY = "experiments.depth_study"
TRAIN = "mnist_jax.train"
REPORT = "mnist_jax.report"
TIMEOUT_S = 120  # every row, the download without a network included, ends well before


@dataclass(frozen=True)
class Case:
    id: str
    module: str  # python -m <module>
    args: tuple[str, ...]
    expect: str  # a fragment of the one error line
    make: Callable[[Path, Path | None], None] | None = None  # (tmp, shared): the case's files
    env: dict[str, str] = field(default_factory=dict)  # added to a copy without $MNIST_JAX_DATA_DIR
    keep: str | None = None  # a folder whose files must stay byte-identical
    study: bool = False  # {study}: a copy of the finished study
    notice: str | None = None  # a line on stderr expected before the error line
    marks: tuple = ()
    # The command's main(argv) in this process (its flags fail before any file or data is
    # touched; the same main and run_main as `python -m`, without 3.5 s of start-up).
    in_process: bool = False
    absent: tuple[str, ...] = ()  # words the error line must not hold (advice that is wrong)

    def param(self):
        return pytest.param(self, id=self.id, marks=self.marks)


# ---- how a case alters its copy of the data folder ----

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def mnist_copy(alter: Callable[[Path], None] | None = None):
    """A `make`: {data} a copy of the real folder {shared}, then altered."""

    def make(tmp: Path, shared: Path) -> None:
        folder = tmp / "mnist"
        folder.mkdir()
        for name in MNIST_FILES:
            shutil.copyfile(shared / name, folder / name)  # copyfile: writable, unlike ../shared
        if alter is not None:
            alter(folder)

    make.copies_mnist = True
    return make


def remove(name):
    return lambda folder: (folder / name).unlink()


def truncate(name, keep=5_000):
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:keep])


def flip_bytes(name, offsets=(1_000, 1_001, 50_000)):
    def alter(folder: Path) -> None:
        raw = bytearray((folder / name).read_bytes())
        for i in offsets:
            raw[i] ^= 0xFF
        (folder / name).write_bytes(bytes(raw))

    return alter


def unreadable(name):
    """`name` cannot be read: no read permission, or (for root, who reads anything) a link
    to /proc/self/mem, whose first byte is an I/O error."""
    def alter(folder: Path) -> None:
        if os.geteuid() == 0:
            (folder / name).unlink()
            (folder / name).symlink_to("/proc/self/mem")
        else:
            (folder / name).chmod(0)

    return alter


def replace(name, content: bytes):
    return lambda folder: (folder / name).write_bytes(content)


def swap_in(name, other):
    """A gzip file of the wrong format: `other`'s content under `name`."""
    return lambda folder: shutil.copyfile(folder / other, folder / name)


def make_file(path_in_tmp):
    return lambda tmp, shared: (tmp / path_in_tmp).write_text("not a folder\n")


def make_dir(path_in_tmp, files=(), mode=None):
    def make(tmp: Path, shared) -> None:
        folder = tmp / path_in_tmp
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_text(f"an earlier result: {name}\n")
        if mode is not None:
            folder.chmod(mode)

    return make


def lock_links_out(path_in_tmp, files=()):
    """A folder `path_in_tmp` whose .lock is a symbolic link to {tmp}/victim/notes.txt, a
    file outside it that must stay as it is (keep="{tmp}/victim")."""
    def make(tmp: Path, shared) -> None:
        make_dir(path_in_tmp, files)(tmp, shared)
        make_dir("victim", ["notes.txt"])(tmp, shared)
        (tmp / path_in_tmp / records.LOCK_FILE).symlink_to(tmp / "victim" / "notes.txt")

    return make


# ---- how a case alters its copy of the finished study ----

def in_study(alter: Callable[[Path], None]):
    """A `make`: alter the 3-conv run of {study}."""
    return lambda tmp, shared: alter(tmp / "study" / "3conv")


def cut(name, keep: Callable[[bytes], int]):
    def alter(run: Path) -> None:
        raw = (run / name).read_bytes()
        (run / name).write_bytes(raw[:keep(raw)])

    return alter


def flip_middle(name, count=16):
    def alter(run: Path) -> None:
        raw = bytearray((run / name).read_bytes())
        for i in range(len(raw) // 2, len(raw) // 2 + count):
            raw[i] ^= 0xFF
        (run / name).write_bytes(bytes(raw))

    return alter


def npz_changed(name, change: Callable[[dict], None]):
    """Rewrite the npz `name` with its arrays as `change` leaves them (a valid npz)."""
    def alter(run: Path) -> None:
        with np.load(run / name) as npz:
            arrays = {k: npz[k] for k in npz.files}
        change(arrays)
        with open(run / name, "wb") as f:
            np.savez_compressed(f, **arrays)

    return alter


def forget_first_wrong(arrays: dict) -> None:
    arrays["wrong_indices"] = arrays["wrong_indices"][1:]
    arrays["wrong_images"] = arrays["wrong_images"][1:]


def len_half(raw: bytes) -> int:
    return len(raw) // 2


def write(name, content: bytes):
    return lambda run: (run / name).write_bytes(content)


def remove_files(*names):
    def alter(run: Path) -> None:
        for name in names:
            (run / name).unlink()

    return alter


def history_field(seed: int, epoch: int, column: str, text: str):
    """history.csv with `column` of `seed`'s `epoch` row replaced by `text`, as written."""
    def alter(run: Path) -> None:
        lines = (run / records.HISTORY_FILE).read_text().splitlines()
        header = lines[0].split(",")
        for i, line in enumerate(lines[1:], 1):
            fields = line.split(",")
            if (fields[header.index("seed")], fields[header.index("epoch")]) == (
                    str(seed), str(epoch)):
                fields[header.index(column)] = text
                lines[i] = ",".join(fields)
        (run / records.HISTORY_FILE).write_text("\n".join(lines) + "\n")

    return alter


def both(*alters):
    def alter(run: Path) -> None:
        for one in alters:
            one(run)

    return alter


def summary_json_a_folder(run: Path) -> None:
    """{study}/summary.json (beside `run`) replaced by a folder holding a file."""
    summary = run.parent / report.SUMMARY_JSON
    summary.unlink()
    summary.mkdir()
    (summary / "notes.txt").write_text("an earlier note\n")


# ---- the table ----

def train_flag(id, args, expect, module=STUDY):
    return Case(id, module, (*args, "--out", "{new}"), expect, in_process=True)


FLAG_CASES = [
    train_flag("unknown-flag", ["--bogus"], "unrecognized arguments: --bogus"),
    train_flag("epochs-not-a-number", ["--epochs", "abc"],
               "argument --epochs: 'abc' is not an integer"),
    train_flag("conv-malformed", ["--conv", "3,x"],
               "argument --conv: '3,x' is not a comma-separated list of positive integers",
               module=TRAIN),
    train_flag("epochs-0", ["--epochs", "0"], "argument --epochs: 0 is not a positive integer"),
    train_flag("epochs-negative", ["--epochs", "-1"],
               "argument --epochs: -1 is not a positive integer"),
    train_flag("epochs-absurd", ["--epochs", str(10**9)],
               "argument --epochs: 1000000000 is more than the limit of 10,000"),
    train_flag("batch-size-not-a-number", ["--batch-size", "x"],
               "argument --batch-size: 'x' is not an integer"),
    train_flag("engine-unknown", ["--engine", "fast"], "argument --engine: invalid choice: 'fast'"),
    train_flag("batch-size-0", ["--batch-size", "0"],
               "argument --batch-size: 0 is not a positive integer"),
    train_flag("batch-size-absurd", ["--batch-size", "60001"],
               "argument --batch-size: 60001 is more than the limit of 60,000"),
    train_flag("seeds-0", ["--seeds", "0"], "argument --seeds: 0 is not a positive integer"),
    train_flag("seeds-absurd", ["--seeds", "100000"],
               "argument --seeds: 100000 is more than the limit of 1,000"),
    train_flag("patience-negative", ["--patience", "-1"],
               "argument --patience: -1 is not 0 or more"),
    train_flag("patience-absurd", ["--patience", "20000"],
               "argument --patience: 20000 is more than the limit of 10,000"),
    *[train_flag(f"learning-rate-{id}", args,
                 f"argument --learning-rate: learning rate must be a positive number, got {shown}")
      for id, args, shown in [
          ("nan", ["--learning-rate", "nan"], "nan"),
          ("inf", ["--learning-rate", "inf"], "inf"),
          # "--learning-rate -inf" is argparse's "expected one argument": -inf looks like a flag
          ("-inf", ["--learning-rate=-inf"], "-inf"),
          ("0", ["--learning-rate", "0"], "0.0"),
          ("-0.001", ["--learning-rate", "-0.001"], "-0.001")]],
    train_flag("learning-rate-not-a-number", ["--learning-rate", "abc"],
               "argument --learning-rate: 'abc' is not a number"),
    # Nothing is held out under --validation test: the size was silently ignored.
    *[train_flag(f"holdout-size-with-validation-test{id}", args,
                 "--holdout-size is for --validation holdout: --validation test selects epochs "
                 "on the test set", module=module)
      for id, module, args in [
          ("", STUDY, ["--validation", "test", "--holdout-size", "1000"]),
          ("-default-size", TRAIN, ["--holdout-size", "5000", "--validation", "test"])]],
    # several processes (processes.py): refused before any process waits for the others
    train_flag("processes-flags-incomplete", ["--coordinator", "localhost:12355"],
               "--coordinator, --num-processes and --process-id go together: give all three"),
    train_flag("process-id-out-of-range", ["--coordinator", "localhost:12355",
                                           "--num-processes", "2", "--process-id", "2"],
               "--process-id 2 is not one of 0..1 (--num-processes 2)"),
    train_flag("coordinator-without-port", ["--coordinator", "host-a", "--num-processes", "2",
                                            "--process-id", "0"],
               "--coordinator 'host-a' is not HOST:PORT", module=TRAIN),
    train_flag("conv-depth-vanishes", ["--conv", "32,32,32,32"],
               "conv_features (32, 32, 32, 32): the feature map vanishes after 3 conv blocks",
               module=TRAIN),
]

# (id, make, expected message, also through $MNIST_JAX_DATA_DIR): every folder through
# --data-dir; through the environment variable, one of each check (the three last are the
# checksum's, as bytes-flipped), to keep the file's runtime near three minutes.
CHECKSUM = "in data folder {data} ({source}) does not match the checksum"
DATA_FOLDERS = [
    ("missing", None, "data folder {data} ({source}) does not exist", True),
    ("a-file", make_file("mnist"), "data folder {data} ({source}) is a file, not a folder", True),
    ("empty", make_dir("mnist"), "data folder {data} ({source}) holds none of the four MNIST files",
     True),
    ("one-file-missing", mnist_copy(remove("train-labels-idx1-ubyte.gz")),
     "data folder {data} ({source}) has no train-labels-idx1-ubyte.gz", True),
    # Not "pass --data-dir DIR", as it was: the folder was given, one file is unreadable.
    ("file-unreadable", mnist_copy(unreadable("train-labels-idx1-ubyte.gz")),
     "train-labels-idx1-ubyte.gz in data folder {data} ({source}) cannot be read ("
     + os.strerror(errno.EIO if os.geteuid() == 0 else errno.EACCES) + ")", True),
    ("bytes-flipped", mnist_copy(flip_bytes("t10k-images-idx3-ubyte.gz")),
     "t10k-images-idx3-ubyte.gz " + CHECKSUM, True),
    ("truncated", mnist_copy(truncate("train-images-idx3-ubyte.gz")),
     "train-images-idx3-ubyte.gz " + CHECKSUM, False),
    ("not-gzip", mnist_copy(replace("t10k-labels-idx1-ubyte.gz", b"hello, not gzip\n")),
     "t10k-labels-idx1-ubyte.gz " + CHECKSUM, False),
    ("labels-as-images", mnist_copy(swap_in("train-images-idx3-ubyte.gz",
                                            "train-labels-idx1-ubyte.gz")),
     "train-images-idx3-ubyte.gz " + CHECKSUM, False),
]
# A folder that was given (by flag or variable) is never answered with advice to give one.
GIVEN = ("pass --data-dir", "offline")
DATA_CASES = [
    *[Case(f"data-dir-{id}", STUDY, ("--data-dir", "{data}", "--out", "{new}"),
           expect.replace("{source}", "--data-dir"), make, absent=GIVEN)
      for id, make, expect, _ in DATA_FOLDERS],
    *[Case(f"data-env-{id}", STUDY, ("--out", "{new}"),
           expect.replace("{source}", f"${DATA_DIR_ENV}"), make, env={DATA_DIR_ENV: "{data}"},
           absent=GIVEN)
      for id, make, expect, through_env in DATA_FOLDERS if through_env],
]

# The data is real and small: were the folder not refused, the run would still end soon.
RUN = ("--data-dir", "{shared}", "--epochs", "1", "--seeds", "1", "--train-limit", "64")
OUT_CASES = [
    Case("out-parent-is-a-file", TRAIN, (*RUN, "--out", "{file}/run"),
         "cannot create --out {file}/run: Not a directory"),
    Case("out-under-proc", TRAIN, (*RUN, "--out", "/proc/mnist_jax_forbidden/x"),
         "cannot create --out /proc/mnist_jax_forbidden/x: "),
    Case("out-is-a-file", STUDY, (*RUN, "--out", "{file}"), "--out {file} is a file, not a folder"),
    # Refused after the data loads and the study's folder and 2conv's are claimed: both
    # claims are undone, so the same --out can be used again.
    Case("layout-needs-scan-engine", STUDY,
         (*RUN, "--layout", "vmap", "--conv-impl", "xla", "--engine", "loop", "--out", "{new}"),
         "the vmap layout needs the scan engine, not the loop engine"),
    Case("out-holds-files", STUDY, (*RUN, "--out", "{tmp}/used"),
         "--out {tmp}/used already holds files", make_dir("used", ["summary.json", "notes.txt"]),
         keep="{tmp}/used"),
    # A .lock that is a symbolic link is refused, never followed: the file it names (outside
    # the folder) was truncated and overwritten with a pid, and the link then removed.
    *[Case(f"out-lock-is-a-symlink{id}", module, (*RUN, "--out", "{tmp}/used", *extra),
           "--out {tmp}/used is refused: its .lock is a symbolic link",
           lock_links_out("used", files), keep="{tmp}", in_process=True)
      for id, module, extra, files in [("", STUDY, (), ()),
                                       ("-resume", TRAIN, ("--resume",), ("config.json",))]],
]

REPORT_CASES = [
    Case("report-missing-folder", REPORT, ("{tmp}/nowhere",), "{tmp}/nowhere is not a folder"),
    Case("report-a-file", REPORT, ("{file}",), "{file} is not a folder"),
    Case("report-empty-folder", REPORT, ("{tmp}/empty",), "{tmp}/empty holds no run",
         make_dir("empty")),
    *[Case(f"report-{name.split('.')[0]}-missing", REPORT, ("{study}",),
           f"{{study}}/3conv is not a finished run: {name} is missing",
           in_study(lambda run, name=name: (run / name).unlink()), keep="{study}", study=True)
      for name in (records.RESULT_FILE, records.HISTORY_FILE, records.CONFIG_FILE,
                   records.PREDICTIONS_FILE)],
    Case("report-history-unreadable", REPORT, ("{study}",),
         "{study}/3conv/history.csv cannot be read ("
         + os.strerror(errno.EIO if os.geteuid() == 0 else errno.EACCES) + ")",
         in_study(unreadable(records.HISTORY_FILE)), keep="{study}", study=True),
    *[Case(f"report-{id}", REPORT, ("{study}",), f"{{study}}/3conv/{name} is damaged: {expect}",
           in_study(alter), keep="{study}", study=True)
      for id, name, alter, expect in [
          ("result-truncated-json", records.RESULT_FILE, cut(records.RESULT_FILE, len_half),
           ""),  # json's own words, e.g. "Unterminated string starting at: line 5 ..."
          ("result-not-an-object", records.RESULT_FILE, write(records.RESULT_FILE, b"[]\n"),
           "it holds a JSON list, not an object"),
          ("config-truncated-json", records.CONFIG_FILE, cut(records.CONFIG_FILE, len_half), ""),
          ("history-garbage", records.HISTORY_FILE,
           write(records.HISTORY_FILE, b"garbage,,\n\x00\x01zz\n"),
           "line 2 has 1 fields, the header 3 (cut short or damaged)"),
          ("history-cut-short", records.HISTORY_FILE,
           cut(records.HISTORY_FILE, lambda raw: raw.index(b"\n") + 10), "line 2 has "),
          ("history-other-columns", records.HISTORY_FILE,
           write(records.HISTORY_FILE, b"a,b\n1,2\n"),
           "it has no column epoch, seed"),
          # It said the folder did "not hold a run of this version".
          ("history-not-a-number", records.HISTORY_FILE,
           history_field(1, 1, "val_loss", "abc"),
           "line 3: column val_loss holds 'abc', not a number"),
          ("predictions-truncated", records.PREDICTIONS_FILE,
           cut(records.PREDICTIONS_FILE, len_half), "File is not a zip file"),
          ("predictions-bytes-flipped", records.PREDICTIONS_FILE,
           flip_middle(records.PREDICTIONS_FILE), ""),  # zlib's or zipfile's words
          ("predictions-not-npz", records.PREDICTIONS_FILE, write(records.PREDICTIONS_FILE, b"junk"),
           "not an .npz file (no zip header)"),
          # Readable arrays that do not fit together: the figures would fail on them.
          ("predictions-one-seed-short", records.PREDICTIONS_FILE,
           npz_changed(records.PREDICTIONS_FILE,
                       lambda a: a.update(predictions=a["predictions"][:1])),
           "predictions have shape (1, 160), not (seeds, test images) = (3, 160)"),
          ("predictions-label-11", records.PREDICTIONS_FILE,
           npz_changed(records.PREDICTIONS_FILE, lambda a: a["labels"].__setitem__(0, 11)),
           "labels outside 0..9"),
          ("predictions-wrong-index-missing", records.PREDICTIONS_FILE,
           npz_changed(records.PREDICTIONS_FILE, forget_first_wrong),
           "wrong_indices lacks a misclassified test image (index "),
      ]],
    # The write error names summary.json, not the temporary file renamed onto it.
    Case("report-summary-json-is-a-folder", REPORT, ("{study}",),
         f"error: {os.strerror(errno.EISDIR)} ({{study}}/{report.SUMMARY_JSON})",
         in_study(summary_json_a_folder), keep="{study}", study=True),
]

# --resume of the finished study, or of its 3-conv run left unfinished (no result.json):
# refused in one line, in this process, before any file changes (the data loads first,
# for the rows that reach the settings or the history).
def resumed(*extra):
    return ("--data-dir", "{shared}", *SMALL_STUDY_FLAGS, *extra, "--resume", "--out", "{study}")


UNFINISHED = remove_files(records.RESULT_FILE)
RESUME_CASES = [
    # The other command's folder: a study resumed into one model's run trained a new study
    # there, and train --resume into a study trained a model at its top.
    Case("resume-train-into-a-study", TRAIN, ("--resume", "--out", "{study}"),
         "--resume: {study} holds a study (its study.json), not one model's run: "
         "python -m mnist_jax.train cannot continue it", keep="{study}", study=True),
    Case("resume-study-into-a-train-run", STUDY, ("--resume", "--out", "{study}/3conv"),
         "--resume: {study}/3conv holds one model's run (config.json at its top, no "
         "study.json), not a study", keep="{study}", study=True),
    # No config.json, no resume: its settings (learning rate, patience, ...) were not
    # checked, and the new config.json claimed the new ones for the whole run.
    Case("resume-config-missing", STUDY, resumed(),
         "cannot resume {study}/3conv: its config.json is missing, so the settings it was "
         "started with cannot be checked (it holds history.csv, test_predictions.npz, "
         "checkpoints)", in_study(remove_files(records.RESULT_FILE, records.CONFIG_FILE)),
         keep="{study}", study=True),
    # The counts under --train-limit are the same; the holdout images are not.
    Case("resume-other-holdout-size", STUDY, resumed("--holdout-size", "4000"),
         "cannot resume {study}/2conv: it was started with other settings "
         "(data.holdout_size: 5000 there, 4000 now)", keep="{study}", study=True),
    # A planted NaN was replayed as a divergence (or moved the best epoch) without a word.
    Case("resume-history-nan", STUDY, resumed(),
         "cannot resume: {study}/3conv/history.csv is damaged (seed 1's epoch 1 has "
         "val_accuracy nan, but is not marked diverged)",
         in_study(both(UNFINISHED, history_field(1, 1, "val_accuracy", "nan"))),
         keep="{study}", study=True),
    # An unreadable file (permissions, an I/O error) is not called damaged.
    Case("resume-history-unreadable", STUDY, resumed(),
         "cannot resume: {study}/3conv/history.csv cannot be read ("
         + os.strerror(errno.EIO if os.geteuid() == 0 else errno.EACCES) + ")",
         in_study(both(UNFINISHED, unreadable("history.csv"))),
         keep="{study}", study=True),
    Case("resume-history-not-a-number", STUDY, resumed(),
         "cannot resume: {study}/3conv/history.csv is damaged (line 3: column train_loss "
         "holds 'abc', not a number)",
         in_study(both(UNFINISHED, history_field(1, 1, "train_loss", "abc"))),
         keep="{study}", study=True),
]

DOWNLOAD_CASES = [
    # No folder, nothing cached (HOME is the case's), no network here: the command says it
    # downloads before it waits, and fails within TIMEOUT_S (tensorflow-datasets alone
    # retried for 206 s in silence).
    Case("download-without-network", TRAIN, ("--epochs", "1", "--out", "{new}"),
         "could not download MNIST: cannot reach storage.googleapis.com",
         env={"HOME": "{tmp}/home"}, notice="downloading MNIST (4 files, 11 MB) from https://"),
]

# In this process as well (their failures touch no global state): the data folders given
# by flag, and the report. Through the environment variable, a real process each.
IN_PROCESS = [dataclasses.replace(c, in_process=True) for c in DATA_CASES + REPORT_CASES
              if not c.env]
CASES = (FLAG_CASES + IN_PROCESS + [c for c in DATA_CASES if c.env] + OUT_CASES
         + [dataclasses.replace(c, in_process=True) for c in RESUME_CASES] + DOWNLOAD_CASES)


def needs_mnist(case: Case) -> bool:
    return (case.study or any("{shared}" in a for a in case.args)
            or getattr(case.make, "copies_mnist", False))


# No row needs the network; without a proxy the download row fails the same way everywhere
# (through a proxy, the connection check is skipped and tensorflow-datasets' words differ).
PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def run_command(module: str, *args, env: dict | None = None, timeout: float = TIMEOUT_S):
    environ = {k: v for k, v in os.environ.items()
               if k != DATA_DIR_ENV and k.lower() not in PROXY_VARIABLES}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO,
                          env=environ, capture_output=True, text=True, timeout=timeout)


def run_in_process(module: str, args: list[str], capsys) -> subprocess.CompletedProcess:
    """`module.main(args)` here, as `python -m module` would run it; argparse's own exit
    (SystemExit) becomes the status."""
    capsys.readouterr()
    try:
        status = importlib.import_module(module).main(args)
    except SystemExit as e:
        status = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, captured.out, captured.err)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes (a run's .lock: only
    that it is there, as it names the last process to claim the folder; a symbolic link,
    which an unreadable file is made of: where it points)."""
    def content(p: Path) -> bytes:
        if p.is_symlink():
            return f"-> {os.readlink(p)}".encode()
        return p.read_bytes() if p.name != records.LOCK_FILE else b""
    return {str(p.relative_to(folder)): content(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_study(small_study) -> Path:
    """A finished study (conftest.small_study: 3 seeds, 160 test images); copied per case."""
    return small_study.out


@pytest.mark.slow  # most rows start the real command in a subprocess (about 3.5 s each)
@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input_is_one_error_line(case: Case, tmp_path: Path, request, capsys, monkeypatch):
    # The real data: skips without it (fails in CI, which always has it).
    shared = request.getfixturevalue("mnist_path") if needs_mnist(case) else None
    places = {"tmp": tmp_path, "data": tmp_path / "mnist", "new": tmp_path / "new-run",
              "file": tmp_path / "a-file", "study": tmp_path / "study", "shared": shared}
    (tmp_path / "a-file").write_text("a regular file\n")
    (tmp_path / "home").mkdir()
    if case.study:
        shutil.copytree(request.getfixturevalue("finished_study"), tmp_path / "study")
    if case.make is not None:
        case.make(tmp_path, shared)
    fill = lambda text: text.format(**places)  # noqa: E731
    kept = Path(fill(case.keep)) if case.keep else None
    before = snapshot(kept) if kept else None

    if case.in_process:
        assert not case.env
        monkeypatch.delenv(DATA_DIR_ENV, raising=False)  # as run_command's environment
        proc = run_in_process(case.module, [fill(a) for a in case.args], capsys)
    else:
        proc = run_command(case.module, *map(fill, case.args),
                           env={k: fill(v) for k, v in case.env.items()})
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == 2, output
    lines = proc.stderr.splitlines()
    if case.notice:
        assert lines and lines[0].startswith(case.notice), proc.stderr
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].strip(), proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert fill(case.expect) in lines[0]
    assert not [word for word in case.absent if word in lines[0]], lines[0]
    assert not places["new"].exists()  # nothing created for a run that never started
    if kept:
        assert snapshot(kept) == before  # earlier results untouched, nothing added


@pytest.mark.slow
@pytest.mark.parametrize("module, args, error", [
    (TRAIN, ["--conv", "32,32,32,32"], "mnist_jax.errors.ConfigError: conv_features"),
    (STUDY, ["--data-dir", "{tmp}/nowhere"], "mnist_jax.errors.DataError: data folder"),
    (REPORT, ["{tmp}/nowhere"], "mnist_jax.errors.UserError: "),
], ids=["train-config", "study-data-dir", "report-folder"])
def test_debug_shows_the_traceback_of_a_user_error(module, args, error, tmp_path):
    """--debug: bad input raises with its traceback, as a bug always does (without
    --debug these inputs are rows of the table: conv-depth-vanishes, data-dir-missing,
    report-missing-folder)."""
    args = [a.format(tmp=tmp_path) for a in args]
    out = ["--out", tmp_path / "new-run"] if module != REPORT else []
    proc = run_command(module, *args, *out, "--debug")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(error), proc.stderr


def test_out_of_device_memory_is_one_line_and_other_xla_errors_keep_their_traceback(capsys):
    """A batch too large for the device is the user's (exit 2, one line); any other
    runtime error from XLA (a donated buffer used again, ...) is a bug and propagates."""
    import jax

    def raising(message):
        def body():
            raise jax.errors.JaxRuntimeError(message)
        return body

    oom = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB.\nmore detail"
    assert cli.run_main(raising(oom)) == 2
    assert capsys.readouterr().err == ("error: RESOURCE_EXHAUSTED: Out of memory while "
                                       "trying to allocate 4.00GiB.\n")
    bug = "INVALID_ARGUMENT: BlockHostUntilReady() called on deleted or donated buffer"
    with pytest.raises(jax.errors.JaxRuntimeError, match="donated buffer"):
        cli.run_main(raising(bug))
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        cli.run_main(raising(oom), debug=True)


class _LateCallback:
    """As TensorStore finishing a write (or read) of a checkpoint save that failed: it
    schedules its callback on the asyncio loop Orbax awaited it on, and has closed."""

    def __init__(self, loop):
        self.loop = loop

    def __del__(self):
        self.loop.call_soon_threadsafe(print)


class _BrokenDel:
    def __del__(self):
        raise ValueError("a bug in a __del__")


def test_a_failed_checkpoint_save_prints_only_its_error_line(monkeypatch, capsys, caplog):
    """A save onto a full disk printed 1 to 229 lines of "RuntimeError: Event loop is
    closed" (unraisable, from TensorStore's threads) and asyncio's "Future exception was
    never retrieved" around the one error line (reproduced on a 200 kB tmpfs). Those two
    are dropped; any other unraisable exception still reaches the hook before."""
    import asyncio
    import gc

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)

    def body():
        loop = asyncio.new_event_loop()
        lost = loop.create_future()
        lost.set_exception(disk_full())  # a second write's failure, never awaited
        loop.close()
        late, broken = _LateCallback(loop), _BrokenDel()
        del lost, late, broken
        gc.collect()
        raise UserError("cannot write checkpoint x/1: OSError: No space left on device")

    assert cli.run_main(body) == 2
    assert capsys.readouterr().err == ("error: cannot write checkpoint x/1: OSError: No "
                                       "space left on device\n")
    assert [str(u.exc_value) for u in seen] == ["a bug in a __del__"]
    assert "never retrieved" not in caplog.text



# TensorStore's words (abridged) for a checkpoint write past a file size limit and for a
# latest checkpoint whose data file was cut in half, as a real run printed them.
_TS_WRITE = ('OUT_OF_RANGE: Error opening "zarr" driver: Error writing "opt_state.inner_state.0'
             '.nu.conv1.kernel/.zarray" in OCDBT database at local file "/r/checkpoints/latest/'
             '2.orbax-checkpoint-tmp/best.orbax-checkpoint-tmp/ocdbt.process_0/": Failed '
             'writing: "/r/checkpoints/latest/2.orbax-checkpoint-tmp/best.orbax-checkpoint-tmp/'
             'ocdbt.process_0/d/01dc2de2": Failed to write 374509 bytes to file 25: {} '
             "[os_error_code='{}'] [tensorstore_spec='{{\\\"context\\\":{{\\\"cache_pool\\\":"
             "{{}}}},\\\"driver\\\":\\\"zarr\\\",\\\"dtype\\\":\\\"float32\\\"}}']")
_TS_READ = ('OUT_OF_RANGE: Error reading "opt_state.inner_state.0.mu.conv1.kernel/0.0.0.0.0" in '
            'OCDBT database at local file "/r/checkpoints/latest/1/states/": Requested byte '
            'range [375212, 383939) is not valid for value of size 375480')
_ORBAX_READ = ("Encountered error while reading array index: (slice(0, 2, 1),). See full "
               "TensorStore details: <bound method pybind11_detail_function_record.spec of "
               "TensorStore({\n  'base': {\n    'driver': 'zarr',")


def _raised(error: BaseException, cause: BaseException) -> BaseException:
    """`error`, raised from `cause` (as Orbax wraps TensorStore's error)."""
    try:
        raise error from cause
    except BaseException as e:
        return e


@pytest.mark.parametrize("error, line", [
    # A full disk or a file size limit inside TensorStore: the OS error's name. The line
    # was 2,500 characters: Orbax's hidden temporary files and TensorStore's JSON spec.
    (ValueError(_TS_WRITE.format("No space left on device", errno.ENOSPC)),
     "OSError: No space left on device"),
    (ValueError(_TS_WRITE.format("File too large", errno.EFBIG)), "OSError: File too large"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
     "OSError: No space left on device"),
    # A damaged latest checkpoint: Orbax's own line ended in a TensorStore object's repr
    # cut at its first line break; the error it wrapped says what is wrong.
    (_raised(Exception(_ORBAX_READ), ValueError(_TS_READ)), "ValueError: " + _TS_READ),
    (ValueError(_TS_READ + " [source locations='tensorstore/kvstore/ocdbt/io.cc:123']"),
     "ValueError: " + _TS_READ),
    (ValueError("User-provided restore item and on-disk value metadata tree structures do "
                "not match\nmore detail"),
     "ValueError: User-provided restore item and on-disk value metadata tree structures do "
     "not match"),
], ids=["tensorstore-disk-full", "tensorstore-file-too-large", "os-error",
        "orbax-read-wrapping-tensorstore", "tensorstore-source-locations", "other-error"])
def test_a_checkpoint_error_is_described_in_one_short_line(error, line):
    from mnist_jax import checkpointing

    assert checkpointing._describe(error) == line


# ---- a disk that fills up during a write ----

def disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FailingFile:
    """A real file whose write stores half the data, then raises `error`."""

    def __init__(self, f, error: BaseException):
        self.f, self.error = f, error

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        raise self.error

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class _FailingOs:
    """records' view of `os`, where every file write fails with `error` halfway."""

    def __init__(self, error: BaseException):
        self.error = error

    def __getattr__(self, name):
        return getattr(os, name)

    def fdopen(self, fd, *args, **kwargs):
        return _FailingFile(os.fdopen(fd, *args, **kwargs), self.error)


@pytest.mark.parametrize("make_error",
                         [disk_full, KeyboardInterrupt, lambda: RuntimeError("a bug")],
                         ids=["disk-full", "interrupt", "bug"])
def test_an_interrupted_atomic_write_keeps_the_previous_file(make_error, tmp_path, monkeypatch):
    error = make_error()
    target = tmp_path / "summary.json"
    target.write_bytes(b'{"earlier": true}\n')
    monkeypatch.setattr(records, "os", _FailingOs(error))
    with pytest.raises(type(error)) as raised:
        records.atomic_write_bytes(target, b'{"later": true}\n' * 100)
    assert target.read_bytes() == b'{"earlier": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left
    if isinstance(error, OSError):
        assert raised.value.filename == str(target)  # so the error line can name it


class _RefusingOs:
    """records' view of `os`, where creating a file fails as in a read-only folder (the
    error names the file os.open was given), whoever runs the test (root included)."""

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return os.open(path, flags, *args)


def _read_only_folder(folder: Path, monkeypatch) -> None:
    if os.geteuid() == 0:  # root writes into a read-only folder: refuse as the kernel would
        monkeypatch.setattr(records, "os", _RefusingOs())
    folder.chmod(0o555)


@pytest.mark.parametrize("fail", ["read-only-folder", "rename-onto-a-folder"])
def test_a_failed_write_names_its_file_not_the_temporary_one(fail, tmp_path, monkeypatch):
    """The error line named the hidden temporary file (.summary.json.<hex>.tmp)."""
    target = tmp_path / "summary.json"
    if fail == "read-only-folder":
        target.write_bytes(b'{"earlier": true}\n')
        _read_only_folder(tmp_path, monkeypatch)
        expected = PermissionError
    else:  # real whoever runs it: os.replace(file, folder) is EISDIR
        target.mkdir()
        (target / "notes.txt").write_text("kept\n")
        expected = IsADirectoryError
    try:
        with pytest.raises(expected) as raised:
            records.atomic_write_text(target, "later\n")
    finally:
        tmp_path.chmod(0o755)
    assert raised.value.filename == str(target) and raised.value.filename2 is None
    assert ".tmp" not in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temp file left
    if fail == "read-only-folder":
        assert target.read_bytes() == b'{"earlier": true}\n'
    else:
        assert (target / "notes.txt").read_text() == "kept\n"


@pytest.mark.slow
@pytest.mark.mnist
def test_a_full_disk_during_the_report_is_one_line_naming_the_file(finished_study, tmp_path,
                                                                     monkeypatch, capsys):
    study = tmp_path / "study"
    shutil.copytree(finished_study, study)
    before = snapshot(study)
    monkeypatch.setattr(records, "os", _FailingOs(disk_full()))
    assert report.main([str(study)]) == 2
    err = capsys.readouterr().err
    summary = study / report.SUMMARY_JSON
    assert err.splitlines() == [f"error: {os.strerror(errno.ENOSPC)} ({summary})"]
    assert snapshot(study) == before  # the summary and figures as they were, no temp file


class _FillingOs(_FailingOs):
    """records' view of `os`, where the disk fills during the `nth` file write."""

    def __init__(self, error: BaseException, nth: int):
        super().__init__(error)
        self.left = nth

    def fdopen(self, fd, *args, **kwargs):
        self.left -= 1
        f = os.fdopen(fd, *args, **kwargs)
        return _FailingFile(f, self.error) if self.left == 0 else f


@pytest.mark.slow
@pytest.mark.mnist
def test_a_disk_that_fills_while_the_report_writes_its_figures_changes_nothing(
        finished_study, tmp_path, monkeypatch, capsys):
    """The summary was written before the figures: a disk that filled at a figure left the
    new summary.json and summary.md beside the old figures. Now all or none: the second
    figure (the fourth file) fails, and every file is as it was, no temporary file left."""
    study = tmp_path / "study"
    shutil.copytree(finished_study, study)
    before = snapshot(study)
    monkeypatch.setattr(records, "os", _FillingOs(disk_full(), nth=4))
    assert report.main([str(study)]) == 2
    err = capsys.readouterr().err
    figure = study / report.FIGURES["confusion"]
    assert err.splitlines() == [f"error: {os.strerror(errno.ENOSPC)} ({figure})"]
    assert snapshot(study) == before


# ---- closed standard streams ----

@pytest.mark.slow
@pytest.mark.mnist
def test_a_run_with_stdout_closed_is_a_clean_run(mnist_path, tmp_path):
    """`... >&-`: Python leaves sys.stdout None, and the first log line ended the run in an
    AttributeError traceback. Now the log goes nowhere and the run finishes; the closed
    descriptor is taken for /dev/null, so no file the run opens becomes its stdout."""
    out = tmp_path / "run"
    shell = 'exec "$0" "$@" >&-'  # a real closed stdout (DEVNULL would be an open one)
    proc = subprocess.run(
        ["sh", "-c", shell, sys.executable, "-m", TRAIN, "--data-dir", str(mnist_path),
         "--train-limit", "200", "--epochs", "1", "--seeds", "1", "--out", str(out)],
        cwd=REPO, stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert records.read_json(out / records.RESULT_FILE)
    assert (out / records.LOCK_FILE).read_text().strip().isdigit()  # the pid, nothing else


@pytest.mark.slow
def test_a_refusal_with_stderr_closed_still_exits_2(tmp_path):
    """`... 2>&-`: the error line has nowhere to go (print(file=None) would have sent it to
    stdout), but the status still says it."""
    (tmp_path / "a-file").write_text("a regular file\n")
    shell = 'exec "$0" "$@" 2>&-'
    proc = subprocess.run(["sh", "-c", shell, sys.executable, "-m", TRAIN,
                           "--out", str(tmp_path / "a-file")],
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr == ""
