"""fit() and the command-line entry points, end to end on small data."""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from mnist_jax import cli, data, records, report
from mnist_jax.checkpointing import restore_state
from mnist_jax.recorder import seed_checkpoint_dir
from mnist_jax.config import ModelConfig, TrainConfig
from mnist_jax.errors import UserError
from mnist_jax.train import fit

from conftest import REPO

SMALL = ModelConfig(conv_features=(8, 8), dense_features=(32,), dropout_rate=0.1)


@pytest.fixture
def splits(tiny):
    """The notebook's protocol on the synthetic data: 500 train, 200 val = test."""
    return data.make_splits(tiny, "test")


def test_fit_writes_the_run_and_restores_the_best_weights(splits, tmp_path):
    lines = []
    result = fit(SMALL, TrainConfig(epochs=4, patience=1, seed=0), splits, tmp_path / "run",
                 name="small", log=lines.append)
    es = result.seeds[0].early_stopping
    history = records.read_history(tmp_path / "run" / records.HISTORY_FILE)
    assert len(history) == len(result.history) == (es.stopped_epoch or 4)
    for row in history:
        assert 0.0 <= row["val_accuracy"] <= 1.0 and row["epoch_time_s"] > 0
        assert row["rss_mb_peak"] > 0 and row["resource_samples"] >= 1
    assert history[-1]["val_accuracy"] > 0.5  # the synthetic classes are learnable
    best = es.best_epoch
    assert [r["epoch"] for r in history if r["improved"]][-1] == best
    checkpoints = tmp_path / "run" / seed_checkpoint_dir(0)
    assert [p.name for p in checkpoints.iterdir() if p.name.isdigit()] == [str(best)]
    state = jax.tree.map(lambda x: x[0], result.states)  # the one seed's restored state
    restored = restore_state(checkpoints, best, state)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(a, b)
    config = json.loads((tmp_path / "run" / records.CONFIG_FILE).read_text())
    assert config["model"]["num_params"] == result.num_params and config["train"]["engine"] == "scan"
    assert config["data"] == {"validation": "test", "holdout_size": None, "train_limit": None,
                              "train_examples": 500, "val_examples": 200, "test_examples": 200}
    assert sum("epoch" in line and "val_acc" in line for line in lines) == len(history)
    # The test figure is the restored weights' on the test split (here = the val split).
    saved = json.loads((tmp_path / "run" / records.RESULT_FILE).read_text())["seeds"][0]
    assert saved["test_accuracy"] == history[best - 1]["val_accuracy"]


def test_fit_stops_early_by_keras_rules_and_restores_the_best_epoch(splits, tmp_path):
    """patience 0: training stops at the first epoch that does not strictly improve, and
    the returned state is the best epoch's (its step counter says which)."""
    result = fit(SMALL, TrainConfig(epochs=30, patience=0, seed=0, learning_rate=3e-2),
                 splits, tmp_path, log=lambda line: None)
    es = result.seeds[0].early_stopping
    accuracies = [row["val_accuracy"] for row in result.history]
    assert es.should_stop and len(accuracies) == es.stopped_epoch < 30
    assert all(b > a for a, b in zip(accuracies[:-2], accuracies[1:-1]))  # improving...
    assert accuracies[-1] <= accuracies[-2]  # ...until the stop epoch
    assert es.best_epoch == es.stopped_epoch - 1
    state = jax.tree.map(lambda x: x[0], result.states)
    assert int(state.step) == es.best_epoch * 16  # 16 steps per epoch, not the last
    saved = restore_state(tmp_path / seed_checkpoint_dir(0), es.best_epoch, state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layout", ["sequential", pytest.param("vmap", marks=pytest.mark.slow),
                                    pytest.param("map", marks=pytest.mark.slow)])
