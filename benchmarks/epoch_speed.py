"""Seconds per training epoch: this project's JAX epoch against the notebook's Keras model.

    python -m benchmarks.epoch_speed --data-dir ../shared/mnist
    python -m benchmarks.epoch_speed --tiny          # synthetic data, seconds: checks it runs

A benchmark, not a test: it asserts nothing and its numbers depend on the machine and on
whatever else runs on it (the load average is recorded at start and end).

What it measures, per variant (2conv = conv (32, 32), 3conv = conv (32, 32, 64)):
- JAX: one epoch as fit() runs it: `train_epoch` over the 60k training images (batch 32)
  plus `evaluate` on the 10k test images (batch 1000), timed up to the host fetch of both
  sets of totals. Compile time is measured apart: for the "scan" engine ahead of time
  (`lower().compile()` of the epoch and of the evaluation batch; the jitted calls then
  reuse those executables), for the "loop" engine as first epoch minus median epoch.
- Keras: the notebook's model, one `model.fit(x, y, batch_size=32, epochs=1,
  validation_data=(xt, yt), shuffle=True)` call per epoch (the call's own overhead
  included). Keras runs on the CPU: TensorFlow is told to use no GPU.
Each framework gets one warm-up epoch per variant, then --epochs timed epochs; the rounds
alternate JAX and Keras (and which one goes first) so drifting load hits both alike.
Models and states live across rounds, so every timed epoch continues the same training.

Prints a markdown table and writes everything (per-epoch times, metrics, memory, machine
and library versions) to --json (default benchmarks/results/epoch_speed-<backend>.json;
with --tiny, epoch_speed-<backend>-tiny.json, so a smoke run never replaces a real one).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import psutil

from mnist_jax import cli, engine, records
from mnist_jax import data as data_lib
from mnist_jax.config import CONV_IMPLS, ENGINES, POOL_IMPLS, ModelConfig, TrainConfig
from mnist_jax.errors import UserError
from mnist_jax.model import count_params
from mnist_jax.resources import jax_peak_bytes
from mnist_jax.resources import cpu_model, package_versions
from mnist_jax.train import build_trainer

VARIANTS = {"2conv": (32, 32), "3conv": (32, 32, 64)}
FRAMEWORKS = ("jax", "keras")
SEED = 0
EVAL_BATCH_SIZE = TrainConfig().eval_batch_size  # fit()'s validation batch (1000)
DEFAULT_EPOCHS, TINY_EPOCHS = 5, 2
TINY_TRAIN, TINY_TEST = 640, 320
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MB = 1024 * 1024

# JAX's own compile-phase events (tracing, lowering to MLIR, XLA compile). Summing them
# shows whether an epoch compiled anything, e.g. that the first scan epoch after the AOT
# compile reused its executable rather than compiling again.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_BACKEND_COMPILE = _COMPILE_EVENTS[-1]


class CompileWatch:
    """Running totals of JAX compile-phase seconds and XLA compiles, from jax.monitoring."""

    def __init__(self):
        self.seconds = 0.0
        self.backend_compiles = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_):
        if event in _COMPILE_EVENTS:
            self.seconds += duration
            self.backend_compiles += event == _BACKEND_COMPILE

    def snapshot(self) -> tuple[float, int]:
        return self.seconds, self.backend_compiles

    def since(self, snapshot: tuple[float, int]) -> dict:
        return {"compile_events_s": self.seconds - snapshot[0],
                "backend_compiles": self.backend_compiles - snapshot[1]}


# ---------------------------------------------------------------------------- JAX side

@dataclass
class JaxRun:
    """One variant's live JAX training: state, compiled functions and the device splits."""

    model_config: ModelConfig  # resolved: conv_impl and pool_impl are concrete
    eval_config: ModelConfig  # the evaluation formulation, resolved
    engine_name: str
    num_params: int
    state: Any
    train_epoch: Callable
    evaluate: Callable
    train_split: engine.Split
    val_split: engine.Split
    compile: dict = field(default_factory=dict)


