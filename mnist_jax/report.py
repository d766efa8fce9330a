"""A study's summary, statistics and figures, read from the files its runs wrote
(config.json, history.csv, result.json, test_predictions.npz). Never imports the training
code or JAX, so a report can be redrawn without retraining:

    python -m mnist_jax.report runs/depth_study/<date-time>

The study folder's study.json (study_files.py) says what the study is: its title, its runs
in order, the reference, and whether each run is compared with the reference or every pair
is compared; never the folder names. A folder without one (a single run, an older study)
takes its runs in name order, the first as the reference. Runs are compared over seeds: on
test accuracy of the restored weights under the holdout protocol, on best validation
accuracy under the notebook's protocol (where test accuracy is the same selected number).
With several comparisons, Welch's p-values are corrected by Holm's method.
"""

from __future__ import annotations

import math
import statistics
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

from mnist_jax import cli, plots, records, stats
from mnist_jax.config import ModelConfig
from mnist_jax.errors import ConfigError, UserError
from mnist_jax.study_files import SUMMARY_JSON, SUMMARY_MD, StudySpec, fallback_spec, read_spec

# The Keras notebook's single run, quoted for comparison (not measured here) in a study
# whose study.json says so (the depth study).
NOTEBOOK = {
    (32, 32): {"best_val_accuracy": 0.9930, "best_epoch": 16, "stopped_epoch": None},
    (32, 32, 64): {"best_val_accuracy": 0.9894, "best_epoch": 11, "stopped_epoch": 16},
}
NOTEBOOK_EPOCH_S = 11.6  # on a 16 GB GPU

FIGURES = {"curves": "curves.png", "confusion": "confusion.png",
           "misclassified": "misclassified.png", "resources": "resources.png"}
RESOURCES = ("cpu_percent", "process_cpu_percent", "rss_mb", "ram_used_mb",
             "gpu_util_percent", "vram_used_mb")
PROTOCOLS = {
    "holdout": "epochs selected (early stopping, best weights) on a fixed stratified holdout of "
               "the training set; the test set evaluated once per seed on the restored weights",
    "test": "the notebook's protocol: epochs selected on the test set, so the reported "
            "accuracy is the selected maximum and optimistic",
}


RUN_FILES = (records.CONFIG_FILE, records.HISTORY_FILE, records.RESULT_FILE,
             records.PREDICTIONS_FILE)
# What the summary and the figures read: a file without them is not a run's.
HISTORY_COLUMNS = ("epoch", "seed", "val_accuracy", "val_loss", "epoch_time_s")
PREDICTION_ARRAYS = ("seeds", "labels", "predictions", "wrong_indices", "wrong_images")


