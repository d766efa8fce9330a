"""Seconds per training epoch: this project's JAX epoch against the notebook's Keras model.

    python -m benchmarks.epoch_speed --data-dir ../shared/mnist
    python -m benchmarks.epoch_speed --data-dir ../shared/mnist --frameworks jax --seeds 1,3
    python -m benchmarks.epoch_speed --tiny          # synthetic data, seconds: checks it runs
    python -m benchmarks.epoch_speed --data-dir ../shared/mnist --compete 1   # contention
    python -m benchmarks.epoch_speed --data-dir ../shared/mnist --frameworks jax \
        --conv 256,256 --train-limit 2000 --epoch-mode chunked,one-call,scan   # wide models

A benchmark, not a test: it asserts nothing and its numbers depend on the machine and on
whatever else runs on it (the load average is recorded at start and end).

What it measures, per variant (VARIANTS: 2conv = ModelConfig(conv_features=(32, 32)), 3conv =
ModelConfig(conv_features=(32, 32, 64)), the rest of each config the notebook's defaults):
- JAX: one epoch as fit() runs it, `train.run_epoch` itself: training over the 60k
  training images (batch 32) plus validation on the 10k test images (batch 1000), for
  every seed of the run, timed up to the host fetch of both sets of totals. With
  `--seeds 1,3` it times one seed and three seeds side by side (`--layout` says how the
  seeds share the device). Compile time: first epoch minus median epoch, with JAX's own
  compile events (jax.monitoring) beside it.
- Keras: the notebook's model built from the same ModelConfig and TrainConfig
  (benchmarks/keras_reference.py), one `model.fit(x, y, batch_size=..., epochs=1,
  validation_data=(xt, yt), shuffle=True)` call per epoch (the call's own overhead
  included). Keras runs on the CPU: TensorFlow is told to use no GPU.
`--conv 256,256` adds a variant with those conv widths (the rest the notebook's), and
`--train-limit N` trains on the first N training images and validates on the first N // 6
test images (as data.make_splits' limit does): wide models are slow on a CPU.
`--epoch-mode chunked,one-call,scan` times the JAX epoch three ways side by side: as fit()
runs it (TrainConfig.epoch_chunks calls of one compiled chunk program: `jax`), as one call
of that program over every step (`jax-1call`), and as the former single program, one
`lax.scan` of static length over the epoch (engine.scan_epoch: `jax-scan`).
Each contestant (JAX at each seed count and epoch mode, Keras) gets one warm-up epoch per
variant, then --epochs timed epochs; the rounds alternate the contestants (and which one
goes first) so drifting load hits all alike.
Models and states live across rounds, so every timed epoch continues the same training.
`--compete N` starts N CPU-bound processes (a Python busy loop each, as another user's job
on a shared machine) before the first warm-up and stops them after the last epoch; every
epoch row records how many were still running at its end.

Prints a markdown table and writes everything (per-epoch times, metrics, memory, machine
and library versions) to --json (default benchmarks/results/epoch_speed-<backend>.json;
with --tiny, epoch_speed-<backend>-tiny.json, so a smoke run never replaces a real one).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import psutil

from mnist_jax import cli, engine, records
from mnist_jax import data as data_lib
from mnist_jax.config import CONV_IMPLS, ENGINES, LAYOUTS, POOL_IMPLS, ModelConfig, TrainConfig
from mnist_jax.errors import UserError
from mnist_jax.model import count_params
from mnist_jax.progress import Progress
from mnist_jax.resources import jax_peak_bytes
from mnist_jax.resources import cpu_model, package_versions
from mnist_jax.train import Run, build_run, run_epoch

from benchmarks import keras_reference

# The depth study's two models (experiments/depth_study.py), the notebook's otherwise.
VARIANTS = {"2conv": ModelConfig(conv_features=(32, 32)),
            "3conv": ModelConfig(conv_features=(32, 32, 64))}
FRAMEWORKS = ("jax", "keras")
SEED = 0
EVAL_BATCH_SIZE = TrainConfig().eval_batch_size  # fit()'s validation batch (1000)
DEFAULT_EPOCHS, TINY_EPOCHS = 5, 2
TINY_TRAIN, TINY_TEST = 640, 320
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MB = 1024 * 1024

# JAX's own compile-phase events (tracing, lowering to MLIR, XLA compile). Summing them
# shows whether an epoch compiled anything, e.g. that no timed epoch compiles again.
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
    """One variant's live JAX training at K seeds: the run fit() builds and its splits."""

    seeds: int
    run: Run
    states: Any
    train_split: engine.Split
    val_split: engine.Split
    num_params: int
    bar: bool = False  # fit()'s progress bars drawn (on stderr) during the epoch
    steps: int = 0  # training steps per epoch, all seeds together (the bar's total)