def build_jax_run(conv_features, args, splits) -> JaxRun:
    """The project's own wiring, exactly as fit() builds it (train.build_trainer)."""
    model_config = ModelConfig(conv_features=conv_features, conv_impl=args.conv_impl,
                               pool_impl=args.pool_impl)
    train_config = TrainConfig(seed=SEED, batch_size=args.batch_size, engine=args.engine)
    trainer = build_trainer(model_config, train_config)
    return JaxRun(
        model_config=trainer.model.config, eval_config=trainer.eval_model.config,
        engine_name=trainer.engine_name, num_params=count_params(trainer.state.params),
        state=trainer.state, train_epoch=trainer.train_epoch, evaluate=trainer.evaluate,
        train_split=splits[0], val_split=splits[1])


def aot_compile(run: JaxRun) -> dict:
    """Compile the scan epoch and the evaluation batch ahead of time; seconds per phase.

    The jitted functions keep these executables, so the first epoch after this runs
    without compiling (CompileWatch checks it). Lowering does not consume the donated
    state, so the state stays usable.
    """
    start = time.perf_counter()
    lowered_train = run.train_epoch.lower(run.state, run.train_split)
    lowered = time.perf_counter()
    lowered_train.compile()
    compiled = time.perf_counter()
    lowered_eval = run.evaluate.eval_batch.lower(
        run.state, engine.zero_totals(), run.val_split, np.int32(0))
    lowered_eval.compile()
    done = time.perf_counter()
    return {"train_lower_s": lowered - start, "train_compile_s": compiled - lowered,
            "eval_lower_compile_s": done - compiled, "seconds": done - start}


def time_jax_epoch(run: JaxRun) -> dict:
    """One fit() epoch (train + validation), timed up to the host holding both totals."""
    start = time.perf_counter()
    run.state, train_totals = run.train_epoch(run.state, run.train_split)
    val_totals = run.evaluate(run.state, run.val_split)
    # Totals depend on the last step, so fetching them waits for the whole epoch; the
    # state's block is a no-op then, kept in case a future epoch returns totals early.
    train_totals, val_totals = jax.device_get((train_totals, val_totals))
    jax.block_until_ready(run.state)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **engine.mean_metrics("train", train_totals),
            **engine.mean_metrics("val", val_totals)}


def jax_device_peak_mb() -> float | None:
    peak = jax_peak_bytes()
    return peak / MB if peak is not None else None


# -------------------------------------------------------------------------- Keras side

def import_keras():
    """(keras, tensorflow, None), or (None, None, why not): Keras is optional here."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # the notebook's Keras
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TF's INFO lines drown the output
    try:
        import tensorflow as tf
        import keras
    except Exception as e:  # ImportError, or a broken install failing in other ways
        first_line = (str(e).strip().splitlines() or [""])[0]
        return None, None, f"{type(e).__name__}: {first_line}"
    try:
        # Keras is the CPU reference; on a GPU machine TF must not take the memory JAX uses.
        tf.config.set_visible_devices([], "GPU")
    except Exception:  # RuntimeError once TF has initialised its devices; harmless on CPU
        pass
    return keras, tf, None


def build_keras_model(keras, conv_features):
    """The notebook's model, compiled as the notebook compiles it."""
    layers = keras.layers
    stack = [keras.Input((28, 28, 1))]
    for features in conv_features:
        stack += [layers.Conv2D(features, 3, activation="relu"), layers.MaxPooling2D(2)]
    stack += [layers.Flatten(), layers.Dense(128, activation="relu"), layers.Dropout(0.5),
              layers.Dense(10, activation="softmax")]
    model = keras.Sequential(stack)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def keras_arrays(dataset: data_lib.Dataset):
    """float32 images in [0, 1] as the notebook feeds them; int32 labels."""
    def convert(split):
        return split.images.astype(np.float32) / 255.0, split.labels
    return convert(dataset.train), convert(dataset.test)


def time_keras_epoch(model, train, test, batch_size: int) -> dict:
    """One `model.fit(..., epochs=1)` call, as the notebook's epoch (validation included)."""
    start = time.perf_counter()
    history = model.fit(train[0], train[1], batch_size=batch_size, epochs=1,
                        validation_data=test, verbose=0, shuffle=True)
    seconds = time.perf_counter() - start
    h = {k: float(v[-1]) for k, v in history.history.items()}
    return {"seconds": seconds, "train_loss": h.get("loss"), "train_accuracy": h.get("accuracy"),
            "val_loss": h.get("val_loss"), "val_accuracy": h.get("val_accuracy")}


# ------------------------------------------------------------------ the alternating run

def rss_mb() -> float:
    return psutil.Process().memory_info().rss / MB


