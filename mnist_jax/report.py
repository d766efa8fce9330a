"""Summaries, tables and the figure of a study, read from the files its runs wrote
(config.json, history.csv, result.json). Never imports the training code, so a report
can be redrawn without retraining:

    python -m mnist_jax.report runs/depth_study/<date-time>
"""

from __future__ import annotations

import io
import statistics
import sys
from pathlib import Path

from mnist_jax import cli, records
from mnist_jax.errors import UserError

# The Keras notebook's single run, quoted for comparison (not measured here).
NOTEBOOK = {
    (32, 32): {"best_val_accuracy": 0.9930, "best_epoch": 16, "min_val_loss": 0.025,
               "stopped_epoch": None},
    (32, 32, 64): {"best_val_accuracy": 0.9894, "best_epoch": 11, "min_val_loss": 0.042,
                   "stopped_epoch": 16},
}
NOTEBOOK_EPOCH_S = 11.6  # on a 16 GB GPU

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
CURVES_PNG = "curves.png"


def summarize_run(run_dir: str | Path) -> dict:
    """One run's figures from its files."""
    run_dir = Path(run_dir)
    try:
        config = records.read_json(run_dir / records.CONFIG_FILE)
        history = records.read_history(run_dir / records.HISTORY_FILE)
        result = records.read_json(run_dir / records.RESULT_FILE)
    except FileNotFoundError as e:
        raise UserError(f"{run_dir} is not a finished run: {Path(e.filename).name} is missing"
                        ) from None
    except ValueError as e:  # a damaged JSON or CSV file
        raise UserError(f"{run_dir} has a damaged file: {e}") from None
    if not history:
        raise UserError(f"{run_dir / records.HISTORY_FILE} has no epochs")
    try:
        return _summary(run_dir, config, history, result)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{run_dir}: its files do not hold a run of this version "
                        f"({type(e).__name__}: {e})") from None


def _summary(run_dir: Path, config: dict, history: list[dict], result: dict) -> dict:
    val_acc = [row["val_accuracy"] for row in history]
    val_loss = [row["val_loss"] for row in history]
    times = [row["epoch_time_s"] for row in history]
    best_acc_i = val_acc.index(max(val_acc))  # first best, as Keras' strict improvement
    min_loss_i = val_loss.index(min(val_loss))
    summary = {
        "name": result["name"],
        "run_dir": run_dir.name,
        "conv_features": config["model"]["conv_features"],
        "num_params": config["num_params"],
        "train_examples": config["data"]["train_examples"],
        "val_examples": config["data"]["val_examples"],
        "best_val_accuracy": val_acc[best_acc_i],
        "best_val_accuracy_epoch": history[best_acc_i]["epoch"],
        "min_val_loss": val_loss[min_loss_i],
        "min_val_loss_epoch": history[min_loss_i]["epoch"],
        "monitor": result["monitor"],
        "best_epoch": result["best_epoch"],
        "epochs_run": len(history),
        "stopped_epoch": result["stopped_epoch"],
        "first_epoch_s": times[0],
        # Epoch 1 includes compilation; the steady state is the later epochs.
        "mean_epoch_s": statistics.fmean(times[1:] if len(times) > 1 else times),
        "backend": config["backend"],
        "device": ((config.get("host") or {}).get("cpu_model") or "CPU"
                   if config["backend"] == "cpu" else config["devices"][0]),
        "engine": config["train"]["engine"],
        "seed": config["train"]["seed"],
    }
    for key in ("cpu_percent", "process_cpu_percent", "rss_mb", "ram_used_mb",
                "gpu_util_percent", "vram_used_mb"):
        means = [row[f"{key}_mean"] for row in history if row.get(f"{key}_mean") is not None]
        peaks = [row[f"{key}_peak"] for row in history if row.get(f"{key}_peak") is not None]
        if means:
            summary[f"{key}_mean"] = statistics.fmean(means)
            summary[f"{key}_peak"] = max(peaks)
    totals = [row["vram_total_mb"] for row in history if row.get("vram_total_mb") is not None]
    if totals:
        summary["vram_total_mb"] = max(totals)
    return summary