# How a JAX contestant runs its epoch: contestant name suffix -> (chunks, bar). None: fit()'s
# TrainConfig.epoch_chunks; WHOLE_SCAN: the epoch as one lax.scan program (engine.scan_epoch).
WHOLE_SCAN = "scan"
MODES = {"": (None, False), "+bar": (None, True), "-1call": (1, False),
         "-scan": (WHOLE_SCAN, False)}
# --progress: the epoch with fit()'s progress bar, and as one call, beside the plain epoch
# (TrainConfig.epoch_chunks calls, no bar).
PROGRESS_MODES = ("", "+bar", "-1call")
# --epoch-mode: the flag's names for the modes above.
EPOCH_MODES = {"chunked": "", "one-call": "-1call", "scan": "-scan"}


def variant_config(variant: str, args) -> ModelConfig:
    """The variant's ModelConfig (VARIANTS, or a --conv width) with the formulations
    --conv-impl and --pool-impl ask for (they change how XLA computes the JAX model, not
    the function; Keras ignores them)."""
    return dataclasses.replace(args.models[variant], conv_impl=args.conv_impl,
                               pool_impl=args.pool_impl)


def conv_variant(features: tuple[int, ...]) -> tuple[str, ModelConfig]:
    """A --conv variant: its name (conv256-256) and the notebook's model with those widths."""
    return "conv" + "-".join(map(str, features)), ModelConfig(conv_features=features)


def train_config(args, seeds: int = 1, chunks: int | None = None,
                 devices: int = 1) -> TrainConfig:
    """The TrainConfig both frameworks train with (batch --batch-size, seed SEED, the
    notebook's learning rate); JAX's layout, engine, chunks and devices from the flags."""
    return TrainConfig(seed=SEED, seeds=seeds, layout=args.layout,
                       batch_size=args.batch_size, engine=args.engine,
                       epoch_chunks=chunks or TrainConfig().epoch_chunks, devices=devices,
                       data_parallel=args.data_parallel if devices > 1 else 1)


def build_jax_run(model_config: ModelConfig, seeds: int, args, dataset,
                  mode: str = "", devices: int = 1) -> JaxRun:
    """The project's own wiring, exactly as fit() builds it (train.build_run), its data
    placed as fit() places it (on one device, or replicated over the run's mesh); in the
    "-scan" mode, its training epoch replaced by the former single program."""
    chunks, bar = MODES[mode]
    whole = chunks == WHOLE_SCAN
    run = build_run(model_config, train_config(args, seeds, 1 if whole else chunks, devices))
    if whole:
        run.epochs = whole_scan_epochs(run.epochs, args.batch_size, run.parts.training_step())
    place = run.epochs.placement
    splits = (place.to_device(*dataset.train), place.to_device(*dataset.test))
    return JaxRun(seeds, run, run.states, splits[0], splits[1],
                  count_params(engine.seed_slice(run.states.params, 0)), bar,
                  seeds * engine.steps_per_epoch(splits[0].size, args.batch_size))


def whole_scan_epochs(epochs: engine.Epochs, batch_size: int, train_step) -> engine.Epochs:
    """`epochs` with its training epoch run as the epoch was before it was split into
    chunks: one compiled `lax.scan` of static length over the epoch's steps per seed
    (engine.scan_epoch, the state donated), the seeds one after another. Sequential layout
    only, every seed active (the benchmark's case); `on_chunk` hears of each seed's epoch
    once it has finished, as the chunked epoch reports each chunk."""
    if epochs.layout != "sequential" or epochs.engine != "scan":
        raise UserError(f"--epoch-mode scan times the sequential layout on the scan engine, "
                        f"not {epochs.layout} on {epochs.engine}")
    epoch = jax.jit(engine.scan_epoch(batch_size, train_step), donate_argnums=0)

    def train(states, split, active, on_chunk=None):
        if not all(active):
            raise ValueError("the whole-scan epoch trains every seed")
        results = []
        for i in range(engine.seed_count(states)):
            results.append(epoch(engine.seed_slice(states, i), split))
            if on_chunk is not None:
                jax.block_until_ready(results[-1][1]["count"])
                on_chunk(engine.steps_per_epoch(split.size, batch_size))
        return (engine.stack_seeds([s for s, _ in results]),
                engine.stack_seeds([t for _, t in results]))

    return epochs._replace(train=train)