def run_benchmark(args, dataset, keras) -> tuple[dict, list[dict]]:
    """Warm up every (variant, framework), then alternate timed epochs; all epoch records."""
    watch = CompileWatch()
    epochs: list[dict] = []
    jax_runs: dict[str, JaxRun] = {}
    keras_models: dict[str, Any] = {}
    splits = (engine.to_device(*dataset.train), engine.to_device(*dataset.test))
    k_train, k_test = keras_arrays(dataset) if keras is not None else (None, None)

    def run_epoch(variant, framework, phase, round_):
        mark = watch.snapshot()
        if framework == "jax":
            row = time_jax_epoch(jax_runs[variant])
            row.update(watch.since(mark))
            row["device_peak_mb"] = jax_device_peak_mb()
        else:
            row = time_keras_epoch(keras_models[variant], k_train, k_test, args.batch_size)
        row = {"variant": variant, "framework": framework, "phase": phase, "round": round_,
               **row, "rss_mb": rss_mb()}
        epochs.append(row)
        progress(f"{phase:>7} {round_:>2} {variant} {framework:<5} {row['seconds']:8.2f} s  "
                 f"val_acc {row['val_accuracy']:.4f}  rss {row['rss_mb']:,.0f} MB")
        return row

    for variant in args.variants:
        if "jax" in args.frameworks:
            run = jax_runs[variant] = build_jax_run(VARIANTS[variant], args, splits)
            if run.engine_name == "scan":
                mark = watch.snapshot()
                run.compile = {"method": "aot", **aot_compile(run), **watch.since(mark)}
                progress(f"compile {variant} jax   {run.compile['seconds']:8.2f} s (AOT)")
            run_epoch(variant, "jax", "warmup", 0)
        if keras is not None:
            keras.utils.set_random_seed(SEED)
            keras_models[variant] = build_keras_model(keras, VARIANTS[variant])
            run_epoch(variant, "keras", "warmup", 0)

    for round_ in range(1, args.epochs + 1):
        order = args.frameworks if round_ % 2 else args.frameworks[::-1]
        for variant in args.variants:
            for framework in order:
                run_epoch(variant, framework, "timed", round_)

    n_train = len(dataset.train.labels)
    summary = {variant: summarize_variant(variant, epochs, jax_runs.get(variant),
                                          keras_models.get(variant), n_train)
               for variant in args.variants}
    return summary, epochs


def summarize_variant(variant, epochs, jax_run, keras_model, n_train) -> dict:
    out: dict[str, Any] = {}
    for framework in FRAMEWORKS:
        rows = [r for r in epochs if r["variant"] == variant and r["framework"] == framework]
        if not rows:
            continue
        first = next(r for r in rows if r["phase"] == "warmup")
        timed = [r["seconds"] for r in rows if r["phase"] == "timed"]
        median = statistics.median(timed)
        stats = {
            "timed_epochs": len(timed), "median_s": median, "min_s": min(timed),
            "max_s": max(timed), "images_per_s": n_train / median,
            # RSS is the whole process's (both frameworks live in it), sampled after epochs.
            "rss_mb_peak": max(r["rss_mb"] for r in rows),
            "final_val_accuracy": rows[-1]["val_accuracy"],
        }
        if framework == "jax":
            stats.update(jax_compile_stats(jax_run, first, median))
            peaks = [r["device_peak_mb"] for r in rows if r["device_peak_mb"] is not None]
            stats["device_peak_mb"] = max(peaks) if peaks else None
            stats.update(num_params=jax_run.num_params, engine=jax_run.engine_name,
                         conv_impl=jax_run.model_config.conv_impl,
                         pool_impl=jax_run.model_config.pool_impl,
                         eval_conv_impl=jax_run.eval_config.conv_impl,
                         eval_pool_impl=jax_run.eval_config.pool_impl)
        else:
            stats.update(first_epoch_s=first["seconds"], num_params=keras_model.count_params(),
                         jit_compile=_keras_jit_compile(keras_model))
        out[framework] = stats
    if "jax" in out and "keras" in out:
        out["ratio_jax_over_keras"] = out["jax"]["median_s"] / out["keras"]["median_s"]
    return out


