"""The study's figures, drawn from runs read by report.read_run (files only, no JAX).

Each function takes the runs and returns a matplotlib Figure; `save` writes it atomically,
`png` gives its bytes (the report writes them with the summary, all or none).
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mnist_jax import records  # noqa: E402

GRID_COLUMNS = 10
GRID_ROWS = 4
CLASSES = 10  # MNIST's digits


def save(fig, path: str | Path) -> None:
    records.atomic_write_bytes(path, png(fig))


def png(fig) -> bytes:
    """The figure as a PNG file's bytes (what `save` writes); the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _per_seed(run: dict, key: str) -> dict[int, tuple[list[int], list[float]]]:
    """seed -> (epochs, values) of one history column, every seed of the run included (an
    empty series for a seed without rows). An epoch in which a seed diverged, or a value
    that is not finite, is left out: it measures broken weights."""
    diverged = {s["seed"]: s.get("diverged_epoch") for s in run["result"]["seeds"]}
    out: dict[int, tuple[list[int], list[float]]] = {seed: ([], []) for seed in diverged}
    for row in run["history"]:
        epochs, values = out.setdefault(row["seed"], ([], []))
        stop = diverged.get(row["seed"])
        value = row[key]
        if (stop is None or row["epoch"] < stop) and value is not None and np.isfinite(value):
            epochs.append(row["epoch"])
            values.append(value)
    return out


def band(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of `table` [seeds, epochs] (NaN: no value): the mean, minimum and
    maximum of its values, NaN where a column has none (no numpy warning for those)."""
    present = ~np.isnan(table)
    count = present.sum(axis=0)
    some = count > 0
    mean = np.full(table.shape[1], np.nan)
    mean[some] = np.where(present, table, 0.0).sum(axis=0)[some] / count[some]
    low = np.where(present, table, np.inf).min(axis=0, initial=np.inf)
    high = np.where(present, table, -np.inf).max(axis=0, initial=-np.inf)
    low[~some] = high[~some] = np.nan
    return mean, low, high


def curves(runs: list[dict]):
    """Validation accuracy and loss per epoch: the mean over the seeds still training at
    that epoch, a band from their minimum to maximum, each seed's best epoch (star) and
    early stop (cross); a dotted line where a seed diverged (its loss not finite: that
    epoch and the later ones are not drawn)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    any_diverged, drawn, last_epoch = False, [False, False], 1
    for run in runs:
        name, seeds = run["result"]["name"], run["result"]["seeds"]
        diverged = [s["diverged_epoch"] for s in seeds if s.get("diverged_epoch") is not None]
        any_diverged |= bool(diverged)
        last = max(r["epoch"] for r in run["history"])
        last_epoch = max(last_epoch, last)
        epochs = np.arange(1, last + 1)
        label = f"{name} (mean of {len(seeds)} seeds" + (
            f"; {len(diverged)} diverged)" if diverged else ")")
        for k, (ax, key) in enumerate(zip(axes, ("val_accuracy", "val_loss"))):
            series = _per_seed(run, key)
            table = np.full((len(series), last), np.nan)
            for j, (e, v) in enumerate(series.values()):
                table[j, np.asarray(e, dtype=int) - 1] = v
            mean, low, high = band(table)
            drawn[k] |= bool(np.isfinite(mean).any())
            (line,) = ax.plot(epochs, mean, marker="o", markersize=3, label=label)
            ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)
            for epoch in sorted(set(diverged)):
                ax.axvline(epoch, color=line.get_color(), linestyle=":", linewidth=1.2)
            for seed in seeds:
                e, v = series.get(seed["seed"], ([], []))
                if seed["best_epoch"] in e:
                    ax.plot(seed["best_epoch"], v[e.index(seed["best_epoch"])], marker="*",
                            markersize=12, color=line.get_color(), markeredgecolor="black",
                            linestyle="none")
                stop = seed["stopped_epoch"]
                if stop in e:
                    ax.plot(stop, v[e.index(stop)], marker="X", markersize=8,
                            color=line.get_color(), markeredgecolor="black", linestyle="none")
    axes[0].set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy")
    axes[1].set(title="Validation loss", xlabel="epoch", ylabel="cross-entropy")
    for ax, any_drawn in zip(axes, drawn):
        ax.set_xlim(0.5, last_epoch + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if not any_drawn:
            ax.text(0.5, 0.5, "nothing to draw: every seed diverged in its first epoch",
                    transform=ax.transAxes, ha="center", va="center", fontsize=9)
    fig.suptitle("Band: min to max over seeds. * each seed's best epoch (restored), "
                 "X its early stop" + ("; dotted: a seed diverged (loss not finite)"
                                       if any_diverged else ""), fontsize=9)
    fig.tight_layout()
    return fig


def with_result(run: dict) -> dict:
    """The run's test predictions of the seeds that have a result (test_predictions.npz of
    an older version also held the seeds that diverged before any improvement)."""
    p = run["predictions"]
    kept = {s["seed"] for s in run["result"]["seeds"] if records.seed_has_result(s)}
    rows = np.asarray([int(seed) in kept for seed in p["seeds"]], dtype=bool)
    return {**p, "seeds": p["seeds"][rows], "predictions": p["predictions"][rows]}


def confusion_counts(labels: np.ndarray, predictions: np.ndarray,
                     classes: int = CLASSES) -> np.ndarray:
    """[true, predicted] counts, summed over the rows (seeds) of predictions [K, N]."""
    counts = np.zeros((classes, classes), np.int64)
    for row in np.atleast_2d(predictions):
        np.add.at(counts, (labels.astype(np.int64), row.astype(np.int64)), 1)
    return counts


def confusion(runs: list[dict]):
    """Each run's test confusion matrix on the restored weights, summed over its seeds."""
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 5), squeeze=False)
    for ax, run in zip(axes[0], runs):
        p = with_result(run)
        if not len(p["seeds"]):
            ax.axis("off")
            ax.set_title(f"{run['result']['name']}: no seed has a result (every seed diverged)")
            continue
        counts = confusion_counts(p["labels"], p["predictions"])
        off = counts.copy()
        np.fill_diagonal(off, 0)  # colour the errors; the diagonal would swamp them
        ax.imshow(off, cmap="Reds")
        for (t, q), n in np.ndenumerate(counts):
            ax.text(q, t, str(n), ha="center", va="center", fontsize=7,
                    color="black" if t != q else "tab:blue")
        ax.set(title=f"{run['result']['name']}: test set, summed over "
                     f"{len(p['seeds'])} seed(s)", xlabel="predicted", ylabel="true",
               xticks=range(10), yticks=range(10))
    fig.tight_layout()
    return fig