def time_jax_epoch(jr: JaxRun) -> dict:
    """One fit() epoch (train + validation of every seed), timed up to the host holding
    both sets of totals: train.run_epoch, the function fit() calls (with its progress
    bars when `jr.bar`). `train_seconds`: up to the trained states being ready (the
    validation, the same in every epoch mode, is the rest)."""
    # fit()'s own chunk callback: it waits for each chunk (one chunk late) and checks for
    # an interrupt, with the bars drawn or not.
    bars = Progress("bench", 1, enabled=jr.bar)
    trained = {}

    def train(*args, **kwargs):
        out = jr.run.epochs.train(*args, **kwargs)
        jax.block_until_ready(out)  # one wait more than fit(): a host round trip
        trained["at"] = time.perf_counter()
        return out

    start = time.perf_counter()
    jr.states, train_totals, val_totals = run_epoch(
        jr.run.epochs._replace(train=train), jr.states, jr.train_split, jr.val_split,
        [True] * jr.seeds, on_chunk=bars.epoch_started(1, jr.steps))
    seconds = time.perf_counter() - start  # the validation totals need the final states
    bars.close()
    # Seed 0's metrics: the same seed at every seed count, so runs can be compared.
    return {"seconds": seconds, "train_seconds": trained["at"] - start,
            **engine.per_seed_means("train", train_totals)[0],
            **engine.per_seed_means("val", val_totals)[0]}


def jax_device_peak_mb() -> float | None:
    peak = jax_peak_bytes()
    return peak / MB if peak is not None else None


# -------------------------------------------------------------------------- Keras side

def keras_arrays(dataset: data_lib.Dataset):
    """The training and test splits as the notebook feeds them to Keras."""
    return keras_reference.to_arrays(dataset.train), keras_reference.to_arrays(dataset.test)


def time_keras_epoch(model, train, test, config: TrainConfig) -> dict:
    """One Keras epoch (keras_reference.fit_epoch: one `model.fit(..., epochs=1)` call,
    validation included), timed."""
    start = time.perf_counter()
    metrics = keras_reference.fit_epoch(model, train, test, config)
    return {"seconds": time.perf_counter() - start, **metrics}


# ------------------------------------------------------------------ the alternating run

def rss_mb() -> float:
    return psutil.Process().memory_info().rss / MB


def contestant_name(seeds: int, mode: str = "", devices: int = 1) -> str:
    return (("jax" if seeds == 1 else f"jax-{seeds}seeds") + mode
            + (f"-{devices}dev" if devices > 1 else ""))


@contextlib.contextmanager
def competitors(count: int):
    """`count` CPU-bound processes running while the block runs: the list of them."""
    rivals = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
              for _ in range(count)]
    try:
        yield rivals
    finally:
        for rival in rivals:
            rival.kill()
            rival.wait()


