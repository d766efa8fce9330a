"""fit() and the command-line entry points, end to end on small data."""

import json
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from mnist_jax import records, report
from mnist_jax.checkpointing import restore_state
from mnist_jax.config import ModelConfig, TrainConfig
from mnist_jax.errors import UserError
from mnist_jax.train import fit

from conftest import REPO

SMALL = ModelConfig(conv_features=(8, 8), dense_features=(32,), dropout_rate=0.1)


def test_fit_writes_the_run_and_restores_the_best_weights(tiny, tmp_path):
    lines = []
    result = fit(SMALL, TrainConfig(epochs=4, patience=1, seed=0), tiny, tmp_path / "run",
                 name="small", log=lines.append)
    history = records.read_history(tmp_path / "run" / records.HISTORY_FILE)
    assert len(history) == len(result.history) == (result.early_stopping.stopped_epoch or 4)
    for row in history:
        assert 0.0 <= row["val_accuracy"] <= 1.0 and row["epoch_time_s"] > 0
        assert row["rss_mb_peak"] > 0 and row["resource_samples"] >= 1
    assert history[-1]["val_accuracy"] > 0.5  # the synthetic classes are learnable
    best = result.early_stopping.best_epoch
    assert [r["epoch"] for r in history if r["improved"]][-1] == best
    saved = [p.name for p in (tmp_path / "run" / "checkpoints" / "best").iterdir() if p.name.isdigit()]
    assert saved == [str(best)]
    restored = restore_state(tmp_path / "run" / "checkpoints" / "best", best, result.state)
    for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(a, b)
    config = json.loads((tmp_path / "run" / records.CONFIG_FILE).read_text())
    assert config["num_params"] == result.num_params and config["train"]["engine"] == "scan"
    assert sum("epoch" in line and "val_acc" in line for line in lines) == len(history)


def test_fit_stops_early_by_keras_rules_and_restores_the_best_epoch(tiny, tmp_path):
    """patience 0: training stops at the first epoch that does not strictly improve, and
    the returned state is the best epoch's (its step counter says which)."""
    result = fit(SMALL, TrainConfig(epochs=30, patience=0, seed=0, learning_rate=3e-2),
                 tiny, tmp_path, log=lambda line: None)
    es = result.early_stopping
    accuracies = [row["val_accuracy"] for row in result.history]
    assert es.should_stop and len(accuracies) == es.stopped_epoch < 30
    assert all(b > a for a, b in zip(accuracies[:-2], accuracies[1:-1]))  # improving...
    assert accuracies[-1] <= accuracies[-2]  # ...until the stop epoch
    assert es.best_epoch == es.stopped_epoch - 1
    assert int(result.state.step) == es.best_epoch * 16  # 16 steps per epoch, not the last
    saved = restore_state(tmp_path / "checkpoints" / "best", es.best_epoch, result.state)
    for a, b in zip(jax.tree.leaves(result.state), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)


def test_fit_refuses_a_used_run_folder(tiny, tmp_path):
    (tmp_path / "history.csv").write_text("epoch\n1\n")
    with pytest.raises(UserError, match="already holds files"):
        fit(SMALL, TrainConfig(epochs=1), tiny, tmp_path, log=lambda line: None)
    assert (tmp_path / "history.csv").read_text() == "epoch\n1\n"


def test_report_from_files(tiny, tmp_path):
    for name, conv in (("a", (8, 8)), ("b", (8, 8, 8))):
        fit(ModelConfig(conv_features=conv, dense_features=(16,)), TrainConfig(epochs=2),
            tiny, tmp_path / name, name=name, log=lambda line: None)
    summary = report.write_study_report(tmp_path, [tmp_path / "a", tmp_path / "b"])
    names = [run["name"] for run in summary["runs"]]
    assert names == ["a", "b"]
    history = records.read_history(tmp_path / "a" / records.HISTORY_FILE)
    assert summary["runs"][0]["best_val_accuracy"] == max(r["val_accuracy"] for r in history)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| a |" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["runs"][1]["conv_features"] == [8, 8, 8]


