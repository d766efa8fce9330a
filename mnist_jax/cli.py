"""What the command-line entry points share: flags, config building, the output folder,
and turning a UserError into one line on stderr and exit status 2 (no traceback)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Callable

from mnist_jax import data as data_lib
from mnist_jax import interrupts, processes, records, study_files
from mnist_jax.config import CONV_IMPLS, ENGINES, LAYOUTS, POOL_IMPLS, ModelConfig, TrainConfig
from mnist_jax.errors import TrainingDiverged, UserError

DEFAULT_SEEDS = 3  # the command line's default: a comparison needs a spread


# Upper bounds on the training flags: far beyond any sensible run, they turn a typo (an
# extra zero or three) into an error before the data is read rather than a run that never
# ends. A batch larger than the training data is the whole data (as in Keras); above
# MNIST's 60,000 training images it is a typo.
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 60_000
MAX_SEEDS = 1_000


def _int_at_least(minimum: int, what: str, maximum: int | None = None):
    """An argparse type: an integer >= minimum (and <= maximum), else a message naming
    the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{text} is more than the limit of {maximum:,}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "0 or more")


def learning_rate(text: str) -> float:
    """An argparse type: a finite number > 0 (not nan, inf or a negative)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"learning rate must be a positive number, got {value}")
    return value


def int_tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(positive_int(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of positive integers") from None
    return values


def add_training_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    """The flags every training entry point takes; defaults are the notebook's protocol."""
    d = TrainConfig()
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="folder holding the four MNIST .gz files, used offline after "
                             "checking tensorflow-datasets' registered checksums (default: "
                             f"${data_lib.DATA_DIR_ENV}, else download once into "
                             f"{data_lib.DEFAULT_CACHE})")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"output folder, new or empty (default: {default_out}/<date-time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out after its last finished epoch (the "
                             "same flags as when it started; finished models are kept)")
    parser.set_defaults(default_out=default_out, prog=parser.prog)
    parser.add_argument("--epochs", type=_int_at_least(1, "a positive integer", MAX_EPOCHS),
                        default=d.epochs,
                        help=f"most epochs to train, at most {MAX_EPOCHS:,} (default: {d.epochs})")
    parser.add_argument("--batch-size", type=_int_at_least(1, "a positive integer",
                                                           MAX_BATCH_SIZE),
                        default=d.batch_size,
                        help=f"training batch size, at most {MAX_BATCH_SIZE:,}; one larger than "
                             f"the training data is the whole data (default: {d.batch_size})")
    parser.add_argument("--patience", type=_int_at_least(0, "0 or more", MAX_EPOCHS),
                        default=d.patience,
                        help="early stopping: epochs without val_accuracy improvement before "
                             f"stopping (default: {d.patience})")
    parser.add_argument("--seed", type=non_negative_int, default=d.seed,
                        help=f"first seed: run i uses seed SEED + i for its initialisation, "
                             f"dropout and shuffling (default: {d.seed})")
    parser.add_argument("--seeds", type=_int_at_least(1, "a positive integer", MAX_SEEDS),
                        default=DEFAULT_SEEDS,
                        help=f"independent seeds per model, for intervals and tests, at most "
                             f"{MAX_SEEDS:,} (default: {DEFAULT_SEEDS}; the notebook ran 1)")
    parser.add_argument("--layout", choices=LAYOUTS, default=d.layout,
                        help="how seeds share the device: 'vmap' (one program over a seed "
                             "axis), 'map' (one program, seeds one after another), 'sequential' "
                             "(one after another from Python, compiled once), 'auto' (the "
                             "faster measured for the backend)")
    parser.add_argument("--validation", choices=data_lib.VALIDATIONS, default="holdout",
                        help="'holdout' (default): select epochs on a fixed stratified holdout "
                             "of the training set and report the test set once per seed; "
                             "'test': the notebook's protocol, select on the test set")
    # default None: given with --validation test, where nothing is held out, it is refused
    # (after parsing, by ArgumentParser's checks) rather than silently ignored.
    parser.add_argument("--holdout-size", type=positive_int, default=None,
                        metavar="N", help="training images held out for validation under "
                                          f"--validation holdout (default: {data_lib.HOLDOUT_SIZE:,})")
    parser.checks.append(_resolve_holdout_size)
    parser.add_argument("--learning-rate", type=learning_rate, default=d.learning_rate,
                        help=f"Adam learning rate (default: {d.learning_rate})")
    parser.add_argument("--engine", choices=ENGINES, default=d.engine,
                        help="'scan': the epoch as one compiled program; 'loop': one compiled "
                             "step per batch; 'auto' picks the faster for the backend")
    parser.add_argument("--conv-impl", choices=CONV_IMPLS, default="auto",
                        help="convolution formulation: 'xla' (lax.conv), 'patches' (shifted "
                             "slices and one matmul), 'auto' (the faster for the backend)")
    parser.add_argument("--pool-impl", choices=POOL_IMPLS, default="auto",
                        help="max-pool formulation: 'window' (reduce_window), 'reshape', 'auto'")
    parser.add_argument("--train-limit", type=positive_int, default=None, metavar="N",
                        help="use only the first N training and N/6 validation and test images "
                             "(for quick checks; the study's numbers need the full sets)")
    parser.add_argument("--devices", type=positive_int, default=None, metavar="N",
                        help="devices to use (default: every local device of the backend); "
                             "with more than one, seeds are spread over them")
    parser.add_argument("--data-parallel", type=positive_int, default=d.data_parallel,
                        metavar="D", help="split each batch over D of the devices (the mesh's "
                                          "data axis; the seeds axis is the rest; default: 1)")
    add_debug_arg(parser)
    processes.add_args(parser)