def jax_compile_stats(run: JaxRun, first: dict, median: float) -> dict:
    """Compile seconds and the first epoch's cost as fit() would see it (compile included)."""
    if run.compile.get("method") == "aot":
        return {"compile_s": run.compile["seconds"],
                "compile_method": "AOT lower().compile() of train_epoch and eval_batch",
                "compile_detail": run.compile,
                "first_call_s": first["seconds"],
                "first_call_compiles": first["backend_compiles"],
                "first_epoch_s": run.compile["seconds"] + first["seconds"]}
    return {"compile_s": first["seconds"] - median,
            "compile_method": "first epoch minus median epoch",
            "compile_events_s": first["compile_events_s"],
            "first_epoch_s": first["seconds"]}


def _keras_jit_compile(model):
    try:
        return bool(model.jit_compile)
    except Exception:
        return None


# --------------------------------------------------------------------- info and output

def machine_info(keras, tf) -> dict:
    device = jax.local_devices()[0]
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_start": list(os.getloadavg()),
        "jax_backend": jax.default_backend(),
        "jax_device_kind": device.device_kind,
        "jax_devices": [str(d) for d in jax.local_devices()],
    }
    if keras is not None:
        info["keras_backend"] = keras.backend.backend()
        try:
            info["tf_devices"] = [d.name for d in tf.config.get_visible_devices()]
        except Exception:
            info["tf_devices"] = None
    return info


def versions() -> dict:
    return package_versions("jax", "jaxlib", "flax", "optax", "numpy", "keras", "tensorflow",
                            "tensorflow-cpu")