def _run(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.mnist
def test_depth_study_end_to_end_on_tiny_real_data(mnist_path, tmp_path):
    out = tmp_path / "study"
    proc = _run("-m", "experiments.depth_study", "--data-dir", str(mnist_path), "--epochs", "2",
                "--train-limit", "960", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in ("2conv", "3conv"):
        assert len(records.read_history(out / name / records.HISTORY_FILE)) == 2
        result = json.loads((out / name / records.RESULT_FILE).read_text())
        assert (out / name / result["best_checkpoint"]).is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert [run["num_params"] for run in summary["runs"]] == [113_386, 37_674]
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "summary.md").exists()
    assert "2conv" in proc.stdout and "val_acc" in proc.stdout
    # The report redraws from the files alone.
    assert _run("-m", "mnist_jax.report", str(out)).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs: 0 is not a positive integer"),
    (["--batch-size", "x"], "--batch-size: 'x' is not an integer"),
    (["--learning-rate", "nan"], "learning rate must be a positive number, got nan"),
    (["--learning-rate", "-1"], "learning rate must be a positive number, got -1.0"),
    (["--engine", "fast"], "invalid choice: 'fast'"),
    (["--data-dir", "/nonexistent/mnist"], "data folder /nonexistent/mnist (--data-dir) does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    proc = _run("-m", "experiments.depth_study", "--out", str(tmp_path / "o"), *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o").exists()  # nothing created for a run that never started


@pytest.mark.mnist
def test_an_unusable_output_folder_is_one_line(mnist_path, tmp_path):
    proc = _run("-m", "mnist_jax.train", "--data-dir", str(mnist_path), "--train-limit", "64",
                "--epochs", "1", "--out", "/proc/mnist_jax_cannot_write_here")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: cannot create run folder /proc/mnist_jax_cannot_write_here")


def test_a_used_output_folder_is_refused_and_kept(tmp_path):
    (tmp_path / "keep.txt").write_text("earlier result")
    proc = _run("-m", "mnist_jax.train", "--out", str(tmp_path), "--data-dir", "/nonexistent")
    assert proc.returncode == 2 and "already holds files" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "earlier result"


def test_another_optimizer_swaps_in_without_editing_the_library(tiny):
    result = fit(SMALL, TrainConfig(epochs=1), tiny, None, tx=optax.sgd(0.05), log=lambda line: None)
    expected = jax.tree.structure(optax.sgd(0.05).init(result.state.params))
    assert jax.tree.structure(result.state.opt_state) == expected
    assert int(result.state.step) == 16


def test_report_refuses_damaged_or_missing_files_in_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / records.RESULT_FILE).write_text("{not json")
    proc = _run("-m", "mnist_jax.report", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is not a finished run: config.json is missing" in proc.stderr
    (run / records.CONFIG_FILE).write_text("{}")
    (run / records.HISTORY_FILE).write_text("epoch,val_accuracy\n1,0.5\n")
    with pytest.raises(UserError, match="damaged file"):
        report.summarize_run(run)


@pytest.mark.mnist
def test_same_seed_same_files_across_processes(mnist_path, tmp_path):
    """Bit-identical results from two separate processes, not only within one."""
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        proc = _run("-m", "mnist_jax.train", "--data-dir", str(mnist_path), "--train-limit", "640",
                    "--epochs", "2", "--seed", "3", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
    a, b = (records.read_history(o / records.HISTORY_FILE) for o in outs)
    assert [[row[k] for k in keys] for row in a] == [[row[k] for k in keys] for row in b]
    with ocp.CheckpointManager((outs[0] / records.CHECKPOINT_DIR).absolute()) as m0, \
            ocp.CheckpointManager((outs[1] / records.CHECKPOINT_DIR).absolute()) as m1:
        best = m0.latest_step()
        p0 = m0.restore(best, args=ocp.args.StandardRestore())["params"]
        p1 = m1.restore(best, args=ocp.args.StandardRestore())["params"]
    for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_array_equal(x, y)


def test_data_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    proc = _run("-m", "experiments.depth_study", "--data-dir", str(tmp_path / "f"),
                "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: data folder {tmp_path / 'f'} (--data-dir) is a file, not a folder"


def test_benchmark_runs_in_tiny_mode(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("-m", "benchmarks.epoch_speed", "--tiny", "--frameworks", "jax",
                "--variants", "2conv", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())["results"]["2conv"]["jax"]
    assert result["median_s"] > 0 and result["num_params"] == 113_386
    assert result["compile_s"] > 0