def read_run(run_dir: str | Path) -> dict:
    """One run's files: config, history rows, result, test predictions. A missing or
    damaged file is a UserError naming the file and what is wrong with it."""
    run_dir = Path(run_dir)
    readers = {"config": (records.CONFIG_FILE, records.read_json),
               "history": (records.HISTORY_FILE, records.read_history),
               "result": (records.RESULT_FILE, records.read_json),
               "predictions": (records.PREDICTIONS_FILE, _read_npz)}
    run = {"dir": run_dir}
    for key, (name, read) in readers.items():
        path = run_dir / name
        if not path.is_file():
            raise UserError(f"{run_dir} is not a finished run: {name} is missing")
        try:
            run[key] = read(path)
        except OSError as e:  # permissions, an I/O error: unreadable, not damaged
            raise UserError(f"{path} cannot be read ({e.strerror or e})") from None
        except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            # damaged JSON, CSV or npz
            raise UserError(f"{path} is damaged: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                            ) from None
    history_path = run_dir / records.HISTORY_FILE
    if not run["history"]:
        raise UserError(f"{history_path} has no epochs")
    lacking = [c for c in HISTORY_COLUMNS if c not in run["history"][0]]
    if lacking:
        raise UserError(f"{history_path} is damaged: it has no column {', '.join(lacking)}")
    lacking = [a for a in PREDICTION_ARRAYS if a not in run["predictions"]]
    if lacking:
        raise UserError(f"{run_dir / records.PREDICTIONS_FILE} is damaged: it has no array "
                        f"{', '.join(lacking)}")
    problem = _predictions_problem(run["predictions"])
    if problem:
        raise UserError(f"{run_dir / records.PREDICTIONS_FILE} is damaged: {problem}")
    for key, name in (("config", records.CONFIG_FILE), ("result", records.RESULT_FILE)):
        if not isinstance(run[key], dict):
            raise UserError(f"{run_dir / name} is damaged: it holds a JSON "
                            f"{type(run[key]).__name__}, not an object")
    return run


def _predictions_problem(p: dict) -> str | None:
    """What makes the test predictions unusable for the figures, if anything."""
    labels, predictions, wrong = p["labels"], p["predictions"], p["wrong_indices"]
    if labels.ndim != 1 or predictions.shape != (len(p["seeds"]), len(labels)):
        return (f"predictions have shape {predictions.shape}, not (seeds, test images) = "
                f"({len(p['seeds'])}, {len(labels)})")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and not (0 <= values.min() and values.max() < plots.CLASSES):
            return f"{name} outside 0..{plots.CLASSES - 1}"
    missed = np.setdiff1d(np.flatnonzero((predictions != labels[None, :]).any(axis=0)), wrong)
    if missed.size:
        return f"wrong_indices lacks a misclassified test image (index {missed[0]})"
    if len(p["wrong_images"]) != len(wrong):
        return f"{len(p['wrong_images'])} wrong_images for {len(wrong)} wrong_indices"
    return None


def _read_npz(path: Path) -> dict:
    with open(path, "rb") as f:  # np.load would take other bytes for a pickle
        if f.read(4) != b"PK\x03\x04":
            raise ValueError("not an .npz file (no zip header)")
    with np.load(path) as npz:  # the arrays read now: a damaged member fails here
        return {k: npz[k] for k in npz.files}


def summarize_run(run: dict) -> dict:
    """One run's per-seed figures, their statistics, and its cost."""
    try:
        return _summary(run)
    except (KeyError, TypeError, ValueError, IndexError, ConfigError) as e:
        raise UserError(f"{run['dir']}: its files do not hold a run of this version "
                        f"({type(e).__name__}: {e})") from None


def _summary(run: dict) -> dict:
    config, history, result = run["config"], run["history"], run["result"]
    per_seed = []
    for seed in result["seeds"]:
        # A seed's figures come from the epochs before it diverged (an epoch whose loss is
        # not finite measures broken weights), and only if it has a result at all.
        diverged = seed["diverged_epoch"]
        rows = [r for r in history if r["seed"] == seed["seed"]
                and (diverged is None or r["epoch"] < diverged)]
        for key in ("test_accuracy", "best_epoch"):  # in every version's result.json
            if key not in seed:
                raise KeyError(key)
        has_result = records.seed_has_result(seed) and bool(rows)
        val_acc = [r["val_accuracy"] for r in rows]
        best = val_acc.index(max(val_acc)) if has_result else None  # the first best, as Keras
        per_seed.append({
            "seed": seed["seed"],
            "has_result": has_result,
            "best_val_accuracy": val_acc[best] if has_result else None,
            "best_val_accuracy_epoch": rows[best]["epoch"] if has_result else None,
            "min_val_loss": min(r["val_loss"] for r in rows) if has_result else None,
            "best_epoch": seed["best_epoch"] if has_result else None,
            "stopped_epoch": seed["stopped_epoch"],
            "epochs_run": seed["epochs_run"],
            "diverged_epoch": diverged,
            "test_accuracy": seed["test_accuracy"] if has_result else None,
            "test_loss": seed["test_loss"] if has_result else None,
        })
    with_result = [s for s in per_seed if s["has_result"]]
    epochs = plots.epoch_rows(history)
    times = [r["epoch_time_s"] for r in epochs]
    n_test = config["data"]["test_examples"]
    summary = {
        "name": result["name"],
        "run_dir": run["dir"].name,
        "model": config["model"]["class"].rsplit(".", 1)[-1],
        # The CNN's conv blocks (None for another module): the notebook's rows match on them.
        "conv_features": (config["model"]["fields"].get("config") or {}).get("conv_features"),
        "num_params": config["model"]["num_params"],
        "forward_flops_per_image": _flops(config["model"]),
        "validation": result["validation"],
        "monitor": result["monitor"],
        **{f"{k}": config["data"][k] for k in ("train_examples", "val_examples", "test_examples")},
        "seeds": [s["seed"] for s in per_seed],
        "per_seed": per_seed,
        # Statistics over the seeds with a result; `diverged` lists every seed whose loss
        # became NaN or infinite, `without_result` those that diverged before improving.
        "seeds_with_result": [s["seed"] for s in with_result],
        "diverged": [s["seed"] for s in per_seed if s["diverged_epoch"] is not None],
        "without_result": [s["seed"] for s in per_seed if not s["has_result"]],
        "failed": not with_result,
        **{key: stats.describe([s[key] for s in with_result], bounds=(0.0, 1.0))
           for key in ("best_val_accuracy", "test_accuracy")},
        "best_epoch": stats.describe([s["best_epoch"] for s in with_result]),
        "epochs_run": stats.describe([s["epochs_run"] for s in per_seed]),
        "epochs": len(epochs),
        "first_epoch_s": times[0],
        # Epochs that compiled (the first, and the first after each --resume) left out.
        # Epoch 1 includes compilation; the steady state is the later epochs. An epoch's
        # time covers every seed trained in it.
        "mean_epoch_s": statistics.fmean(
            [r["epoch_time_s"] for r in epochs[1:] if not r.get("compiled")] or times),
        "backend": config["backend"],
        "device": ((config.get("host") or {}).get("cpu_model") or "CPU"
                   if config["backend"] == "cpu" else config["devices"][0]),
        "engine": config["train"]["engine"],
        "layout": config["train"]["layout"],
        # devices, their kind, processes and the mesh (runs before the mesh: one device)
        "placement": config.get("placement") or {"devices": 1, "mesh": None},
    }
    mean_test = summary["test_accuracy"]["mean"]
    summary["test_accuracy_se_one_seed"] = (stats.binomial_se(mean_test, n_test)
                                            if mean_test is not None else None)
    for key in RESOURCES:
        means = [r[f"{key}_mean"] for r in epochs if r.get(f"{key}_mean") is not None]
        if means:
            summary[f"{key}_mean"] = statistics.fmean(means)
            summary[f"{key}_peak"] = max(r[f"{key}_peak"] for r in epochs
                                         if r.get(f"{key}_peak") is not None)
    totals = [r["vram_total_mb"] for r in epochs if r.get("vram_total_mb") is not None]
    if totals:
        summary["vram_total_mb"] = max(totals)
    return summary


def _placement_words(placement: dict) -> str:
    mesh = placement.get("mesh")
    if not mesh:
        return "1 device"
    return (f"{placement['devices']} devices: seeds over {mesh['seeds']}, data over "
            f"{mesh['data']}")


def _flops(model: dict) -> int | None:
    """Forward FLOPs per image: the CNN's from its shapes (the same on every backend),
    another model's as recorded, None where unknown."""
    config = model["fields"].get("config")
    if model["class"] == "mnist_jax.model.CNN" and isinstance(config, dict):
        return ModelConfig.from_dict(config).forward_flops
    flops = model.get("forward_flops_per_image")
    return flops if isinstance(flops, int) else None


def compare(a: dict, b: dict) -> dict:
    """b against the reference a, on the metric the protocol allows, over the seeds that
    have a result (a seed that diverged before any improvement has none), with the
    sentence."""
    metric = "test_accuracy" if a["validation"] == "holdout" else "best_val_accuracy"
    x, y = a[metric]["values"], b[metric]["values"]
    out = {"reference": a["name"], "variant": b["name"], "metric": metric,
           "seeds": [len(x), len(y)], "welch": stats.welch(x, y, bounds=(0.0, 1.0))}
    if out["welch"] is not None and math.isfinite(out["welch"]["p_value"]):
        sd = ((a[metric]["sd"] ** 2 + b[metric]["sd"] ** 2) / 2) ** 0.5
        n = min(len(x), len(y))
        mdd = stats.min_detectable_difference(sd, n)
        out.update(pooled_sd=sd, min_detectable_difference=mdd,
                   seeds_for_half_that=stats.seeds_needed(mdd / 2, sd) if mdd else None)
    out["sentence"] = sentence(out, a, b)
    return out


METRIC_WORDS = {"test_accuracy": "test accuracy",
                "best_val_accuracy": "best validation accuracy (on the test set)"}


def _left_out(v: dict) -> int:
    """How many of a variant's seeds have no result (0 for a summary without the count)."""
    return len(v.get("without_result") or [])


def sentence(cmp: dict, a: dict, b: dict) -> str:
    """The comparison in one plain sentence (what diverged is said once per variant, by
    divergence_note)."""
    if a.get("failed") or b.get("failed"):
        if a.get("failed") and b.get("failed"):
            return (f"{b['name']} and {a['name']} are not compared: neither has a result, "
                    f"so neither does better or worse.")
        failed, other = (a, b) if a.get("failed") else (b, a)
        return (f"{other['name']} is not compared with {failed['name']}, which has no "
                f"result: neither does better or worse here.")
    words = METRIC_WORDS[cmp["metric"]]
    diff = 100 * (b[cmp["metric"]]["mean"] - a[cmp["metric"]]["mean"])
    direction = "lower" if diff < 0 else "higher"
    w = cmp["welch"]
    n_a, n_b = cmp["seeds"]
    some_left_out = _left_out(a) or _left_out(b)
    with_result = " with a result" if some_left_out else ""
    if w is None:
        if n_a == n_b == 1 and not some_left_out:
            return (f"With 1 seed per variant there is no test: {b['name']}'s {words} is "
                    f"{abs(diff):.2f} points {direction} than {a['name']}'s in this one run, "
                    f"and one run each cannot tell how much of that another seed would "
                    f"change; run --seeds 3 or more for an interval and a test.")
        counts = (f"{n_a} seed{with_result} per variant" if n_a == n_b == 1 else
                  f"{n_a} and {n_b} seeds{with_result}")
        return (f"With {counts} there is no test (the spread between seeds needs two or "
                f"more{with_result} on each side): {b['name']}'s {words} is {abs(diff):.2f} "
                f"points {direction} than {a['name']}'s, and one seed cannot tell how much of "
                f"that another seed would change.")
    seeds = (f"{n_a} seeds each{with_result}" if n_a == n_b else
             f"{n_a} and {n_b} seeds{with_result}")
    lo, hi = 100 * w["ci_low"], 100 * w["ci_high"]
    p = w["p_value"]
    if not np.isfinite(p):
        return (f"Over {seeds}, {b['name']}'s {words} is {abs(diff):.2f} points {direction} "
                f"than {a['name']}'s, with no spread between seeds: no test is possible.")
    holm = cmp.get("holm")
    # One comparison: its interval decides. Several: Holm's adjusted p (the unadjusted
    # interval excludes zero wherever the adjusted p is below the level, not conversely).
    claim = (lo > 0 or hi < 0) if holm is None else holm["p_value"] < stats.ALPHA
    if claim and lo > 0:
        verdict = f"{b['name']} does better than {a['name']} here"
    elif claim and hi < 0:
        verdict = f"{b['name']} does worse than {a['name']} here"
    else:
        mdd = cmp.get("min_detectable_difference")
        verdict = ("no difference can be claimed"
                   + (" after the correction" if lo > 0 or hi < 0 else "") + (
            f" (these seeds detect about {100 * mdd:.2f} points or more)" if mdd else ""))
    corrected = ("" if holm is None else
                 f"; Holm-corrected for {_comparisons(holm['comparisons'])}, "
                 f"p = {holm['p_value']:.2g}")
    return (f"Over {seeds}, {b['name']}'s {words} is {abs(diff):.2f} points {direction} than "
            f"{a['name']}'s (95% CI {lo:+.2f} to {hi:+.2f}; Welch's t-test p = {p:.2g}"
            f"{corrected}): {verdict}.")


def _count(n: int, singular: str, plural: str) -> str:
    return singular if n == 1 else plural


def divergence_note(v: dict) -> str:
    """What diverged in one variant, in a sentence ("" where nothing did): how many of its
    seeds, whether before any improvement (no result, left out) or after their best epoch
    (its result kept), or that the variant failed (no seed has a result)."""
    per_seed = v["per_seed"]
    n = len(per_seed)
    lost = [s for s in per_seed if not s["has_result"]]
    later = [s for s in per_seed if s["has_result"] and s["diverged_epoch"] is not None]
    before = (" before any improvement" if all(s["diverged_epoch"] is not None
                                                and s["best_epoch"] is None for s in lost)
              else "")
    if not lost and not later:
        return ""
    if not later and len(lost) == n:
        every = "its seed" if n == 1 else f"all {n} of its seeds"
        return (f"{v['name']} failed: {every} diverged (loss not finite){before}, so it has "
                f"no result.")
    kept = (f"after {_count(len(later), 'its', 'their')} best epoch, "
            f"{_count(len(later), 'whose result is', 'whose results are')} kept")
    gone = f"{before} and {_count(len(lost), 'has', 'have')} no result"
    if not later:
        return f"{v['name']}: {len(lost)} of {n} seeds diverged (loss not finite){gone}."
    if not lost:
        return f"{v['name']}: {len(later)} of {n} seeds diverged (loss not finite) {kept}."
    return (f"{v['name']}: {len(lost) + len(later)} of {n} seeds diverged (loss not finite): "
            f"{len(lost)}{gone}, {len(later)} {kept}.")


def _comparisons(n: int) -> str:
    return f"{n} comparison{'' if n == 1 else 's'}"


def compare_study(variants: list[dict], spec: StudySpec) -> list[dict]:
    """The comparisons `spec` names between summarized variants (matched by their folder,
    `run_dir`), in its order. With more than one, the Welch p-values (of the comparisons
    that have one) are Holm-corrected and each sentence says so."""
    by_folder = {v["run_dir"]: v for v in variants}
    pairs = [(by_folder[a], by_folder[b]) for a, b in spec.pairs()]
    comparisons = [compare(a, b) for a, b in pairs]
    tested = [(c, a, b) for c, (a, b) in zip(comparisons, pairs)
              if c["welch"] is not None and math.isfinite(c["welch"]["p_value"])]
    if len(comparisons) > 1 and tested:
        adjusted = stats.holm([c["welch"]["p_value"] for c, _, _ in tested])
        for (c, a, b), p in zip(tested, adjusted):
            c["holm"] = {"p_value": p, "comparisons": len(tested)}
            c["sentence"] = sentence(c, a, b)
    return comparisons


def build_summary(runs: list[dict], spec: StudySpec | None = None) -> dict:
    """The study's summary: per run, then the comparisons `spec` names (runs are matched to
    its variants by folder name, in its order); without a spec, the runs in the order given,
    each compared with the first."""
    variants = [summarize_run(run) for run in runs]
    folders = [v["run_dir"] for v in variants]
    if spec is None:
        spec = fallback_spec(folders)
    elif folders != list(spec.variants):
        raise UserError(f"the runs {folders} are not the study's variants "
                        f"{list(spec.variants)}")
    protocols = {v["validation"] for v in variants}
    if len(protocols) > 1:
        raise UserError(f"the runs mix validation protocols {sorted(protocols)}: "
                        f"they cannot be compared")
    validation = protocols.pop()
    comparisons = compare_study(variants, spec)
    notes = [note for note in map(divergence_note, variants) if note]
    return {"study": spec.to_dict(), "validation": validation,
            "protocol": PROTOCOLS[validation], "variants": variants,
            "comparisons": comparisons,
            "sentence": " ".join([*notes, *(c["sentence"] for c in comparisons)])}


def _pct(d: dict) -> str:
    """mean ± sd [95% CI] of a described fraction, in percent ("none" without values)."""
    if d["mean"] is None:
        return "none"
    if d["sd"] is None:
        return f"{100 * d['mean']:.2f}%"
    return (f"{100 * d['mean']:.2f} ± {100 * d['sd']:.2f}% "
            f"[{100 * d['ci_low']:.2f}, {100 * d['ci_high']:.2f}]")


def _num(d: dict) -> str:
    if d["mean"] is None:
        return "-"
    return f"{d['mean']:.1f}" + (f" ± {d['sd']:.1f}" if d["sd"] is not None else "")


def _seed_count(v: dict) -> str:
    """How many seeds the figures are over: '3', or '2 of 3' where some have no result."""
    n = len(v["seeds"])
    return f"{n - _left_out(v)} of {n}" if _left_out(v) else str(n)


def format_table(summary: dict) -> str:
    """Per variant: accuracies over seeds (mean ± sd [95% CI]), epochs and cost; in the
    depth study (its study.json says so), beside the notebook's single run."""
    lines = [
        "| model | params | MFLOP/image | seeds | test acc | best val acc | best epoch | "
        "epochs run | s/epoch | CPU % | RSS MB peak | GPU % | VRAM MB peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v in summary["variants"]:
        flops = v.get("forward_flops_per_image")
        gpu = f"{v['gpu_util_percent_mean']:.0f}" if "gpu_util_percent_mean" in v else "n/a"
        vram = (f"{v['vram_used_mb_peak']:,.0f} / {v['vram_total_mb']:,.0f}"
                if "vram_used_mb_peak" in v else "n/a")
        lines.append(
            f"| {v['name']} | {v['num_params']:,} | "
            f"{f'{flops / 1e6:.2f}' if flops else 'n/a'} | {_seed_count(v)} | "
            f"{_pct(v['test_accuracy'])} | {_pct(v['best_val_accuracy'])} | "
            f"{_num(v['best_epoch'])} | {_num(v['epochs_run'])} | {v['mean_epoch_s']:.1f} | "
            f"{v['cpu_percent_mean']:.0f} | {v['rss_mb_peak']:,.0f} | {gpu} | {vram} |")
    notebook = (summary.get("study") or {}).get("notebook", False)
    for v in summary["variants"] if notebook else []:
        ref = NOTEBOOK.get(tuple(v["conv_features"] or ()))
        if ref is not None:
            lines.append(
                f"| notebook {v['name']} (Keras, 1 run, selected on test) | {v['num_params']:,} | "
                f" | 1 | | {100 * ref['best_val_accuracy']:.2f}% | {ref['best_epoch']} | "
                f"{ref['stopped_epoch'] or 20} | {NOTEBOOK_EPOCH_S} (16 GB GPU) | | | | |")
    return "\n".join(lines)


def format_seeds(summary: dict) -> str:
    """Every seed's figures."""
    lines = ["| model | seed | test acc | best val acc (epoch) | min val loss | stopped | "
             "epochs run |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v in summary["variants"]:
        for s in v["per_seed"]:
            stop = s["stopped_epoch"] or "-"
            if s["diverged_epoch"] is not None:
                stop = f"diverged at {s['diverged_epoch']}" + (
                    f", after best epoch {s['best_epoch']} (kept)" if s["has_result"]
                    else ": no result")
            if s["has_result"]:
                figures = (f"{100 * s['test_accuracy']:.2f}% | "
                           f"{100 * s['best_val_accuracy']:.2f}% ({s['best_val_accuracy_epoch']}) "
                           f"| {s['min_val_loss']:.4f}")
            else:
                figures = "none | none | none"
            lines.append(f"| {v['name']} | {s['seed']} | {figures} | {stop} | "
                         f"{s['epochs_run']} |")
    return "\n".join(lines)


def format_statistics(summary: dict) -> str:
    lines = []
    for v in summary["variants"]:
        if v["test_accuracy_se_one_seed"] is not None:
            lines.append(f"- {v['name']}: one seed's test accuracy, measured on "
                         f"{v['test_examples']:,} images, has a standard error of "
                         f"{100 * v['test_accuracy_se_one_seed']:.2f} points (binomial).")
        lines += _divergence_lines(v)
    for c in summary["comparisons"]:
        w = c["welch"]
        if w is None:
            continue
        if not math.isfinite(w["p_value"]):
            lines.append(f"- {c['variant']} - {c['reference']} ({METRIC_WORDS[c['metric']]}): "
                         f"{100 * w['difference']:+.2f} points, with no spread between seeds: "
                         f"no interval and no test.")
            continue
        d = f"{w['cohens_d']:.2f}" if w["cohens_d"] is not None else "n/a"
        holm = c.get("holm")
        corrected = ("" if holm is None else
                     f", Holm-adjusted p = {holm['p_value']:.2g} "
                     f"({_comparisons(holm['comparisons'])})")
        lines.append(
            f"- {c['variant']} - {c['reference']} ({METRIC_WORDS[c['metric']]}): "
            f"{100 * w['difference']:+.2f} points, 95% CI {100 * w['ci_low']:+.2f} to "
            f"{100 * w['ci_high']:+.2f}; {w['test']}: t = {w['t']:.2f}, df = {w['df']:.1f}, "
            f"p = {w['p_value']:.2g}{corrected}; Cohen's d = {d} (average-variance sd).")
        if c.get("min_detectable_difference"):
            half = c["seeds_for_half_that"]
            lines.append(
                f"- With {min(c['seeds'])} seeds and the observed spread (sd "
                f"{100 * c['pooled_sd']:.2f} points), the smallest difference detectable with "
                f"80% power at the 5% level is {100 * c['min_detectable_difference']:.2f} "
                f"points; half that needs {half if half else 'more than 100,000'} seeds per "
                f"variant (noncentral t).")
    return "\n".join(lines)


def _divergence_lines(v: dict) -> list[str]:
    """One line per way a variant's seeds diverged: in which epoch, and whether after a
    best epoch (kept) or with no result (left out)."""
    groups: dict[tuple, list[int]] = {}
    for s in v["per_seed"]:
        if s["diverged_epoch"] is not None:
            key = (s["diverged_epoch"], s["has_result"], s["best_epoch"])
            groups.setdefault(key, []).append(s["seed"])
    lines = []
    for (epoch, kept, best), seeds in groups.items():
        one = len(seeds) == 1
        who = f"seed{'' if one else 's'} {', '.join(map(str, seeds))}"
        lines.append(f"- {v['name']}: {who} diverged (loss not finite) in epoch {epoch}, " + (
            f"after {'its' if one else 'their'} best epoch ({best}), whose "
            f"result{' is' if one else 's are'} kept." if kept else
            "with no result: left out of the statistics, the test and the figures."))
    return lines


def format_text(summary: dict) -> str:
    """What the command line prints: the table and the sentence."""
    return "\n".join([format_table(summary), "", summary["sentence"]])


def write_study_report(out_dir: str | Path, run_dirs: list[str | Path] | None = None) -> dict:
    """summary.json, summary.md and the figures in `out_dir`. The title, the order, the
    reference and the comparisons are the study's (`out_dir`/study.json); without one, the
    runs `run_dirs` in the order given, the first the reference. `run_dirs` defaults to
    study_runs(out_dir)."""
    out_dir = Path(out_dir)
    spec = read_spec(out_dir)
    runs = [read_run(d) for d in (study_runs(out_dir) if run_dirs is None else run_dirs)]
    summary = build_summary(runs, spec)
    try:
        text = [format_table(summary), format_seeds(summary), format_statistics(summary)]
    except (KeyError, TypeError, ValueError) as e:  # a history without resource columns
        raise UserError(f"{out_dir}: a run's summary lacks {e}") from None
    v0 = summary["variants"][0]
    md = [
        f"# {summary['study']['title']}", "",
        *([f"**{summary['sentence']}**", ""] if summary["sentence"] else []),
        f"Protocol: {summary['protocol']}. {v0['train_examples']:,} training, "
        f"{v0['val_examples']:,} validation and {v0['test_examples']:,} test images. "
        f"Measured on {v0['device']} (JAX backend {v0['backend']}, engine {v0['engine']}, "
        f"seeds {v0['layout']}, {_placement_words(v0['placement'])}). Accuracies: mean ± sd over seeds [95% t-interval]"
        f"{_clipped_note(summary)}. "
        f"s/epoch: all seeds of the epoch together, epoch 1 (with compilation) left out.", "",
        text[0], "", "## Every seed", "", text[1], "", "## Statistics", "", text[2], "",
        *[f"![{name}]({file})" for name, file in FIGURES.items()], "",
    ]
    # Every figure drawn before anything is written, and the summary and figures written
    # all or none: a run the figures cannot draw, or a disk that fills while they are
    # written, leaves the previous summary and figures as they were, never a new summary
    # beside old figures.
    figures = {out_dir / file: plots.png(getattr(plots, name)(runs))
               for name, file in FIGURES.items()}
    records.atomic_write_files({out_dir / SUMMARY_JSON: records.json_bytes(summary),
                                out_dir / SUMMARY_MD: "\n".join(md).encode("utf-8"),
                                **figures})
    return summary


def _clipped_note(summary: dict) -> str:
    """Where an interval was cut at 0% or 100% (few seeds, a wide spread), a clause saying
    so; "" otherwise."""
    clipped = (any(v[k].get("clipped") for v in summary["variants"]
                   for k in ("test_accuracy", "best_val_accuracy"))
               or any((c["welch"] or {}).get("clipped") for c in summary["comparisons"]))
    return (" (an interval that ran past 0% or 100%, or a difference's past ±100 points, is "
            "clipped there: an accuracy cannot pass them)" if clipped else "")


def diverged_seeds(run_dir: str | Path) -> list[int]:
    """The seeds of a finished run whose loss became NaN or infinite."""
    result = records.read_json(Path(run_dir) / records.RESULT_FILE)
    return [s["seed"] for s in result["seeds"] if s.get("diverged_epoch") is not None]


def study_runs(study_dir: str | Path) -> list[Path]:
    """The runs of a study folder: the variants its study.json names, in its order; without
    one, find_runs', or the folder itself where it is a run. A UserError if there are none."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise UserError(f"{study_dir} is not a folder")
    spec = read_spec(study_dir)
    if spec is not None:
        return [study_dir / name for name in spec.variants]
    runs = find_runs(study_dir) or (
        [study_dir] if any((study_dir / name).exists() for name in RUN_FILES) else [])
    if not runs:
        raise UserError(f"{study_dir} holds no run")
    return runs


def find_runs(study_dir: Path) -> list[Path]:
    """The runs of a study folder without study.json, in name order: its subfolders
    holding any of a run's files (so a run that lost its config.json is reported, not
    silently left out of the summary)."""
    return sorted(p for p in study_dir.iterdir()
                  if p.is_dir() and any((p / name).exists() for name in RUN_FILES))


def main(argv=None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m mnist_jax.report",
        description="Rewrite a study folder's summary.json, summary.md and figures from its "
                    "runs' files, without retraining.")
    parser.add_argument("study_dir", help="a study folder (whose subfolders are runs) or a run")
    cli.add_debug_arg(parser)
    args = parser.parse_args(argv)
    study_dir = Path(args.study_dir).expanduser()

    def run():
        print(format_text(write_study_report(study_dir)))

    return cli.run_main(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