def run_benchmark(args, dataset, keras, rivals=()) -> tuple[dict, list[dict]]:
    """Warm up every (variant, contestant), then alternate timed epochs; all epoch records.
    The contestants: JAX at each --seeds count, and Keras (one seed)."""
    watch = CompileWatch()
    epochs: list[dict] = []
    jax_runs: dict[tuple[str, str], JaxRun] = {}
    keras_models: dict[str, Any] = {}
    k_train, k_test = keras_arrays(dataset) if keras is not None else (None, None)
    modes = tuple(dict.fromkeys([*(EPOCH_MODES[m] for m in args.epoch_modes),
                                 *(PROGRESS_MODES if args.progress else ())]))
    jax_contestants = {contestant_name(k, m, d): (k, m, d) for d in args.devices
                       for k in args.seeds for m in modes
                       if not m or (k == 1 and d == 1)}  # other modes: one seed, one device
    contestants = list(jax_contestants) if "jax" in args.frameworks else []
    contestants += ["keras"] if keras is not None else []

    def timed_epoch(variant, contestant, phase, round_):
        mark = watch.snapshot()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        if contestant == "keras":
            row = time_keras_epoch(keras_models[variant], k_train, k_test, train_config(args))
            seeds = 1
        else:
            jr = jax_runs[variant, contestant]
            row = time_jax_epoch(jr)
            row.update(watch.since(mark))
            row["device_peak_mb"] = jax_device_peak_mb()
            seeds = jr.seeds
        after = resource.getrusage(resource.RUSAGE_SELF)
        row = {"variant": variant, "framework": contestant, "seeds": seeds, "phase": phase,
               "round": round_, **row, "rss_mb": rss_mb(),
               # The process's own CPU time and page faults in the epoch: what other
               # processes on a shared machine change far less than the wall time.
               "cpu_seconds": (after.ru_utime + after.ru_stime
                               - usage.ru_utime - usage.ru_stime),
               "minor_faults": after.ru_minflt - usage.ru_minflt,
               "load_average": os.getloadavg()[0],
               "competing_processes": sum(r.poll() is None for r in rivals)}
        epochs.append(row)
        train_s = f" (train {row['train_seconds']:.2f} s)" if "train_seconds" in row else ""
        progress(f"{phase:>7} {round_:>2} {variant} {contestant:<12} {row['seconds']:8.2f} s"
                 f"{train_s}  cpu {row['cpu_seconds']:.1f} s  faults {row['minor_faults']:,}  "
                 f"val_acc {row['val_accuracy']:.4f}  rss {row['rss_mb']:,.0f} MB  "
                 f"load {row['load_average']:.2f}")
        return row

    for variant in args.variants:
        for name, (seeds, mode, devices) in (jax_contestants.items()
                                             if "jax" in args.frameworks else ()):
            jax_runs[variant, name] = build_jax_run(variant_config(variant, args), seeds, args,
                                                    dataset, mode, devices)
            timed_epoch(variant, name, "warmup", 0)
        if keras is not None:
            keras_reference.seed_everything(train_config(args), keras)
            keras_models[variant] = keras_reference.build_model(
                variant_config(variant, args), train_config(args), keras)
            timed_epoch(variant, "keras", "warmup", 0)

    for round_ in range(1, args.epochs + 1):
        order = contestants if round_ % 2 else contestants[::-1]
        for variant in args.variants:
            for contestant in order:
                timed_epoch(variant, contestant, "timed", round_)

    n_train = len(dataset.train.labels)
    summary = {variant: summarize_variant(variant, contestants, epochs, jax_runs,
                                          keras_models.get(variant), n_train)
               for variant in args.variants}
    return summary, epochs