def test_each_seed_gets_its_own_best_weights_back(splits, tmp_path, layout):
    """Three seeds whose best epochs differ: each seed's returned state, best checkpoint
    and test figures are its own best epoch's, not another seed's or the last epoch's.
    Monitored on val_loss (mode min): the synthetic data's accuracy saturates at 1.0 in
    the same epoch for every seed, its loss does not."""
    cfg = TrainConfig(epochs=8, patience=1, seed=0, seeds=3, layout=layout, learning_rate=1e-2,
                      monitor="val_loss")
    result = fit(SMALL, cfg, splits, tmp_path, log=lambda line: None)
    best_epochs = [s.early_stopping.best_epoch for s in result.seeds]
    assert len(set(best_epochs)) > 1, best_epochs  # else a mix-up of seeds could pass
    saved = json.loads((tmp_path / records.RESULT_FILE).read_text())["seeds"]
    for i, (seed, best) in enumerate(zip(result.seeds, best_epochs)):
        state = jax.tree.map(lambda x: x[i], result.states)
        assert int(state.step) == best * 16  # 16 steps per epoch
        checkpoint = restore_state(tmp_path / seed_checkpoint_dir(seed.seed), best, state)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(checkpoint)):
            np.testing.assert_array_equal(a, b)
        # Validation is the test split here: the restored weights score what epoch `best` did.
        row = next(r for r in result.history if (r["seed"], r["epoch"]) == (seed.seed, best))
        assert saved[i]["seed"] == seed.seed and saved[i]["best_epoch"] == best
        assert saved[i]["best_value"] == row["val_loss"] == min(
            r["val_loss"] for r in result.history if r["seed"] == seed.seed)
        assert saved[i]["test_accuracy"] == row["val_accuracy"]
        assert saved[i]["test_loss"] == row["val_loss"]


def test_fit_refuses_a_used_run_folder(splits, tmp_path):
    (tmp_path / "history.csv").write_text("epoch\n1\n")
    with pytest.raises(UserError, match="already holds files"):
        fit(SMALL, TrainConfig(epochs=1), splits, tmp_path, log=lambda line: None)
    assert (tmp_path / "history.csv").read_text() == "epoch\n1\n"


@pytest.mark.slow
def test_report_from_files(splits, tmp_path):
    for name, conv in (("a", (8, 8)), ("b", (8, 8, 8))):
        fit(ModelConfig(conv_features=conv, dense_features=(16,)), TrainConfig(epochs=2, seeds=2),
            splits, tmp_path / name, name=name, log=lambda line: None)
    summary = report.write_study_report(tmp_path, [tmp_path / "a", tmp_path / "b"])
    assert [v["name"] for v in summary["variants"]] == ["a", "b"]
    history = records.read_history(tmp_path / "a" / records.HISTORY_FILE)
    for seed in (0, 1):
        best = max(r["val_accuracy"] for r in history if r["seed"] == seed)
        assert summary["variants"][0]["best_val_accuracy"]["values"][seed] == best
    for figure in report.FIGURES.values():
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| a |" in (tmp_path / "summary.md").read_text()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["variants"][1]["conv_features"] == [8, 8, 8]
    assert saved["comparisons"][0]["metric"] == "best_val_accuracy"  # the notebook's protocol
    assert saved["sentence"].startswith("Over 2 seeds each, b's best validation accuracy")