def format_table(summary: dict) -> str:
    """A markdown table of the runs beside the notebook's numbers."""
    lines = [
        "| model | params | best val acc (epoch) | min val loss (epoch) | epochs run | "
        "early stop | mean epoch s | CPU % mean | RSS MB peak | GPU % mean | VRAM MB peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in summary["runs"]:
        gpu = (f"{run['gpu_util_percent_mean']:.0f}" if "gpu_util_percent_mean" in run else "n/a")
        vram = (f"{run['vram_used_mb_peak']:,.0f} / {run['vram_total_mb']:,.0f}"
                if "vram_used_mb_peak" in run else "n/a")
        lines.append(
            f"| {run['name']} | {run['num_params']:,} | "
            f"{100 * run['best_val_accuracy']:.2f}% ({run['best_val_accuracy_epoch']}) | "
            f"{run['min_val_loss']:.4f} ({run['min_val_loss_epoch']}) | {run['epochs_run']} | "
            f"{run['stopped_epoch'] or '-'} | {run['mean_epoch_s']:.1f} | "
            f"{run['cpu_percent_mean']:.0f} | {run['rss_mb_peak']:,.0f} | {gpu} | {vram} |")
    for run in summary["runs"]:
        ref = NOTEBOOK.get(tuple(run["conv_features"]))
        if ref is not None:
            lines.append(
                f"| notebook {run['name']} (Keras, 1 run) | {run['num_params']:,} | "
                f"{100 * ref['best_val_accuracy']:.2f}% ({ref['best_epoch']}) | "
                f"~{ref['min_val_loss']:.3f} | {ref['stopped_epoch'] or 20} | "
                f"{ref['stopped_epoch'] or '-'} | {NOTEBOOK_EPOCH_S} (16 GB GPU) | | | | |")
    return "\n".join(lines)


def write_study_report(out_dir: str | Path, run_dirs: list[str | Path]) -> dict:
    """summary.json, summary.md and curves.png in `out_dir`, for the given runs."""
    out_dir = Path(out_dir)
    runs = [summarize_run(d) for d in run_dirs]
    summary = {"runs": runs}
    try:
        table = format_table(summary)
    except (KeyError, TypeError, ValueError) as e:  # a history without resource columns
        raise UserError(f"{out_dir}: a run's summary lacks {e}") from None
    records.write_json(out_dir / SUMMARY_JSON, summary)
    device = runs[0]["device"]
    md = [
        "# MNIST: does a third convolution help?", "",
        f"Measured on {device}, JAX backend {runs[0]['backend']}, seed {runs[0]['seed']}, "
        f"engine {runs[0]['engine']}. {runs[0]['train_examples']:,} training images; "
        + ("validation on the 10,000 test images, as in the notebook. "
           if runs[0]["val_examples"] == 10_000 else
           f"validation on {runs[0]['val_examples']:,} test images (the notebook used all "
           f"10,000). ")
        + "Epoch 1 (with compilation) "
        "is left out of the mean epoch time. One seed per model: see the Keras spread over "
        "seeds before reading a difference.", "",
        table, "",
        f"![validation curves]({CURVES_PNG})", "",
    ]
    records.atomic_write_text(out_dir / SUMMARY_MD, "\n".join(md))
    plot_curves(out_dir / CURVES_PNG, run_dirs)
    return summary


def plot_curves(path: str | Path, run_dirs: list[str | Path]) -> None:
    """Validation accuracy and loss per epoch for each run (the notebook's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir in run_dirs:
        history = records.read_history(Path(run_dir) / records.HISTORY_FILE)
        result = records.read_json(Path(run_dir) / records.RESULT_FILE)
        epochs = [row["epoch"] for row in history]
        for ax, key in ((ax_acc, "val_accuracy"), (ax_loss, "val_loss")):
            values = [row[key] for row in history]
            (line,) = ax.plot(epochs, values, marker="o", markersize=4, label=result["name"])
            best = result.get("best_epoch")
            if best in epochs:  # the restored (and checkpointed) epoch
                ax.plot(best, values[epochs.index(best)], marker="*", markersize=14,
                        color=line.get_color(), markeredgecolor="black", linestyle="none")
    ax_acc.set(title="Validation accuracy (* best epoch, restored)", xlabel="epoch",
               ylabel="accuracy")
    ax_loss.set(title="Validation loss", xlabel="epoch", ylabel="cross-entropy")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    records.atomic_write_bytes(path, buffer.getvalue())


def find_runs(study_dir: Path) -> list[Path]:
    return sorted(p.parent for p in study_dir.glob(f"*/{records.RESULT_FILE}"))


def main(argv=None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m mnist_jax.report",
        description="Rewrite summary.json, summary.md and curves.png of a study folder "
                    "from its runs' files, without retraining.")
    parser.add_argument("study_dir", help="a folder whose subfolders are runs")
    args = parser.parse_args(argv)
    study_dir = Path(args.study_dir)

    def run():
        runs = find_runs(study_dir) or ([study_dir] if (study_dir / records.RESULT_FILE).exists()
                                        else [])
        if not runs:
            raise UserError(f"{study_dir} holds no finished run")
        print(format_table(write_study_report(study_dir, runs)))

    return cli.run_main(run)


if __name__ == "__main__":
    sys.exit(main())