def summarize_variant(variant, contestants, epochs, jax_runs, keras_model, n_train) -> dict:
    out: dict[str, Any] = {}
    for contestant in contestants:
        rows = [r for r in epochs if r["variant"] == variant and r["framework"] == contestant]
        first = next(r for r in rows if r["phase"] == "warmup")
        timed = [r["seconds"] for r in rows if r["phase"] == "timed"]
        median = statistics.median(timed)
        stats = {
            "seeds": first["seeds"],
            "timed_epochs": len(timed), "median_s": median, "min_s": min(timed),
            "max_s": max(timed), "images_per_s": first["seeds"] * n_train / median,
            # RSS is the whole process's (both frameworks live in it), sampled after epochs.
            "rss_mb_peak": max(r["rss_mb"] for r in rows),
            "final_val_accuracy": rows[-1]["val_accuracy"],
            "first_epoch_s": first["seconds"],
            "cpu_median_s": statistics.median(r["cpu_seconds"] for r in rows
                                              if r["phase"] == "timed"),
            "minor_faults_median": statistics.median(r["minor_faults"] for r in rows
                                                     if r["phase"] == "timed"),
        }
        if contestant == "keras":
            stats.update(num_params=keras_model.count_params(),
                         jit_compile=keras_reference.jit_compile(keras_model))
        else:
            jr = jax_runs[variant, contestant]
            peaks = [r["device_peak_mb"] for r in rows if r["device_peak_mb"] is not None]
            train = [r["train_seconds"] for r in rows if r["phase"] == "timed"]
            model, ev = jr.run.model.config, jr.run.eval_model.config
            stats.update(
                compile_s=first["seconds"] - median,
                compile_method="first epoch minus median epoch",
                compile_events_s=first["compile_events_s"],
                timed_backend_compiles=sum(r["backend_compiles"] for r in rows
                                           if r["phase"] == "timed"),
                device_peak_mb=max(peaks) if peaks else None,
                train_median_s=statistics.median(train), train_min_s=min(train),
                train_max_s=max(train),
                load_average_timed=[r["load_average"] for r in rows if r["phase"] == "timed"],
                num_params=jr.num_params, engine=jr.run.epochs.engine,
                layout=jr.run.epochs.layout, conv_impl=model.conv_impl,
                pool_impl=model.pool_impl, eval_conv_impl=ev.conv_impl,
                eval_pool_impl=ev.pool_impl)
        out[contestant] = stats
    if "jax" in out and "keras" in out:
        out["ratio_jax_over_keras"] = out["jax"]["median_s"] / out["keras"]["median_s"]
    if "jax" in out:
        for contestant in out:
            if contestant.endswith("dev"):  # K seeds over devices against K seeds on one
                one = contestant.rsplit("-", 1)[0]
                if one in out:
                    out[contestant]["ratio_over_one_device"] = (out[contestant]["median_s"]
                                                                / out[one]["median_s"])
            elif contestant.startswith("jax-") and contestant.endswith("seeds"):
                out[contestant]["ratio_over_one_seed"] = (out[contestant]["median_s"]
                                                          / out["jax"]["median_s"])
            elif contestant.startswith("jax") and contestant != "jax":
                out[contestant]["ratio_over_jax"] = (out[contestant]["median_s"]
                                                     / out["jax"]["median_s"])
                out[contestant]["train_ratio_over_jax"] = (out[contestant]["train_median_s"]
                                                           / out["jax"]["train_median_s"])
                out[contestant]["cpu_ratio_over_jax"] = (out[contestant]["cpu_median_s"]
                                                         / out["jax"]["cpu_median_s"])
    return out


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
    head = ["variant", "framework", "seeds", "median s/epoch", "min s", "max s", "images/s",
            "compile s", "first epoch s", "median train s", "median CPU s", "jax/keras",
            "x one seed", "x jax", "train x jax", "CPU x jax", "peak RSS MB"]
    if on_gpu:
        head.append("JAX device peak MB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, result in summary.items():
        for contestant, s in result.items():
            if not isinstance(s, dict):
                continue
            ratio = result.get("ratio_jax_over_keras")
            over_one = s.get("ratio_over_one_seed")
            cells = [variant, contestant, str(s["seeds"]), f"{s['median_s']:.2f}",
                     f"{s['min_s']:.2f}", f"{s['max_s']:.2f}", f"{s['images_per_s']:,.0f}",
                     f"{s['compile_s']:.2f}" if "compile_s" in s else "-",
                     f"{s['first_epoch_s']:.2f}",
                     f"{s['train_median_s']:.2f}" if "train_median_s" in s else "-",
                     f"{s['cpu_median_s']:.2f}",
                     f"{ratio:.2f}" if ratio is not None and contestant == "jax" else "",
                     f"{over_one:.2f}" if over_one is not None else "",
                     f"{s['ratio_over_jax']:.3f}" if "ratio_over_jax" in s else "",
                     f"{s['train_ratio_over_jax']:.3f}" if "train_ratio_over_jax" in s else "",
                     f"{s['cpu_ratio_over_jax']:.3f}" if "cpu_ratio_over_jax" in s else "",
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
             f"{m['load_average_start'][0]:.2f}, at end {m['load_average_end'][0]:.2f}"
             + (f"; {s['competing_processes']} competing CPU-bound process(es) running "
                f"throughout" if s.get("competing_processes") else ""),
             f"data: {s['data']}; batch {s['batch_size']} per seed; 1 warm-up + {s['epochs']} "
             f"timed epochs per contestant, alternating; epoch = train + validation of every "
             f"seed, as train.run_epoch (fit()'s own) runs it"]
    for variant, result in report["results"].items():
        for contestant, j in result.items():
            if isinstance(j, dict) and contestant.startswith("jax"):
                lines.append(f"{variant} {contestant}: engine {j['engine']}, seeds {j['layout']}, "
                             f"{j['conv_impl']} conv, {j['pool_impl']} pool (eval: "
                             f"{j['eval_conv_impl']} conv, {j['eval_pool_impl']} pool), "
                             f"{j['num_params']:,} params; compile: {j['compile_method']}")
        k = result.get("keras")
        if k is not None:
            lines.append(f"{variant} keras: {k['num_params']:,} params, jit_compile "
                         f"{k['jit_compile']}; first epoch = first fit() call incl. tracing")
    if s["keras_unavailable"]:
        lines.append(f"keras not run (could not import it: {s['keras_unavailable']}); "
                     f"JAX only")
    if "keras" in s["frameworks"]:
        lines.append("jax/keras < 1: the JAX epoch is faster")
    lines.append("x one seed: the K-seed epoch's median over the one-seed epoch's (K: no "
                 "faster than seeds one after another; 1: the extra seeds cost nothing)")
    lines.append("CPU s: the process's CPU time in the epoch (user + system; less moved by "
                 "other processes than the wall time)")
    lines.append("x jax, train x jax, CPU x jax: the epoch's, its training's and its CPU "
                 f"time's median over those of the plain epoch (jax: {s['epoch_chunks']} chunks); -1call: one call of the "
                 "chunk program; -scan: the epoch as one lax.scan program")
    lines.append("peak RSS: the whole process's (every framework and variant in it), "
                 "sampled after each epoch")
    return lines


def progress(line: str) -> None:
    """Per-epoch lines go to stderr, so stdout holds only the table and notes."""
    print(line, file=sys.stderr, flush=True)


def seed_counts(text: str) -> tuple[int, ...]:
    counts = cli.int_tuple(text)
    return tuple(dict.fromkeys(counts))


def framework_list(text: str) -> tuple[str, ...]:
    return _choice_list(text, FRAMEWORKS, "frameworks")


def variant_list(text: str) -> tuple[str, ...]:
    return _choice_list(text, tuple(VARIANTS), "variants")


def epoch_mode_list(text: str) -> tuple[str, ...]:
    return _choice_list(text, tuple(EPOCH_MODES), "epoch modes")


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
    parser.add_argument("--variants", type=variant_list, default=None,
                        help="comma-separated: 2conv,3conv (default: both, none with --conv)")
    parser.add_argument("--conv", type=cli.int_tuple, action="append", default=[],
                        metavar="W1,W2,...",
                        help="also time the notebook's model with these conv widths, e.g. "
                             "256,256 (variant conv256-256); repeatable")
    parser.add_argument("--train-limit", type=cli.positive_int, default=None, metavar="N",
                        help="train on the first N training images and validate on the first "
                             "N // 6 test images (at least 1), as data.make_splits' limit")
    parser.add_argument("--epoch-mode", dest="epoch_modes", type=epoch_mode_list,
                        default=("chunked",),
                        help="comma-separated: how JAX runs its epoch: chunked (fit()'s "
                             f"{TrainConfig().epoch_chunks} calls of one compiled chunk), one-call "
                             "(that program called once), scan (the former single lax.scan "
                             "program); timed side by side, one seed (default: chunked)")
    parser.add_argument("--frameworks", type=framework_list, default=FRAMEWORKS,
                        help="comma-separated: jax,keras (default: both)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=32,
                        help="training batch size, both frameworks (default: 32)")
    parser.add_argument("--epochs", type=cli.positive_int, default=None,
                        help=f"timed epochs per framework after one warm-up epoch "
                             f"(default: {DEFAULT_EPOCHS}; --tiny: {TINY_EPOCHS})")
    parser.add_argument("--seeds", type=seed_counts, default=(1,),
                        help="comma-separated seed counts to time JAX at, e.g. 1,3 (default: 1)")
    parser.add_argument("--devices", type=seed_counts, default=(1,),
                        help="comma-separated device counts to time JAX's seeds on, e.g. 1,2 "
                             "(several: seeds spread over them; CPU devices need XLA_FLAGS="
                             "--xla_force_host_platform_device_count=N; default: 1)")
    parser.add_argument("--data-parallel", type=cli.positive_int, default=1, metavar="D",
                        help="on several devices, split each batch over D of them (default: 1)")
    parser.add_argument("--progress", action="store_true",
                        help="also time one seed's epoch with fit()'s progress bars drawn "
                             "(jax+bar) and as one compiled call (jax-1call), beside the "
                             f"plain epoch of {TrainConfig().epoch_chunks} chunks (jax)")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto",
                        help="how JAX's seeds share the device, as TrainConfig.layout (default: auto)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="JAX engine, as TrainConfig.engine (default: auto)")
    parser.add_argument("--conv-impl", choices=CONV_IMPLS, default="auto",
                        help="JAX conv formulation; 'xla' times the plain one (default: auto)")
    parser.add_argument("--pool-impl", choices=POOL_IMPLS, default="auto",
                        help="JAX pool formulation; 'window' times the plain one (default: auto)")
    parser.add_argument("--compete", type=cli.non_negative_int, default=0, metavar="N",
                        help="run N CPU-bound processes beside the benchmark, as other "
                             "users' jobs on a shared machine (default: 0)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="where to write the results (default: "
                             "benchmarks/results/epoch_speed-<backend>[-tiny].json)")
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = () if args.conv else tuple(VARIANTS)
    args.models = {v: VARIANTS[v] for v in args.variants}
    args.models.update(conv_variant(features) for features in args.conv)
    args.variants = tuple(args.models)
    if args.epochs is None:
        args.epochs = TINY_EPOCHS if args.tiny else DEFAULT_EPOCHS
    return args


def limited(dataset: data_lib.Dataset, limit: int) -> data_lib.Dataset:
    """The first `limit` training images and the first limit // 6 (at least 1) test images,
    as data.make_splits' limit takes them."""
    small = max(limit // 6, 1)
    return data_lib.Dataset(data_lib.Arrays(*(a[:limit] for a in dataset.train)),
                            data_lib.Arrays(*(a[:small] for a in dataset.test)))


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        keras, tf, keras_unavailable = None, None, None
        if "keras" in args.frameworks:
            keras, tf, keras_unavailable = keras_reference.import_keras()
            if keras is None:
                progress(f"keras unavailable ({keras_unavailable}): timing JAX only")
                args.frameworks = tuple(f for f in args.frameworks if f != "keras")
                if not args.frameworks:
                    raise UserError("no framework left to time")
        if args.tiny:
            dataset = data_lib.synthetic(num_train=TINY_TRAIN, num_test=TINY_TEST)
        else:
            dataset = data_lib.load_mnist(args.data_dir, name="--data-dir")
        if args.train_limit is not None:
            dataset = limited(dataset, args.train_limit)
        data_desc = (f"{'synthetic' if args.tiny else 'MNIST'} {len(dataset.train.labels):,} "
                     f"train / {len(dataset.test.labels):,} test"
                     + (" (--tiny)" if args.tiny else "")
                     + (f" (--train-limit {args.train_limit})" if args.train_limit else ""))
        suffix = "-tiny" if args.tiny else ""
        path = Path(args.json) if args.json else (
            RESULTS_DIR / f"epoch_speed-{jax.default_backend()}{suffix}.json")
        if path.is_dir():  # found out now, not after the whole benchmark has run
            raise UserError(f"--json {path} is a folder, not a file")
        machine = machine_info(keras, tf)
        with competitors(args.compete) as rivals:
            summary, epochs = run_benchmark(args, dataset, keras, rivals)
        machine["load_average_end"] = list(os.getloadavg())
        report = {
            "benchmark": "epoch_speed",
            "command": " ".join(["python -m benchmarks.epoch_speed",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "machine": machine,
            "versions": versions(),
            "settings": {"data": data_desc, "batch_size": args.batch_size,
                         "eval_batch_size_jax": EVAL_BATCH_SIZE,
                         "eval_batch_size_keras":  # Keras fit()'s default
                             keras_reference.validation_batch_size(train_config(args)),
                         "epochs": args.epochs, "warmup_epochs": 1, "seed": SEED,
                         "engine": args.engine, "layout": args.layout,
                         "seeds": list(args.seeds), "progress": args.progress,
                         "epoch_modes": list(args.epoch_modes), "train_limit": args.train_limit,
                         "conv": [list(c) for c in args.conv],
                         "epoch_chunks": TrainConfig().epoch_chunks, "conv_impl": args.conv_impl,
                         "pool_impl": args.pool_impl, "variants": list(args.variants),
                         "frameworks": list(args.frameworks),
                         "competing_processes": args.compete,
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
