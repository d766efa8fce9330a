"""One run over several processes (several hosts, or several processes on one), with JAX's
own multi-process runtime: `jax.distributed` connects them, the mesh (engine.Placement)
spans every process's devices, XLA's collectives (Gloo on CPU) carry what they share, and
Orbax writes each process's part of a checkpoint.

    --coordinator HOST:PORT --num-processes P --process-id I   (on every process)
    or, with none of them, what jax.distributed.initialize() detects (SLURM, Open MPI, ...)

Every process runs the same program on the same flags: it loads MNIST itself, trains its
devices' seeds and takes the same decisions from the same (all-gathered) numbers. Process
0 alone claims the output folder (on a filesystem every process sees), writes the run's
files and prints; the others print only errors. Checkpoints are written by every process
(Orbax's multi-process path).

Failures end every process, never one of them alone (the others would wait in the next
collective for as long as its timeout):
- A problem found by one process inside an `agreed()` block (the folder refused, a
  damaged file, a full disk while process 0 writes) is exchanged at the block's end and
  raised on every process as the same one line.
- A process that dies (SIGKILL, a lost host) is found by jax.distributed's heartbeat
  (HEARTBEAT_TIMEOUT_S) or by the failed collective, and the others end within about that
  time with one line naming it (`StderrFilter` turns XLA's fatal log into that line).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import time

# Set on purpose rather than left at jax's defaults (100 s heartbeat, 300 s to connect and
# to shut down): a lost process ends the others in well under two minutes, inside the 30 s
# and 2 min that schedulers (SLURM's KillWait, Kubernetes) and users wait.
HEARTBEAT_TIMEOUT_S = 20
CONNECT_TIMEOUT_S = 120  # for every process to start and reach the coordinator
SHUTDOWN_TIMEOUT_S = 60

# The environments jax.distributed.initialize() configures itself from: several tasks of
# a SLURM step, of an Open MPI job, or a coordinator named in the environment.
_CLUSTER_SIZE_VARIABLES = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")

MESSAGE_BYTES = 1024  # the longest problem line agreed() exchanges


def add_args(parser: argparse.ArgumentParser) -> None:
    """--coordinator, --num-processes and --process-id (all three or none)."""
    group = parser.add_argument_group(
        "several processes (hosts)", "give all three on every process, or none (a SLURM or "
        "Open MPI job with several tasks is detected)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="address of process 0, where the others connect")
    group.add_argument("--num-processes", type=int, default=None, metavar="P",
                       help="how many processes run this training")
    group.add_argument("--process-id", type=int, default=None, metavar="I",
                       help="this process's number, 0 .. P-1 (0 writes the files)")
    parser.checks.append(_check_args)


def _check_args(args) -> str | None:
    given = [args.coordinator, args.num_processes, args.process_id]
    if any(v is not None for v in given) and None in given:
        return "--coordinator, --num-processes and --process-id go together: give all three"
    if args.coordinator is None:
        return None
    if not re.fullmatch(r".+:\d+", args.coordinator):
        return f"--coordinator {args.coordinator!r} is not HOST:PORT"
    if args.num_processes < 1:
        return f"--num-processes {args.num_processes} is not a positive integer"
    if not 0 <= args.process_id < args.num_processes:
        return (f"--process-id {args.process_id} is not one of 0..{args.num_processes - 1} "
                f"(--num-processes {args.num_processes})")
    return None


def cluster_detected() -> bool:
    """Whether the environment describes several processes jax can connect by itself."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in _CLUSTER_SIZE_VARIABLES)


def initialize(args) -> None:
    """Join the run's processes when the flags (or the environment) say there are several;
    else nothing. Call before anything uses JAX's devices."""
    if args.coordinator is None and not cluster_detected():
        return
    from mnist_jax.errors import UserError

    StderrFilter.start()
    import jax

    # Collectives between processes on CPU (the default, none, refuses them). GPUs use NCCL.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            args.coordinator, args.num_processes, args.process_id,
            initialization_timeout=CONNECT_TIMEOUT_S,
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
            shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    except Exception as e:  # unreachable coordinator, a process missing, a port taken
        where = f" at {args.coordinator}" if args.coordinator else ""
        raise UserError(f"cannot connect the run's processes{where}: "
                        f"{_first_line(e)}") from None
    from mnist_jax import interrupts

    interrupts.share_with_other_processes(first_signal)
    if jax.process_index() != 0:  # process 0 prints the run's lines (and Gloo's notes)
        sys.stdout.flush()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)


def count() -> int:
    """How many processes run this training (1 without jax.distributed)."""
    jax = sys.modules.get("jax")
    return jax.process_count() if jax is not None and _initialized() else 1


def index() -> int:
    jax = sys.modules.get("jax")
    return jax.process_index() if jax is not None and _initialized() else 0


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return index() == 0


def _initialized() -> bool:
    import jax

    return jax.distributed.is_initialized()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextlib.contextmanager
def agreed():
    """Run the body on every process; a problem raised in it on any process is raised on
    all of them, as the same one line (the lowest process's). An all-gather before the
    body (so that process 0 writes nothing another process is still reading) and one
    after it; nothing with one process. Every process must enter the same blocks in order."""
    if count() == 1:
        yield
        return
    from mnist_jax.errors import UserError

    exchange(None)  # every process has finished what came before (its reads, say)
    mine = None
    try:
        yield
    except (UserError, OSError) as e:
        mine = e
    problem = exchange(None if mine is None else problem_line(mine))
    if mine is not None and problem == problem_line(mine):
        raise mine
    if problem is not None:
        raise UserError(problem)