def _resolve_holdout_size(args) -> str | None:
    """--holdout-size only with --validation holdout; its default filled in."""
    if args.holdout_size is None:
        args.holdout_size = data_lib.HOLDOUT_SIZE
    elif args.validation != "holdout":
        return (f"--holdout-size is for --validation holdout: --validation {args.validation} "
                f"selects epochs on the test set and holds no training images out")
    return None


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error in the input too (errors in the "
                             "code always show theirs)")


def model_config(args, base: ModelConfig) -> ModelConfig:
    """`base` with the formulation flags applied (they change speed, not the function)."""
    return dataclasses.replace(base, conv_impl=args.conv_impl, pool_impl=args.pool_impl)


def train_config(args) -> TrainConfig:
    """The training flags as a TrainConfig; a placement the devices cannot take is refused
    here, before the data is loaded or anything compiled (seconds on a CPU)."""
    config = TrainConfig(seed=args.seed, seeds=args.seeds, layout=args.layout,
                         epochs=args.epochs, batch_size=args.batch_size, patience=args.patience,
                         learning_rate=args.learning_rate, engine=args.engine,
                         devices=args.devices, data_parallel=args.data_parallel)
    from mnist_jax import engine  # JAX: not for the commands that only read files

    engine.check_placement(config)
    return config


def load_splits(args) -> data_lib.Splits:
    """MNIST, split under the --validation protocol (and cut to --train-limit). Every
    process of a multi-process run loads its own (a problem on one stops all)."""
    with processes.agreed():
        return data_lib.make_splits(data_lib.load_mnist(args.data_dir, name="--data-dir"),
                                    args.validation, args.holdout_size, args.train_limit)


def check_finite(diverged: list[tuple[str, list[int]]]) -> None:
    """After everything else is written: a run where some seed diverged is an error. The
    line is true whether none, some or all seeds have a result (the summary says which)."""
    bad = [f"{name} seed(s) {', '.join(map(str, seeds))}" for name, seeds in diverged if seeds]
    if bad:
        raise TrainingDiverged(f"training diverged (loss not finite) for {'; '.join(bad)}; "
                               f"a diverged seed has a result only if it improved before "
                               f"diverging (summary.md says which): lower --learning-rate")


