"""One study over two processes on localhost (processes.py): 2 forced CPU devices each,
Gloo's collectives between them, the same flags as one process on 4 devices.

Each process trains its own devices' seeds with the same per-device program as the
one-process run on 4 devices, so the numbers are equal bit for bit, not within a
tolerance: the two runs differ only in where the devices live."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, without_compilation_cache

pytestmark = pytest.mark.slow

FLAGS = ("--seeds", "3", "--epochs", "2", "--train-limit", "480")


def _env(devices: int, cache: bool = True) -> dict:
    """This process's environment with `devices` forced CPU devices; `cache=False`: without
    the session's compilation cache, for processes killed at any moment."""
    env = dict(os.environ) if cache else without_compilation_cache()
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""),
                                 f"--xla_force_host_platform_device_count={devices}"])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _study(mnist_path, out, *extra):
    return [sys.executable, "-m", "experiments.depth_study", "--data-dir", str(mnist_path),
            *FLAGS, "--out", str(out), *extra]


def _start_two(mnist_path, out, *extra, cache=True) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one run, 2 devices each."""
    coordinator = f"localhost:{_free_port()}"
    return [subprocess.Popen(_study(mnist_path, out, *extra, "--coordinator", coordinator,
                                    "--num-processes", "2", "--process-id", str(i)),
                             cwd=REPO, env=_env(2, cache), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def _finish(procs, timeout=900) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process, once it has ended."""
    ended = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *outs) for p, outs in zip(procs, ended)]


def _results(out) -> dict:
    """Every number a study records per seed: history rows (without times and resources)
    and result.json's seeds."""
    kept = ("epoch", "seed", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
            "improved")
    found = {}
    for name in ("2conv", "3conv"):
        lines = (out / name / "history.csv").read_text().splitlines()
        header = lines[0].split(",")
        found[name, "history"] = [{k: v for k, v in zip(header, line.split(",")) if k in kept}
                                  for line in lines[1:]]
        found[name, "result"] = json.loads((out / name / "result.json").read_text())["seeds"]
    return found


@pytest.fixture(scope="module")
def one_process(mnist_path, tmp_path_factory):
    """The reference: the same study in one process on 4 devices."""
    out = tmp_path_factory.mktemp("one_process") / "study"
    proc = subprocess.run(_study(mnist_path, out), cwd=REPO, env=_env(4), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return out


def test_two_processes_write_one_study_equal_to_one_process_on_four_devices(
        mnist_path, tmp_path, one_process):
    out = tmp_path / "study"
    (rc0, out0, err0), (rc1, out1, err1) = _finish(_start_two(mnist_path, out))
    assert (rc0, rc1) == (0, 0), err0 + err1
    assert err1 == "" and out1 == ""  # process 0 speaks for the run
    assert "4 devices: seeds over 4 (1 inactive padding), data over 1" in out0
    assert _results(out) == _results(one_process)
    rows = _results(out)["2conv", "history"]
    assert len(rows) == len({(r["epoch"], r["seed"]) for r in rows}) == 6  # written once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["variants"][0]["name"] == "2conv"
    config = json.loads((out / "2conv" / "config.json").read_text())
    assert config["placement"] == {"devices": 4, "device_kind": "cpu", "processes": 2,
                                   "mesh": {"seeds": 4, "data": 1}, "padded_seeds": 1}


def _wait_for(path, procs, timeout=600):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_both_processes_killed_after_an_epoch_resume_to_the_uninterrupted_run(
        mnist_path, tmp_path, one_process):
    out = tmp_path / "study"
    procs = _start_two(mnist_path, out, cache=False)
    _wait_for(out / "2conv" / "checkpoints" / "latest" / "1", procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    _finish(procs)
    assert not (out / "summary.json").exists()
    (rc0, _, err0), (rc1, _, err1) = _finish(_start_two(mnist_path, out, "--resume"))
    assert (rc0, rc1) == (0, 0), err0 + err1
    assert _results(out) == _results(one_process)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_ends_the_other_within_two_minutes_with_one_line(
        mnist_path, tmp_path, victim):
    out = tmp_path / "study"
    procs = _start_two(mnist_path, out, cache=False)
    _wait_for(out / "2conv" / "history.csv", procs)
    procs[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=300)
    waited = time.monotonic() - killed
    procs[victim].communicate()
    assert survivor.returncode != 0
    assert waited < 120, waited
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: process {victim} ") and "--resume" in lines[0], err


def test_a_folder_refused_on_process_0_is_the_same_line_on_both(mnist_path, tmp_path):
    taken = tmp_path / "a_file"
    taken.write_text("not a folder")
    results = _finish(_start_two(mnist_path, taken))
    assert [rc for rc, _, _ in results] == [2, 2]
    lines = [err.strip() for _, _, err in results]
    assert lines[0] == lines[1] == f"error: --out {taken} is a file, not a folder", lines
    assert taken.read_text() == "not a folder"
