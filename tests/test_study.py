"""A study is its variants (mnist_jax/study.py): the study writes what it is (study.json),
the report takes title, order, reference and comparisons from there and never from folder
names, several comparisons are Holm-corrected, and the width study runs from the library
API alone. One width study on real data (3 models, 2 seeds, 1 epoch, 200 images) serves
every test that needs a study's files."""

import ast
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from mnist_jax import report, stats
from mnist_jax.study_files import STUDY_FILE, StudySpec, read_spec

from conftest import REPO

WIDTH_FLAGS = ("--train-limit", "200", "--epochs", "1", "--seeds", "2")


# ---- Holm's step-down correction ----

def test_holm_against_a_hand_worked_example():
    # m = 4; sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005 = 0.02, 3 x 0.01 = 0.03,
    # 2 x 0.03 = 0.06, 1 x 0.04 = 0.04 raised to the running maximum 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.4, 0.5]) == [0.8, 0.8]  # capped at 1 only above it
    assert stats.holm([0.6, 0.7]) == [1.0, 1.0]
    assert stats.holm([0.2]) == [0.2] and stats.holm([]) == []
    with pytest.raises(ValueError):
        stats.holm([0.1, float("nan")])


def _variant(name, values):
    return {"name": name, "run_dir": name, "validation": "holdout",
            "test_accuracy": stats.describe(values)}


def test_several_comparisons_are_holm_corrected_in_the_sentence():
    # Against a = [0.990, 0.991, 0.992] (sd 0.1 points each side, df 4): b is 1.00 points
    # lower (p = 0.000255), c 0.27 lower (t = -3.307, p = 0.0297, CI -0.50 to -0.04),
    # d 0.07 lower (p = 0.567). Holm over 3: 3 x 0.000255 = 0.00077; 2 x 0.0297 = 0.059;
    # 0.567. c's own interval excludes zero, its corrected p does not.
    variants = [_variant("a", [0.990, 0.991, 0.992]), _variant("b", [0.980, 0.981, 0.982]),
                _variant("c", [0.9873, 0.9883, 0.9893]), _variant("d", [0.989, 0.992, 0.990])]
    spec = StudySpec(title="t", variants=("a", "b", "c", "d"))
    b, c, d = report.compare_study(variants, spec)
    assert [x["holm"]["p_value"] for x in (b, c, d)] == pytest.approx(
        [3 * 0.000255217, 2 * 0.029743068, 0.566567127], rel=1e-6)
    assert b["sentence"] == (
        "Over 3 seeds each, b's test accuracy is 1.00 points lower than a's (95% CI -1.23 to "
        "-0.77; Welch's t-test p = 0.00026; Holm-corrected for 3 comparisons, p = 0.00077): "
        "b does worse than a here.")
    assert c["sentence"].startswith(
        "Over 3 seeds each, c's test accuracy is 0.27 points lower than a's (95% CI -0.50 to "
        "-0.04; Welch's t-test p = 0.03; Holm-corrected for 3 comparisons, p = 0.059): "
        "no difference can be claimed after the correction (these seeds detect about ")
    # Two variants: one comparison, no correction, the sentence as before (test_stats.py).
    b_only = report.compare_study(variants[:2], StudySpec(title="t", variants=("a", "b")))
    assert "holm" not in b_only[0] and "Holm" not in b_only[0]["sentence"]


def test_the_study_says_which_pairs_are_compared():
    spec = StudySpec(title="t", variants=("w16", "w32", "w64"), reference="w32")
    assert spec.pairs() == [("w32", "w16"), ("w32", "w64")]
    every = StudySpec(title="t", variants=("w16", "w32", "w64"), reference="w32",
                      comparisons="all")
    assert every.pairs() == [("w32", "w16"), ("w16", "w64"), ("w32", "w64")]
    assert StudySpec(title="t", variants=("x", "y")).reference == "x"
    for bad in (dict(variants=()), dict(variants=("a", "a")), dict(variants=("a/b",)),
                dict(variants=("a",), reference="b"), dict(variants=("a",), comparisons="some"),
                dict(variants="ab")):
        with pytest.raises(ValueError):
            StudySpec(title="t", **bad)


# ---- the width study, and what a study folder says ----

@pytest.fixture(scope="module")
def width_study(mnist_path, tmp_path_factory):
    """`python -m experiments.width_study` on 200 images, run as its main() in this process
    (as `python -m` would, without the start-up): its folder and stdout."""
    from experiments import width_study

    out = tmp_path_factory.mktemp("width") / "study"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = width_study.main(["--data-dir", str(mnist_path), *WIDTH_FLAGS, "--out", str(out)])
    assert status == 0, stdout.getvalue()[-2000:]
    return out, stdout.getvalue()