def median_seed(predictions: dict) -> int:
    """Index of the seed with the median number of test errors (the lower middle)."""
    errors = (predictions["predictions"] != predictions["labels"][None, :]).sum(axis=1)
    return int(np.argsort(errors, kind="stable")[(len(errors) - 1) // 2])


def misclassified(runs: list[dict]):
    """For each run, the first test digits its median seed gets wrong: true and predicted."""
    fig = plt.figure(figsize=(GRID_COLUMNS * 1.0, len(runs) * (GRID_ROWS * 1.1 + 0.5)))
    subfigs = np.atleast_1d(fig.subfigures(len(runs), 1))
    for sub, run in zip(subfigs, runs):
        p = with_result(run)
        if not len(p["seeds"]):
            sub.suptitle(f"{run['result']['name']}: no seed has a result (every seed "
                         f"diverged)", fontsize=9)
            continue
        i = median_seed(p)
        wrong = np.flatnonzero(p["predictions"][i] != p["labels"])
        sub.suptitle(f"{run['result']['name']}, seed {int(p['seeds'][i])} (median test errors: "
                     f"{len(wrong)}): true -> predicted", fontsize=9)
        position = {int(k): j for j, k in enumerate(p["wrong_indices"])}
        axes = sub.subplots(GRID_ROWS, GRID_COLUMNS)
        for ax, index in zip(axes.flat, list(wrong) + [None] * axes.size):
            ax.axis("off")
            if index is None:
                continue
            ax.imshow(p["wrong_images"][position[int(index)]], cmap="gray_r")
            ax.set_title(f"{p['labels'][index]} -> {p['predictions'][i][index]}", fontsize=8)
    return fig


def epoch_rows(history: list[dict]) -> list[dict]:
    """One row per epoch (the first seed's): the time and resource columns are shared by
    an epoch's seeds."""
    seen, rows = set(), []
    for row in history:
        if row["epoch"] not in seen:
            seen.add(row["epoch"])
            rows.append(row)
    return rows


def resources(runs: list[dict]):
    """Per epoch: wall time (all seeds of the epoch), CPU %, process RSS, and GPU load and
    VRAM where a GPU was sampled."""
    panels = [("epoch_time_s", "epoch time (s)"), ("cpu_percent_mean", "system CPU % (mean)"),
              ("rss_mb_peak", "process RSS MB (peak)")]
    if any(r.get("gpu_util_percent_mean") is not None for run in runs for r in run["history"]):
        panels += [("gpu_util_percent_mean", "GPU load % (mean)"),
                   ("vram_used_mb_peak", "VRAM used MB (peak)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for run in runs:
        rows = epoch_rows(run["history"])
        for ax, (key, title) in zip(axes[0], panels):
            points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=run["result"]["name"])
            ax.set(title=title, xlabel="epoch")
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