def _run(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.mnist
def test_depth_study_end_to_end_on_tiny_real_data(small_study, tmp_path):
    out = tmp_path / "study"  # conftest.small_study: 3 seeds, 2 epochs, 960 images
    shutil.copytree(small_study.out, out)
    proc = SimpleNamespace(stdout=small_study.stdout)
    for name in ("2conv", "3conv"):
        history = records.read_history(out / name / records.HISTORY_FILE)
        assert sorted((r["seed"], r["epoch"]) for r in history) == [
            (s, e) for s in range(3) for e in (1, 2)]
        result = json.loads((out / name / records.RESULT_FILE).read_text())
        assert result["validation"] == "holdout"
        for seed in result["seeds"]:
            assert (out / name / seed["best_checkpoint"]).is_dir()
            assert 0 < seed["test_accuracy"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["validation"] == "holdout"
    assert [v["num_params"] for v in summary["variants"]] == [113_386, 37_674]
    for v in summary["variants"]:
        for key in ("test_accuracy", "best_val_accuracy"):
            d = v[key]
            assert len(d["values"]) == 3 and d["ci_low"] <= d["mean"] <= d["ci_high"]
            assert d["sd"] > 0
    welch = summary["comparisons"][0]["welch"]
    assert welch["test"].startswith("Welch") and 0 <= welch["p_value"] <= 1
    assert welch["ci_low"] <= welch["difference"] <= welch["ci_high"]
    assert summary["comparisons"][0]["metric"] == "test_accuracy"
    assert summary["sentence"] in proc.stdout and "Over 3 seeds each" in summary["sentence"]
    figures = list(report.FIGURES.values())
    assert all((out / f).stat().st_size > 10_000 for f in figures)
    assert "2conv" in proc.stdout and "val_acc" in proc.stdout
    # The report redraws every figure and the summary from the files alone, without JAX.
    for name in ("summary.json", *figures):
        (out / name).unlink()
    code = ("import runpy, sys; sys.modules['jax'] = None; sys.argv = ['report', sys.argv[1]];"
            "runpy.run_module('mnist_jax.report', run_name='__main__')")
    proc = _run("-c", code, str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "summary.json").read_text())["sentence"] == summary["sentence"]
    assert all((out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)


@pytest.mark.mnist
def test_every_training_flag_reaches_the_configs_and_the_splits(mnist_path):
    parser = cli.ArgumentParser(prog="test")
    cli.add_training_args(parser, default_out="runs/test")
    args = parser.parse_args([
        "--data-dir", str(mnist_path), "--epochs", "7", "--batch-size", "64", "--patience", "2",
        "--seed", "5", "--seeds", "4", "--layout", "map", "--learning-rate", "0.002",
        "--engine", "loop", "--conv-impl", "xla", "--pool-impl", "window",
        "--validation", "test", "--train-limit", "600"])
    assert cli.train_config(args) == TrainConfig(
        seed=5, seeds=4, layout="map", epochs=7, batch_size=64, patience=2,
        learning_rate=0.002, engine="loop")
    assert cli.model_config(args, ModelConfig(conv_features=(32, 32))) == ModelConfig(
        conv_features=(32, 32), conv_impl="xla", pool_impl="window")
    splits = cli.load_splits(args)  # the notebook's protocol: validation is the test set
    assert splits.validation == "test" and len(splits.train.labels) == 600
    assert len(splits.val.labels) == len(splits.test.labels) == 100
    np.testing.assert_array_equal(splits.val.images, splits.test.images)
    # config.json records the slice, not only its counts (--resume compares it).
    assert (splits.holdout_size, splits.limit) == (None, 600)

    splits = cli.load_splits(parser.parse_args(
        ["--data-dir", str(mnist_path), "--holdout-size", "1200"]))
    assert splits.validation == "holdout"
    assert [len(s.labels) for s in (splits.train, splits.val, splits.test)] == [58_800, 1_200,
                                                                               10_000]
    assert splits.record() == {"validation": "holdout", "holdout_size": 1_200,
                               "train_limit": None, "train_examples": 58_800,
                               "val_examples": 1_200, "test_examples": 10_000}


def test_resume_without_a_folder_is_a_fresh_start(splits):
    result = fit(SMALL, TrainConfig(epochs=1), splits, None, resume=True, log=lambda line: None)
    assert result.states.step.tolist() == [16] and len(result.history) == 1


def test_another_optimizer_swaps_in_without_editing_the_library(splits):
    result = fit(SMALL, TrainConfig(epochs=1), splits, None, tx=optax.sgd(0.05), log=lambda line: None)
    expected = jax.tree.structure(optax.sgd(0.05).init(result.states.params))
    assert jax.tree.structure(result.states.opt_state) == expected
    assert result.states.step.tolist() == [16]


def test_report_refuses_damaged_or_missing_files_in_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / records.CONFIG_FILE).write_text("{}")
    proc = _run("-m", "mnist_jax.report", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is not a finished run: history.csv is missing" in proc.stderr
    (run / records.CONFIG_FILE).write_text("{not json")
    (run / records.HISTORY_FILE).write_text("epoch,val_accuracy\n1,0.5\n")
    (run / records.RESULT_FILE).write_text("{}")
    (run / "test_predictions.npz").write_bytes(b"")
    with pytest.raises(UserError, match=f"{run / records.CONFIG_FILE} is damaged: Expecting"):
        report.read_run(run)


@pytest.mark.slow
@pytest.mark.mnist
def test_same_seed_same_files_across_processes(mnist_path, tmp_path):
    """Bit-identical results from two separate processes, not only within one."""
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        proc = _run("-m", "mnist_jax.train", "--data-dir", str(mnist_path), "--train-limit", "640",
                    "--epochs", "2", "--seed", "3", "--seeds", "1", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
    a, b = (records.read_history(o / records.HISTORY_FILE) for o in outs)
    assert [[row[k] for k in keys] for row in a] == [[row[k] for k in keys] for row in b]
    with ocp.CheckpointManager((outs[0] / seed_checkpoint_dir(3)).absolute()) as m0, \
            ocp.CheckpointManager((outs[1] / seed_checkpoint_dir(3)).absolute()) as m1:
        best = m0.latest_step()
        p0 = m0.restore(best, args=ocp.args.StandardRestore())["params"]
        p1 = m1.restore(best, args=ocp.args.StandardRestore())["params"]
    for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_array_equal(x, y)