@pytest.mark.slow
@pytest.mark.mnist
def test_the_width_study_writes_what_it_is_and_compares_every_pair(width_study):
    out, stdout = width_study
    assert json.loads((out / STUDY_FILE).read_text()) == {
        "title": "MNIST: how wide should the convolutions be?",
        "variants": ["w16", "w32", "w64"], "reference": "w32", "comparisons": "all",
        "notebook": False}
    summary = json.loads((out / report.SUMMARY_JSON).read_text())
    assert [v["name"] for v in summary["variants"]] == ["w16", "w32", "w64"]
    assert [v["conv_features"] for v in summary["variants"]] == [[16, 16], [32, 32], [64, 64]]
    assert [(c["reference"], c["variant"]) for c in summary["comparisons"]] == [
        ("w32", "w16"), ("w16", "w64"), ("w32", "w64")]
    assert all(c["holm"]["comparisons"] == 3 for c in summary["comparisons"])
    assert summary["sentence"].count("Holm-corrected for 3 comparisons") == 3
    assert summary["sentence"] in stdout
    md = (out / report.SUMMARY_MD).read_text()
    assert md.startswith("# MNIST: how wide should the convolutions be?\n")
    assert "notebook" not in md  # w32 has the notebook's conv features, but this is not its study


def _redraw(folder: Path) -> dict:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert report.main([str(folder)]) == 0
    return json.loads((folder / report.SUMMARY_JSON).read_text())


@pytest.mark.slow
@pytest.mark.mnist
def test_a_redraw_takes_order_and_reference_from_the_study_not_the_folder_names(
        width_study, tmp_path):
    out, _ = width_study
    study = tmp_path / "study"
    shutil.copytree(out, study)
    written = json.loads((study / report.SUMMARY_JSON).read_text())
    (study / report.SUMMARY_JSON).unlink()
    # A run folder copied into the study (named to sort first) is not one of its variants:
    # it neither joins the summary nor becomes the reference.
    shutil.copytree(study / "w16", study / "a_copy")
    assert _redraw(study) == written  # w32 the reference, though w16 sorts first
    shutil.rmtree(study / "a_copy")

    # Another order and reference, in study.json alone: the report follows it. (The
    # summary as the redraw builds it, without drawing the figures again.)
    spec = {**json.loads((study / STUDY_FILE).read_text()),
            "variants": ["w64", "w16", "w32"], "reference": "w64", "comparisons": "reference"}
    (study / STUDY_FILE).write_text(json.dumps(spec))
    summary = _summary_of(study)
    assert [v["name"] for v in summary["variants"]] == ["w64", "w16", "w32"]
    assert [(c["reference"], c["variant"]) for c in summary["comparisons"]] == [
        ("w64", "w16"), ("w64", "w32")]
    assert summary["comparisons"][0]["holm"]["comparisons"] == 2

    # Without study.json (a study from before it): folder names in order, the first the
    # reference, a title naming the runs, no notebook rows.
    (study / STUDY_FILE).unlink()
    assert _summary_of(study)["study"] == {
        "title": "MNIST: w16, w32 and w64", "variants": ["w16", "w32", "w64"],
        "reference": "w16", "comparisons": "reference", "notebook": False}


def _summary_of(folder: Path) -> dict:
    runs = [report.read_run(d) for d in report.study_runs(folder)]
    return report.build_summary(runs, read_spec(folder))


@pytest.mark.slow
@pytest.mark.mnist
def test_one_run_is_not_titled_as_the_depth_study_and_has_no_empty_sentence(width_study,
                                                                             tmp_path):
    run = tmp_path / "w16"
    shutil.copytree(width_study[0] / "w16", run)
    summary = _redraw(run)
    assert summary["comparisons"] == [] and summary["sentence"] == ""
    md = (run / report.SUMMARY_MD).read_text()
    assert md.startswith("# MNIST: w16\n\nProtocol: ")
    assert "****" not in md and "third convolution" not in md


@pytest.mark.slow
@pytest.mark.mnist
def test_resuming_another_study_in_the_folder_is_refused_in_one_line(width_study, tmp_path,
                                                                     capsys):
    from experiments import depth_study

    study = tmp_path / "study"
    shutil.copytree(width_study[0], study)
    capsys.readouterr()
    assert depth_study.main(["--data-dir", "unused", "--resume", "--out", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot resume {study}: it holds another study (title: ")
    assert "variants: ['w16', 'w32', 'w64'] there, ['2conv', '3conv'] now" in err
    assert err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.mnist
def test_the_depth_study_writes_what_it_is_with_the_notebooks_rows(small_study):
    assert json.loads((small_study.out / STUDY_FILE).read_text()) == {
        "title": "MNIST: does a third convolution help?", "variants": ["2conv", "3conv"],
        "reference": "2conv", "comparisons": "reference", "notebook": True}
    md = (small_study.out / report.SUMMARY_MD).read_text()
    assert md.startswith("# MNIST: does a third convolution help?\n")
    assert "| notebook 2conv (Keras" in md and "| notebook 3conv (Keras" in md


# ---- the width study is written with the library's API alone ----

def test_the_width_study_is_short_and_uses_only_the_library_api():
    source = (REPO / "experiments" / "width_study.py").read_text()
    assert len(source.splitlines()) < 50
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module}.{alias.name}" for alias in node.names}
    assert imported <= {"__future__.annotations", "sys", "mnist_jax.study",
                        "mnist_jax.config.ModelConfig"}, imported
