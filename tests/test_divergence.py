"""Training that fails (issue 14): a seed whose loss becomes NaN or infinite. A seed that
diverged before any improvement has no result (no test figures, no checkpoint, left out of
the statistics, the test and the figures); one that diverged after its best epoch keeps
that result; a model whose every seed diverged failed, and is never better or worse. Each
study here is run once, as its main() in this process, and every message is read: the
log lines, the sentence, summary.md, result.json, the closing error line (exit status 2),
and nothing else on stderr, no warning either."""

import contextlib
import io
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_jax import records, report, run, steps, study, train

pytestmark = pytest.mark.mnist

# 300 training images: 10 steps an epoch at batch 32 (the last padded), 50 test images.
FLAGS = ("--train-limit", "300", "--seeds", "3")
STEPS_PER_EPOCH = 10


def _main(main, argv, capfd):
    """main(argv) as `python -m` runs it: (exit status, stdout, stderr, the warnings that
    Python's default filters would show)."""
    stdout = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
        warnings.simplefilter("always")
        status = main(argv)
    shown = [w for w in caught if not issubclass(
        w.category, (DeprecationWarning, PendingDeprecationWarning, ImportWarning))]
    return status, stdout.getvalue(), capfd.readouterr().err, shown


def _poisoned(seed: int, from_step: int):
    """A train step that makes `seed`'s parameters and loss NaN from step `from_step` on."""
    target = jax.random.fold_in(jax.random.PRNGKey(seed), run.RUN_STREAM)  # seed's rng

    def train_step(state, batch):
        new, metrics = steps.train_step(state, batch)
        bad = jnp.all(state.rng == target) & (state.step >= from_step)
        params = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), new.params)
        return new.replace(params=params), {
            **metrics, "loss_sum": jnp.where(bad, jnp.nan, metrics["loss_sum"])}

    return train_step


def _predicted_seeds(run_dir) -> list[int]:
    """The seeds test_predictions.npz holds predictions of (one row each)."""
    with np.load(run_dir / records.PREDICTIONS_FILE) as npz:
        assert len(npz["predictions"]) == len(npz["seeds"])
        return npz["seeds"].tolist()


def _result(out, name):
    return {s["seed"]: s for s in records.read_json(out / name / records.RESULT_FILE)["seeds"]}


@pytest.mark.slow  # a real depth study, in this process
def test_every_seed_diverging_is_a_failed_study_never_a_comparison(mnist_path, tmp_path,
                                                                    capfd):
    """The probe's command: --learning-rate 1e9 sends every seed of both models to NaN in
    epoch 1. Before: 'does better than' from the test accuracies of initial weights."""
    from experiments import depth_study

    out = tmp_path / "study"
    status, stdout, stderr, shown = _main(depth_study.main, [
        "--data-dir", str(mnist_path), *FLAGS, "--epochs", "1", "--learning-rate", "1e9",
        "--out", str(out)], capfd)
    assert status == 2
    assert stderr == ("error: training diverged (loss not finite) for 2conv seed(s) 0, 1, 2; "
                      "3conv seed(s) 0, 1, 2; a diverged seed has a result only if it "
                      "improved before diverging (summary.md says which): lower "
                      "--learning-rate\n")
    assert not shown, [str(w.message) for w in shown]
    for name in ("2conv", "3conv"):
        for seed in range(3):
            assert (f"[{name}] seed {seed} diverged in epoch 1 (loss not finite) before any "
                    f"improvement: stopped, with no result (no test figures, no checkpoint)"
                    ) in stdout
    assert "None" not in stdout
    sentence = ("2conv failed: all 3 of its seeds diverged (loss not finite) before any "
                "improvement, so it has no result. 3conv failed: all 3 of its seeds diverged "
                "(loss not finite) before any improvement, so it has no result. 3conv and "
                "2conv are not compared: neither has a result, so neither does better or "
                "worse.")
    summary = records.read_json(out / report.SUMMARY_JSON)
    assert summary["sentence"] == sentence and sentence in stdout
    assert [c["welch"] for c in summary["comparisons"]] == [None]
    for v in summary["variants"]:
        assert v["failed"] and v["seeds_with_result"] == [] and v["diverged"] == [0, 1, 2]
        assert v["test_accuracy"]["n"] == 0 and v["test_accuracy"]["mean"] is None
    for name in ("2conv", "3conv"):
        for s in _result(out, name).values():
            assert not s["has_result"] and s["diverged_epoch"] == 1
            assert s["test_accuracy"] is s["test_loss"] is s["best_checkpoint"] is None
            assert s["outcome"] == ("diverged in epoch 1 (loss not finite) before any "
                                    "improvement: no result")
        assert not (out / name / "checkpoints" / "seed_0").exists()
        assert _predicted_seeds(out / name) == []
    md = (out / report.SUMMARY_MD).read_text()
    assert f"**{sentence}**" in md
    assert "| 2conv | 113,386 | 2.44 | 0 of 3 | none | none | - |" in md
    assert "| 3conv | 0 | none | none | none | diverged at 1: no result | 1 |" in md
    assert ("- 2conv: seeds 0, 1, 2 diverged (loss not finite) in epoch 1, with no result: "
            "left out of the statistics, the test and the figures.") in md
    assert "better" not in md.replace("neither does better or worse", "")
    for figure in report.FIGURES.values():
        assert (out / figure).stat().st_size > 0