def claim_out(args, study: bool = False) -> records.RunDir | records.SharedDir:
    """The output folder, claimed for this process before anything else happens (data
    loading included): `--out`, new or empty, or with --resume the folder of an earlier
    run of the same kind of command (`study`: a study's, whose runs are its subfolders;
    else one model's run, the folder itself); without --out a new `<default>/<date-time>`
    folder, unique even for runs started in the same second. Use as a context manager;
    the claim ends with the process. Of several processes, process 0 claims the folder
    (its date-time name is shared with the others) and the others use it."""
    if processes.count() == 1:
        return _claim_out(args, study)
    with processes.agreed():
        claim = _claim_out(args, study) if processes.is_writer() else None
    path = processes.shared(str(claim.path) if claim is not None else "")
    return claim if claim is not None else records.SharedDir(path)


def _claim_out(args, study: bool) -> records.RunDir:
    if args.out is None:
        if args.resume:
            raise UserError("--resume needs --out, the folder of the run to continue")
        return records.RunDir(records.new_run_dir(args.default_out), what="--out", created=True)
    path = Path(args.out).expanduser()
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {path} is a file, not a folder")
        if args.resume and not (path / records.LOCK_FILE).exists():
            raise UserError(f"--resume: {path} holds no run to continue")
        if args.resume and (problem := _made_by_the_other_command(path, args.prog, study)):
            raise UserError(problem)
    except OSError as e:
        raise UserError(f"cannot use --out {path}: {e.strerror or e}") from None
    return records.RunDir(path, resume=args.resume, what="--out")


def _made_by_the_other_command(path: Path, prog: str, study: bool) -> str | None:
    """Why `prog` cannot resume `path`, if another kind of command made it: a study's
    folder has study.json (written before anything else) and its runs in subfolders; one
    model's run has its files (config.json first) at the top. None if it may."""
    top = [name for name in records.RUN_CONTENTS if (path / name).exists()]
    if study:
        if top and not (path / study_files.STUDY_FILE).exists():
            return (f"--resume: {path} holds one model's run ({top[0]} at its top, no "
                    f"{study_files.STUDY_FILE}), not a study: {prog} cannot continue it; "
                    f"resume it with the command that started it")
        return None
    runs = sorted(p.name for p in path.iterdir() if p.is_dir()
                  and any((p / name).exists() for name in records.RUN_CONTENTS))
    if (path / study_files.STUDY_FILE).exists() or (runs and not top):
        held = (f"its {study_files.STUDY_FILE}" if (path / study_files.STUDY_FILE).exists()
                else f"runs in {', '.join(runs)}")
        return (f"--resume: {path} holds a study ({held}), not one model's run: {prog} "
                f"cannot continue it; resume it with the study's command")
    return None


@contextlib.contextmanager
def claimed_out(args, run_dirs: Callable[[Path], list[Path]], study: bool = False):
    """claim_out for the body of a training command, yielding the claimed RunDir. On an
    interrupt, the summary says how far `run_dirs(out)` got and the log says how to
    resume, before the interrupt goes on to run_main. `study`: the command is a study's
    (its runs are subfolders of --out), for claim_out's check on --resume."""
    claim = claim_out(args, study=study)
    with claim as out:
        try:
            yield claim
        except interrupts.Interrupted:
            if processes.is_writer():
                study_files.write_interrupted_summary(out, run_dirs(out))
            log(f"resume with: {resume_command(args, out)}")
            raise