def format_table(summary: dict, on_gpu: bool) -> str:
    head = ["variant", "framework", "median s/epoch", "min s", "max s", "images/s",
            "compile s", "first epoch s", "jax/keras", "peak RSS MB"]
    if on_gpu:
        head.append("JAX device peak MB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, result in summary.items():
        for framework in FRAMEWORKS:
            s = result.get(framework)
            if s is None:
                continue
            ratio = result.get("ratio_jax_over_keras")
            cells = [variant, framework, f"{s['median_s']:.2f}", f"{s['min_s']:.2f}",
                     f"{s['max_s']:.2f}", f"{s['images_per_s']:,.0f}",
                     f"{s['compile_s']:.2f}" if "compile_s" in s else "-",
                     f"{s['first_epoch_s']:.2f}",
                     f"{ratio:.2f}" if ratio is not None and framework == "jax" else "",
                     f"{s['rss_mb_peak']:,.0f}"]
            if on_gpu:
                peak = s.get("device_peak_mb")
                cells.append(f"{peak:,.0f}" if peak is not None else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(report: dict) -> list[str]:
    m, s = report["machine"], report["settings"]
    lines = [f"machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs, JAX on "
             f"{m['jax_backend']} ({m['jax_device_kind']}); load average at start "
             f"{m['load_average_start'][0]:.2f}, at end {m['load_average_end'][0]:.2f}",
             f"data: {s['data']}; batch {s['batch_size']}; 1 warm-up + {s['epochs']} timed "
             f"epochs per framework, alternating; epoch = train + validation"]
    for variant, result in report["results"].items():
        j = result.get("jax")
        if j is not None:
            lines.append(f"{variant} jax: engine {j['engine']}, {j['conv_impl']} conv, "
                         f"{j['pool_impl']} pool (eval: {j['eval_conv_impl']} conv, "
                         f"{j['eval_pool_impl']} pool), {j['num_params']:,} params; compile: "
                         f"{j['compile_method']}")
        k = result.get("keras")
        if k is not None:
            lines.append(f"{variant} keras: {k['num_params']:,} params, jit_compile "
                         f"{k['jit_compile']}; first epoch = first fit() call incl. tracing")
    if s["keras_unavailable"]:
        lines.append(f"keras not run (could not import it: {s['keras_unavailable']}); "
                     f"JAX only")
    if len(s["frameworks"]) == 2:
        lines.append("jax/keras < 1: the JAX epoch is faster")
    lines.append("peak RSS: the whole process's (every framework and variant in it), "
                 "sampled after each epoch")
    return lines


def progress(line: str) -> None:
    """Per-epoch lines go to stderr, so stdout holds only the table and notes."""
    print(line, file=sys.stderr, flush=True)


def framework_list(text: str) -> tuple[str, ...]:
    return _choice_list(text, FRAMEWORKS, "frameworks")


def variant_list(text: str) -> tuple[str, ...]:
    return _choice_list(text, tuple(VARIANTS), "variants")


def _choice_list(text: str, choices: tuple[str, ...], what: str) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    bad = [v for v in values if v not in choices]
    if bad or not values:
        raise argparse.ArgumentTypeError(
            f"{what} must be a comma-separated subset of {','.join(choices)}, got {text!r}")
    return values


def parse_args(argv):
    parser = cli.ArgumentParser(
        prog="python -m benchmarks.epoch_speed",
        description="Time one training epoch (train + validation) of the JAX project against "
                    "the notebook's Keras model, alternating, in one process.")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help=f"folder with the four MNIST .gz files (default: "
                             f"${data_lib.DATA_DIR_ENV}, else download)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"synthetic data ({TINY_TRAIN} train / {TINY_TEST} test) and "
                             f"{TINY_EPOCHS} timed epochs: checks the benchmark runs")
    parser.add_argument("--variants", type=variant_list, default=tuple(VARIANTS),
                        help="comma-separated: 2conv,3conv (default: both)")
    parser.add_argument("--frameworks", type=framework_list, default=FRAMEWORKS,
                        help="comma-separated: jax,keras (default: both)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=32,
                        help="training batch size, both frameworks (default: 32)")
    parser.add_argument("--epochs", type=cli.positive_int, default=None,
                        help=f"timed epochs per framework after one warm-up epoch "
                             f"(default: {DEFAULT_EPOCHS}; --tiny: {TINY_EPOCHS})")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="JAX engine, as TrainConfig.engine (default: auto)")
    parser.add_argument("--conv-impl", choices=CONV_IMPLS, default="auto",
                        help="JAX conv formulation; 'xla' times the plain one (default: auto)")
    parser.add_argument("--pool-impl", choices=POOL_IMPLS, default="auto",
                        help="JAX pool formulation; 'window' times the plain one (default: auto)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="where to write the results (default: "
                             "benchmarks/results/epoch_speed-<backend>[-tiny].json)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = TINY_EPOCHS if args.tiny else DEFAULT_EPOCHS
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        keras, tf, keras_unavailable = None, None, None
        if "keras" in args.frameworks:
            keras, tf, keras_unavailable = import_keras()
            if keras is None:
                progress(f"keras unavailable ({keras_unavailable}): timing JAX only")
                args.frameworks = tuple(f for f in args.frameworks if f != "keras")
                if not args.frameworks:
                    raise UserError("no framework left to time")
        if args.tiny:
            dataset = data_lib.synthetic(num_train=TINY_TRAIN, num_test=TINY_TEST)
            data_desc = f"synthetic {TINY_TRAIN} train / {TINY_TEST} test (--tiny)"
        else:
            dataset = data_lib.load_mnist(args.data_dir)
            data_desc = (f"MNIST {len(dataset.train.labels):,} train / "
                         f"{len(dataset.test.labels):,} test")
        suffix = "-tiny" if args.tiny else ""
        path = Path(args.json) if args.json else (
            RESULTS_DIR / f"epoch_speed-{jax.default_backend()}{suffix}.json")
        if path.is_dir():  # found out now, not after the whole benchmark has run
            raise UserError(f"--json {path} is a folder, not a file")
        machine = machine_info(keras, tf)
        summary, epochs = run_benchmark(args, dataset, keras)
        machine["load_average_end"] = list(os.getloadavg())
        report = {
            "benchmark": "epoch_speed",
            "command": " ".join(["python -m benchmarks.epoch_speed",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "machine": machine,
            "versions": versions(),
            "settings": {"data": data_desc, "batch_size": args.batch_size,
                         "eval_batch_size_jax": EVAL_BATCH_SIZE,
                         "eval_batch_size_keras": args.batch_size,  # fit()'s default
                         "epochs": args.epochs, "warmup_epochs": 1, "seed": SEED,
                         "engine": args.engine, "conv_impl": args.conv_impl,
                         "pool_impl": args.pool_impl, "variants": list(args.variants),
                         "frameworks": list(args.frameworks),
                         "keras_unavailable": keras_unavailable},
            "results": summary,
            "process": {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        "rss_mb_end": rss_mb()},  # ru_maxrss is in KiB on Linux
            "epochs": epochs,
        }
        records.write_json(path, report)
        print(format_table(summary, on_gpu=machine["jax_backend"] == "gpu"))
        print()
        for line in notes(report):
            print(f"- {line}")
        print(f"- peak RSS of the process (getrusage): {report['process']['ru_maxrss_mb']:,.0f} MB")
        print(f"wrote {path}")

    return cli.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