@pytest.mark.slow  # a real depth study, in this process
def test_a_seed_lost_in_epoch_1_is_left_out_and_one_lost_later_keeps_its_best(
        mnist_path, tmp_path, capfd, monkeypatch):
    """The depth study, 3 seeds, 2 epochs: 2conv's seed 1 diverges in epoch 1 (no result),
    3conv's seed 2 in epoch 2, after its best epoch 1 (kept). The comparison is over the 2
    and 3 seeds with a result, and says what diverged."""
    from experiments import depth_study

    poison = {"2conv": _poisoned(1, 0), "3conv": _poisoned(2, STEPS_PER_EPOCH)}

    def fit(*args, name, **kwargs):
        return train.fit(*args, name=name, train_step=poison[name], **kwargs)

    monkeypatch.setattr(study, "fit", fit)
    out = tmp_path / "study"
    status, stdout, stderr, shown = _main(depth_study.main, [
        "--data-dir", str(mnist_path), *FLAGS, "--epochs", "2", "--out", str(out)], capfd)
    assert status == 2
    assert stderr == ("error: training diverged (loss not finite) for 2conv seed(s) 1; 3conv "
                      "seed(s) 2; a diverged seed has a result only if it improved before "
                      "diverging (summary.md says which): lower --learning-rate\n")
    assert not shown, [str(w.message) for w in shown]
    assert ("[2conv] seed 1 diverged in epoch 1 (loss not finite) before any improvement: "
            "stopped, with no result (no test figures, no checkpoint)") in stdout
    assert ("[3conv] seed 2 diverged in epoch 2 (loss not finite): stopped; its best epoch "
            "(1) is kept as its result") in stdout

    a, b = _result(out, "2conv"), _result(out, "3conv")
    assert not a[1]["has_result"] and a[1]["test_accuracy"] is None
    assert a[1]["best_checkpoint"] is None and not (out / "2conv/checkpoints/seed_1").exists()
    assert all(a[s]["has_result"] and a[s]["test_accuracy"] > 0 for s in (0, 2))
    assert b[2]["has_result"] and (b[2]["best_epoch"], b[2]["diverged_epoch"]) == (1, 2)
    assert b[2]["outcome"] == ("diverged in epoch 2 (loss not finite), after its best epoch "
                               "1, whose result is kept")
    assert (out / "3conv" / b[2]["best_checkpoint"]).is_dir() and b[2]["test_accuracy"] > 0
    assert _predicted_seeds(out / "2conv") == [0, 2]
    assert _predicted_seeds(out / "3conv") == [0, 1, 2]

    summary = records.read_json(out / report.SUMMARY_JSON)
    va, vb = summary["variants"]
    assert (va["seeds_with_result"], va["without_result"], va["diverged"]) == ([0, 2], [1], [1])
    assert (vb["seeds_with_result"], vb["without_result"], vb["diverged"]) == ([0, 1, 2], [], [2])
    assert va["test_accuracy"]["values"] == [a[0]["test_accuracy"], a[2]["test_accuracy"]]
    (cmp,) = summary["comparisons"]
    assert cmp["seeds"] == [2, 3] and cmp["welch"] is not None
    assert summary["sentence"].startswith(
        "2conv: 1 of 3 seeds diverged (loss not finite) before any improvement and has no "
        "result. 3conv: 1 of 3 seeds diverged (loss not finite) after its best epoch, whose "
        "result is kept. Over 2 and 3 seeds with a result, 3conv's test accuracy is ")
    assert summary["sentence"] in stdout and "None" not in stdout
    md = (out / report.SUMMARY_MD).read_text()
    assert f"**{summary['sentence']}**" in md
    assert "| 2conv | 113,386 | 2.44 | 2 of 3 | " in md and "| 3conv | 37,674 | 2.40 | 3 | " in md
    assert "| 2conv | 1 | none | none | none | diverged at 1: no result | 1 |" in md
    assert "| 3conv | 2 | " in md and "| diverged at 2, after best epoch 1 (kept) | 2 |" in md
    assert ("- 3conv: seed 2 diverged (loss not finite) in epoch 2, after its best epoch (1), "
            "whose result is kept.") in md
    assert ("- 2conv: seed 1 diverged (loss not finite) in epoch 1, with no result: left out "
            "of the statistics, the test and the figures.") in md


def test_an_interrupted_summary_gives_no_best_from_a_diverged_epoch(tmp_path):
    """The summary written on Ctrl-C: a seed's best so far comes from the epochs before it
    diverged (seed 1: epoch 1; seed 2 diverged in its first epoch: none)."""
    from mnist_jax import study_files

    row = lambda seed, epoch, acc, diverged: {  # noqa: E731
        "epoch": epoch, "seed": seed, "val_accuracy": acc, "diverged": diverged}
    records.write_history(tmp_path / "2conv" / records.HISTORY_FILE, [
        row(0, 1, 0.5, False), row(1, 1, 0.4, False), row(2, 1, 0.9, True),
        row(0, 2, 0.6, False), row(1, 2, 0.95, True)])
    summary = study_files.write_interrupted_summary(tmp_path, [tmp_path / "2conv"])
    assert [(s["best_epoch"], s["diverged_epoch"]) for s in summary["runs"][0]["seeds"]] == [
        (2, None), (1, 2), (None, 1)]
    md = (tmp_path / report.SUMMARY_MD).read_text()
    assert "  - seed 0: 2 epoch(s), best val_accuracy so far 0.6000 (epoch 2)\n" in md
    assert ("  - seed 1: 2 epoch(s), diverged in epoch 2 (loss not finite), best val_accuracy "
            "so far 0.4000 (epoch 1)\n") in md
    assert ("  - seed 2: 1 epoch(s), diverged in epoch 1 (loss not finite), no result (no "
            "epoch before it diverged)\n") in md