def problem_line(e: BaseException) -> str:
    """The line an error is reported as (cli.run_main prints it after 'error: ')."""
    if isinstance(e, OSError) and not type(e).__module__.startswith("mnist_jax"):
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror or e}{where}"
    return str(e)


def exchange(problem: str | None) -> str | None:
    """Every process's problem (None: none), all-gathered; the lowest process's, or None."""
    import numpy as np
    from jax.experimental import multihost_utils

    data = (problem or "").encode()[:MESSAGE_BYTES]
    mine = np.zeros(MESSAGE_BYTES + 1, np.uint8)
    mine[0] = problem is not None
    mine[1:1 + len(data)] = np.frombuffer(data, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))
    for row in every:
        if row[0]:
            return bytes(row[1:]).rstrip(b"\0").decode(errors="replace")
    return None


def first_signal(mine: int | None) -> int | None:
    """The signal (SIGINT, SIGTERM) the lowest process that received one received."""
    import numpy as np
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(np.int32(mine or 0)))
    return next((int(s) for s in every.ravel() if s), None)


def shared(value: str) -> str:
    """Process 0's `value` (a string), on every process."""
    if count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.zeros(MESSAGE_BYTES, np.uint8)
    encoded = value.encode()[:MESSAGE_BYTES]
    data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(got.astype(np.uint8)).rstrip(b"\0").decode()


def lost_process_error(e: BaseException) -> bool:
    """Whether an error is a collective failing because another process is gone."""
    text = str(e)
    return count() > 1 and any(s in text for s in (
        "Gloo", "Connection closed by peer", "Connection reset", "coordination service",
        "DEADLINE_EXCEEDED", "UNAVAILABLE"))


def raise_if_lost(e: BaseException) -> None:
    """Raise `e` as it is if it is a collective failing for a lost process (cli.run_main
    ends the process for it), rather than let the caller report it as its own failure."""
    if lost_process_error(e):
        raise e


def end_for_lost_process(e: BaseException) -> None:
    """A collective failed because a process is gone: wait for jax.distributed's heartbeat
    to name it (XLA then ends this process; StderrFilter prints the line), else say so
    without the name. Never returns."""
    deadline = time.monotonic() + HEARTBEAT_TIMEOUT_S + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"error: another process of this run is gone ({_first_line(e)}); this one stops "
          f"too: restart every process with --resume", file=sys.stderr, flush=True)
    os._exit(1)


class StderrFilter:
    """The lines of this process's stderr that are not the run's own, replaced.

    When a process of the run dies, XLA ends the others from a background thread with a
    fatal log (a dozen lines and a C++ stack trace) and abort(): jax.distributed offers no
    way to intercept it (its client's missed-heartbeat callback crashes in jaxlib 0.10 with
    std::bad_cast). So stderr goes through a small child process that passes every line on,
    except XLA's and Gloo's own log lines, and turns that fatal log into one line naming
    the lost process. The child outlives the abort (it reads until the pipe closes)."""

    @classmethod
    def start(cls) -> None:
        child = subprocess.Popen(
            [sys.executable, "-c", _FILTER_PROGRAM],
            stdin=subprocess.PIPE, stdout=sys.__stderr__ or subprocess.DEVNULL,
            start_new_session=True)  # a Ctrl-C at the terminal is the run's, not the filter's
        sys.stderr.flush()
        os.dup2(child.stdin.fileno(), 2)
        child.stdin.close()


# Run by the filter's child: stdin is the run's stderr. An XLA/absl log line starts with
# its severity and date ("E1202 07:08:56.871680 ..."); its continuation lines and the stack
# trace follow it. The fatal one names the lost process in "Task N heartbeat timeout", or
# in "stopped sending heartbeats):\nN"; process 0 (the coordinator) is gone when the
# coordination service's socket closed.
_FILTER_PROGRAM = r"""
import re, sys
log = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ")
in_log = fatal = False
text = []
for raw in sys.stdin.buffer:
    line = raw.decode(errors="replace")
    if line.startswith(("*** Check failure", "    @ ")):  # a fatal log's stack trace
        continue
    if log.match(line):
        in_log = True
        fatal = fatal or line.startswith("F")
        text.append(line)
        continue
    if in_log and (line.startswith((" ", "\t", "***", "RPC:", "Additional GRPC", ":UNKNOWN",
                                    "Barrier result", "This suggests", "The tasks have"))
                   or re.fullmatch(r"\d+\s*", line) or not line.strip()):
        text.append(line)
        continue
    in_log = False
    if line.startswith("[Gloo]"):
        continue
    sys.stderr.write(line)
    sys.stderr.flush()
if fatal:
    joined = "".join(text)
    lost = (re.search(r"Task (\d+) heartbeat timeout", joined)
            or re.search(r"stopped sending heartbeats\):\s*(\d+)", joined))
    if lost:
        who = f"process {lost.group(1)}"
    elif "Socket closed" in joined or "Connection refused" in joined or "UNAVAILABLE" in joined:
        who = "process 0 (the coordinator)"
    else:
        who = "another process"
    sys.stderr.write(f"error: {who} of this run stopped answering (killed, or its host lost): "
                     f"this process stops too; restart every process with --resume\n")
    sys.stderr.flush()
"""