def resume_command(args, out: Path) -> str:
    """The command line that continues this run: the same flags, --out and --resume."""
    argv = list(sys.argv[1:])
    if args.out is None:
        argv += ["--out", str(out)]
    if not args.resume:
        argv.append("--resume")
    return shlex.join([*args.prog.split(), *argv])


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error on one line ("error: ...") and exit status 2, and no
    abbreviated flags (the study would read `--conv 8,16` as `--conv-impl 8,16`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)
        # Run on the parsed flags, in order: a message is a usage error (flags that do not
        # go together); each may also fill in a default that depends on other flags.
        self.checks: list[Callable[[argparse.Namespace], str | None]] = []

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for check in self.checks:
            if (problem := check(namespace)) is not None:
                self.error(problem)
        return namespace, extras

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_main(body: Callable[[], None], debug: bool = False,
             args: argparse.Namespace | None = None) -> int:
    """Run a command's body; bad input or a failed write becomes 'error: ...' on stderr
    and exit status 2, with no traceback (with `debug` (--debug), with its traceback).
    SIGINT and SIGTERM stop it cleanly (exit 130, 143; interrupts.py). With `args` (the
    training flags), the run's processes are connected first (processes.initialize)."""
    _null_closed_std_streams()
    if not debug:
        # Orbax and tensorflow-datasets log their failures through absl before raising; the
        # one-line error below says the same, so their log lines would only repeat it.
        logging.getLogger("absl").setLevel(logging.CRITICAL)
        _quiet_orbax_event_loops()
    try:
        with interrupts.handled():
            if args is not None:
                processes.initialize(args)
            body()
            interrupts.check()  # of several processes: a signal that came after the last check
    except interrupts.Interrupted as e:
        print(f"interrupted ({e}): every finished epoch is saved", file=sys.stderr)
        return e.exit_status
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed mid-run: disk full, permissions, ...
        if debug:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except Exception as e:
        if processes.lost_process_error(e):
            processes.end_for_lost_process(e)
        if debug or not _out_of_device_memory(e):
            raise  # a bug: keep its traceback
        print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}",
              file=sys.stderr)
        return 2
    return 0


def _quiet_orbax_event_loops() -> None:
    """A checkpoint save or restore that fails (a full disk, an unreadable file) returns
    its error while TensorStore's other reads and writes of it are still in flight: Orbax
    has closed the asyncio loop that awaited them, so each one that finishes later raises
    RuntimeError("Event loop is closed") in TensorStore's thread (printed as an unraisable
    exception, anywhere around the one error line), and each later failure of them is
    logged by asyncio as "Future exception was never retrieved". Both only repeat the
    error the command reports: dropped (any other unraisable exception is printed)."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable) -> None:
        if not _closed_loop_callback(unraisable):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


def _closed_loop_callback(unraisable) -> bool:
    """Whether an unraisable exception is asyncio's refusal to schedule a callback on a
    closed event loop (raised by BaseEventLoop._check_closed)."""
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return False
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return bool(frames) and frames[-1].name == "_check_closed" and (
        Path(frames[-1].filename).parent.name == "asyncio")


def _null_closed_std_streams() -> None:
    """A command started with stdout or stderr closed (`>&-`, `2>&-`), where Python leaves
    sys.stdout (sys.stderr) None, runs as with it sent to /dev/null: the run's files are
    its record. The free file descriptor is taken for /dev/null too, or the next file the
    run opens would get it and any library's writes to stdout would land in that file."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
        except OSError:  # closed
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        setattr(sys, name, open(os.devnull, "w"))


def _out_of_device_memory(e: Exception) -> bool:
    """A batch or model too large for the device: the user's choice, not a bug. Any other
    error from XLA (a deleted buffer, an invalid argument) is the program's."""
    jax = sys.modules.get("jax")  # not imported (the report): the error is not JAX's
    return (jax is not None and isinstance(e, jax.errors.JaxRuntimeError)
            and str(e).lstrip().startswith("RESOURCE_EXHAUSTED"))


def log(line: str) -> None:
    """Print a line to stdout, above any progress bars (tqdm clears and redraws them)."""
    from tqdm.auto import tqdm

    if sys.stdout is None:  # closed, outside run_main (which sends it to /dev/null)
        return
    try:
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
    except OSError as e:  # a full disk under a redirected log, a closed pipe
        sys.stdout = open(os.devnull, "w")  # nothing more to it, not even at exit
        raise UserError(f"cannot write the log to stdout: {e.strerror or e} (the run's "
                        f"files so far are saved; --resume continues it)") from None
