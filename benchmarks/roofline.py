"""A roofline of one training step, op by op: what XLA runs, its FLOPs and bytes, its time.

    python -m benchmarks.roofline                      # both variants, the processor at hand
    python -m benchmarks.roofline --variants 2conv --steps 100 --top 15
    XLA_FLAGS=... python -m benchmarks.roofline --json /tmp/x.json   # try a flag
    python -m benchmarks.roofline --compete            # and with one competing process

For each variant (benchmarks.epoch_speed.VARIANTS: 2conv, 3conv) it builds the run as fit()
does (run.build_run: the training formulation "auto" resolves to, the engine and its
compiled chunk program, batch 32) and:
- compiles the program fit() runs for a chunk of steps (`lower().compile()`), and takes
  every instruction of the compiled HLO (`as_text()`): its result and operand shapes, and
  FLOPs counted as XLA's HloCostAnalysis does (2*M*N*K per dot, one per element per
  elementwise op, one per input element of a reduction, recursing into fusions);
  bytes moved are the operands plus the result of each top-level op (a fusion reads each
  operand once; one it only slices or gathers from counts as the slices), an upper bound
  where an op's operands stay in the cache from the op before.
  The step's totals are checked against `compiled.cost_analysis()` (printed beside them).
- times `--steps` steps without the profiler (the step's wall time, and the process's CPU
  time), then again under `jax.profiler.trace`: XLA:CPU's thunk executor records each op
  it runs with its HLO name, so each op's time per step is its events' summed duration /
  steps. Two threads may run independent ops at once, so the ops' sum may differ from the
  wall time. Eigen's dots run asynchronously (their event is the launch only): those are
  timed alone, the same dot_general on the same shapes (marked * in the table).
- measures the processor's own floors: a 2048x2048 float32 matmul's GFLOP/s (XLA, the
  best of several) and copies' GB/s (numpy, read plus write) of 256 MB (memory) and of
  1 MB (source and copy in the last-level cache, like most of the step's tensors); the
  memory floor takes the faster. Each op's floor is max(FLOPs / matmul rate, bytes /
  copy rate), and `x floor` is its time over that. An XLA elementwise op over 256 MB is
  measured beside them.
- with --compete, times the step again alternately with and without one competing
  CPU-bound process (a Python busy loop) and reports the slowdown.

Prints a markdown table per variant and writes every figure to --json (default
benchmarks/results/roofline-<processor tag>.json). A benchmark, not a test: it asserts
nothing, and its numbers depend on whatever else runs on the machine (the load average is
recorded at start and end; compare ratios measured in one run).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import engine
from mnist_jax.config import TrainConfig
from mnist_jax.resources import cpu_model, package_versions
from mnist_jax.run import build_run

from benchmarks.epoch_speed import VARIANTS, competitors

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MNIST_TRAIN = (60000, 28, 28, 1)
MB = 1e6


# ------------------------------------------------------------------------- the processor

def cpu_flags() -> dict:
    """Vendor, family, model and the vector extensions of the first processor in
    /proc/cpuinfo (empty where there is none)."""
    info = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    flags = set(info.get("flags", "").split())
    return {"vendor": info.get("vendor_id"), "family": int(info.get("cpu family", 0) or 0),
            "model": int(info.get("model", 0) or 0),
            "extensions": sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))}


def processor_tag(flags: dict) -> str:
    """A short name for the processor, for file names and tables: zen1..zen5 for AMD's
    families and models, xeon-avx512[-amx] or xeon-avx2 for Intel, else the machine."""
    vendor, family, model = flags.get("vendor"), flags.get("family"), flags.get("model")
    ext = set(flags.get("extensions", []))
    if vendor == "AuthenticAMD":
        if family == 23:
            return "zen1" if model < 0x30 else "zen2"
        if family == 25:
            zen4 = 0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF
            return "zen4" if zen4 else "zen3"
        if family == 26:
            return "zen5"
    if vendor == "GenuineIntel":
        if "avx512f" in ext:
            return "xeon-avx512" + ("-amx" if any(e.startswith("amx") for e in ext) else "")
        return "xeon-avx2" if "avx2" in ext else "intel"
    return os.uname().machine


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_floors(repeats: int = 7) -> dict:
    """The processor's matmul rate and copy bandwidth, measured here (the best of
    `repeats`: the floor is what the machine can do, not what it usually does)."""
    n = 2048
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    t_mm = best_seconds(lambda: matmul(a, a).block_until_ready(), repeats)

    big = 64 * 1024 * 1024  # floats: 256 MB
    src = np.ones(big, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t_copy = best_seconds(lambda: np.copyto(dst, src), repeats)
    small = np.ones(256 * 1024, np.float32)  # 1 MB: source and copy fit in the L3 cache
    small_dst = np.empty_like(small)
    t_small = best_seconds(lambda: [np.copyto(small_dst, small) for _ in range(50)], repeats) / 50

    x = jax.device_put(src)
    stream = jax.jit(lambda v: v * 2.0 + 1.0)
    stream(x).block_until_ready()
    t_xla = best_seconds(lambda: stream(x).block_until_ready(), repeats)
    del x
    copy_gbs, cached_gbs = 2 * src.nbytes / t_copy / 1e9, 2 * small.nbytes / t_small / 1e9
    return {
        "matmul_gflops": 2 * n ** 3 / t_mm / 1e9,
        # The step's tensors (0.1-10 MB) live in the caches or in memory: the faster copy.
        "memory_gbs": max(copy_gbs, cached_gbs),
        "matmul_shape": [n, n, n],
        "copy_gbs": copy_gbs,
        "copy_bytes": src.nbytes,
        "copy_1mb_gbs": 2 * small.nbytes / t_small / 1e9,
        "xla_elementwise_gbs": 2 * src.nbytes / t_xla / 1e9,
        "how": "matmul: XLA, 2048^3 float32, best of %d; copy: numpy copyto of 256 MB "
               "(copy_gbs) and of 1 MB (copy_1mb_gbs), read + write, best of %d; memory_gbs: "
               "the faster; xla_elementwise: jit(v * 2 + 1) over the 256 MB" % (
                   repeats, repeats),
    }


# ------------------------------------------------------------------------ the HLO text

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "compare",
               "select", "negate", "abs", "and", "or", "xor", "not", "clamp", "remainder",
               "sign", "floor", "ceil", "round-nearest-even", "shift-left",
               "shift-right-logical", "shift-right-arithmetic", "atan2", "popcnt"}
TRANSCENDENTAL = {"exponential", "log", "sqrt", "rsqrt", "tanh", "power", "logistic",
                  "exponential-minus-one", "log-plus-one", "sine", "cosine", "cbrt", "erf"}
NO_THUNK = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


def shapes_in(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d))
            for dt, dims in SHAPE.findall(type_text)]


def nbytes(type_text: str) -> int:
    return sum(DTYPE_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in shapes_in(type_text))


def elements(type_text: str) -> int:
    shapes = shapes_in(type_text)
    return math.prod(shapes[0][1]) if shapes else 0


def _balanced(text: str, start: int) -> int:
    """The index just past the parenthesis group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def parse_hlo(text: str) -> tuple[dict, dict]:
    """Instructions by name ({type, opcode, operands, attrs, computation}) and each
    computation's instruction names, from a compiled module's `as_text()`."""
    instructions, computations = {}, defaultdict(list)
    current = None
    for line in text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{") and "%" in line:
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        m = re.match(r"\s+(?:ROOT )?%(\S+) = ", line)
        if not m or current is None:
            continue
        rest = line[m.end():]
        if rest.startswith("("):
            end = _balanced(rest, 0)
            type_text, rest = rest[:end], rest[end + 1:]
        else:
            type_text, _, rest = rest.partition(" ")
        opcode, _, rest = rest.partition("(")
        end = _balanced("(" + rest, 0) - 1
        operands = re.findall(r"%([\w.\-]+)", rest[:end - 1])
        instructions[m.group(1)] = {"type": type_text, "opcode": opcode,
                                    "operands": operands, "args": rest[:end - 1],
                                    "attrs": rest[end:], "computation": current}
        computations[current].append(m.group(1))
    return instructions, computations


def _attr(attrs: str, key: str) -> str | None:
    m = re.search(key + r"=([^\s,]+(?:\{[^}]*\})?)", attrs)
    return m.group(1) if m else None


def op_flops(name: str, instructions: dict, computations: dict) -> tuple[float, float]:
    """(flops, transcendentals) of one instruction, fusions and calls included."""
    ins = instructions[name]
    op = ins["opcode"]
    if op in ("fusion", "call"):
        called = _attr(ins["attrs"], "calls") or _attr(ins["attrs"], "to_apply")
        total = [0.0, 0.0]
        for inner in computations.get((called or "").lstrip("%"), []):
            f, t = op_flops(inner, instructions, computations)
            total[0] += f
            total[1] += t
        return total[0], total[1]
    out = elements(ins["type"])
    if op == "dot":
        lhs = shapes_in(instructions[ins["operands"][0]]["type"])[0][1]
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins["attrs"])
        k = math.prod(lhs[int(d)] for d in dims.group(1).split(",") if d) if dims else 1
        return 2.0 * out * k, 0.0
    if op == "convolution":
        rhs = shapes_in(instructions[ins["operands"][1]]["type"])[0][1]
        labels = re.search(r"dim_labels=\w+_(\w+)->", ins["attrs"])
        o = rhs[labels.group(1).index("o")] if labels else rhs[-1]
        return 2.0 * out * math.prod(rhs) / o, 0.0
    if op in ELEMENTWISE:
        return float(out), 0.0
    if op in TRANSCENDENTAL:
        return 0.0, float(out)
    if op in ("reduce", "reduce-window"):
        return float(elements(instructions[ins["operands"][0]]["type"])), 0.0
    return 0.0, 0.0


SLICING = {"slice", "dynamic-slice", "gather"}


def operand_bytes(name: str, instructions: dict, computations: dict) -> int:
    """Bytes a top-level op reads: each operand once, except an operand that a fusion
    only slices or gathers from, which counts as the slices it takes (the batch gathered
    from the whole dataset, one of nine slices of a gradient)."""
    ins = instructions[name]
    called = (_attr(ins["attrs"], "calls") or "").lstrip("%")
    body = computations.get(called, []) if ins["opcode"] == "fusion" else []
    params = {instructions[p]["args"].strip(): p for p in body
              if instructions[p]["opcode"] == "parameter"}
    total = 0
    for index, operand in enumerate(ins["operands"]):
        if operand not in instructions:
            continue
        full = nbytes(instructions[operand]["type"])
        sliced = _sliced_reads(params.get(str(index)), body, instructions)
        total += full if sliced is None else min(full, sliced)
    return total


def _sliced_reads(value: str | None, body: list, instructions: dict) -> int | None:
    """Bytes the slices of `value` take, through bitcasts; None if anything else reads it."""
    if value is None:
        return None
    users = [u for u in body if value in instructions[u]["operands"]]
    if not users:
        return None
    total = 0
    for user in users:
        op = instructions[user]["opcode"]
        if op in SLICING and instructions[user]["operands"][0] == value:
            total += nbytes(instructions[user]["type"])
        elif op == "bitcast":
            inner = _sliced_reads(user, body, instructions)
            if inner is None:
                return None
            total += inner
        else:
            return None
    return total


def op_record(name: str, instructions: dict, computations: dict) -> dict:
    ins = instructions[name]
    flops, trans = op_flops(name, instructions, computations)
    moved = nbytes(ins["type"]) + operand_bytes(name, instructions, computations)
    source = _source(ins["attrs"])
    called = (_attr(ins["attrs"], "calls") or "").lstrip("%")
    inner = [_source(instructions[i]["attrs"]) for i in computations.get(called, [])
             if instructions[i]["opcode"] not in NO_THUNK]
    layers = [m.group(1) for m in (LAYER.search(t) for t in [source, *inner]) if m]
    kind = ins["opcode"]
    if kind == "fusion":
        fk = re.search(r'"kind":"(\w+)"', ins["attrs"]) or re.search(r"kind=(\w+)", ins["attrs"])
        kind = f"fusion:{fk.group(1)}" if fk else kind
    return {"op": name, "kind": kind, "shape": SHAPE.search(ins["type"]).group(0)
            if SHAPE.search(ins["type"]) else ins["type"][:40],
            "flops": flops, "transcendentals": trans, "bytes": moved, "source": source,
            # where the fused instructions come from: the backward if any is transposed,
            # and the layer most of them name (a fusion may join two layers' work)
            "backward": any("transpose(" in t for t in [source, *inner]),
            "layer": max(set(layers), key=layers.count) if layers else None,
            "layers": sorted(set(layers))}


LAYER = re.compile(r"/(conv\d+|dense\d+|logits|Dropout_\d+)/")


def _source(attrs: str) -> str:
    """The JAX source of an instruction (its op_name), less the program and loop prefix."""
    meta = re.search(r'op_name="([^"]*)"', attrs)
    return re.sub(r"^jit\([^)]*\)/(while/body/)?", "", meta.group(1)) if meta else ""


# ------------------------------------------------------------------ the step, measured

# XLA:CPU runs these through Eigen asynchronously: the profiler's event covers the launch
# only (its "end:" marker comes when the executor next looks, often milliseconds later), so
# their time is measured stand-alone, the same dot on the same shapes as a top-level call.
ASYNC = {"dot", "convolution"}


def standalone_dot_seconds(name: str, instructions: dict, repeats: int = 5) -> float | None:
    """The time of the dot `name` alone: lax.dot_general on its shapes and dimensions."""
    ins = instructions[name]
    if ins["opcode"] != "dot":
        return None
    lhs, rhs = (shapes_in(instructions[o]["type"])[0][1] for o in ins["operands"][:2])

    def dims(key):
        m = re.search(key + r"=\{([\d,]*)\}", ins["attrs"])
        return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()

    numbers = ((dims("lhs_contracting_dims"), dims("rhs_contracting_dims")),
               (dims("lhs_batch_dims"), dims("rhs_batch_dims")))
    a = jnp.ones(lhs, jnp.float32)
    b = jnp.ones(rhs, jnp.float32)
    dot = jax.jit(lambda a, b: jax.lax.dot_general(a, b, numbers))
    dot(a, b).block_until_ready()
    inner = 20  # calls queued back to back (JAX dispatches asynchronously), one wait

    def calls():
        jax.block_until_ready([dot(a, b) for _ in range(inner)])
    return best_seconds(calls, repeats) / inner


def profile_ops(call, steps: int) -> tuple[dict, float]:
    """Per-op summed duration (s) and event count over one profiled call of `call()`,
    and the call's wall time."""
    trace_dir = tempfile.mkdtemp(prefix="roofline-")
    with jax.profiler.trace(trace_dir):
        start = time.perf_counter()
        jax.block_until_ready(call())
        wall = time.perf_counter() - start
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    profile = jax.profiler.ProfileData.from_file(path)
    seconds, counts = defaultdict(float), defaultdict(int)
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    seconds[stats["hlo_op"]] += event.duration_ns * 1e-9
                    counts[stats["hlo_op"]] += 1
    return {k: (seconds[k], counts[k]) for k in seconds}, wall


def time_steps(call, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step of one call of `steps` steps."""
    start, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(call())
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def contention(call, steps: int, repeats: int) -> dict:
    """The step's wall and CPU time with one competing CPU-bound process (a Python busy
    loop, as another user's job would be) and without, alternating round by round. CPU
    time that grows with the competitor is time the step's threads spend waiting busily."""
    times = {"alone": [], "competing": []}
    cpu = {"alone": [], "competing": []}
    for r in range(repeats):
        for mode in (("alone", "competing") if r % 2 == 0 else ("competing", "alone")):
            with competitors(1 if mode == "competing" else 0) as rivals:
                if rivals:
                    time.sleep(0.3)  # let the scheduler place it
                wall, used = time_steps(call, steps)
                times[mode].append(wall)
                cpu[mode].append(used)
    alone, competing = (statistics.median(times[m]) for m in ("alone", "competing"))
    cpu_alone, cpu_competing = (statistics.median(cpu[m]) for m in ("alone", "competing"))
    return {"step_ms_alone": 1e3 * alone, "step_ms_competing": 1e3 * competing,
            "slowdown": competing / alone, "rounds": repeats,
            "cpu_ms_alone": 1e3 * cpu_alone, "cpu_ms_competing": 1e3 * cpu_competing,
            "raw_ms": {m: [1e3 * t for t in v] for m, v in times.items()},
            "raw_cpu_ms": {m: [1e3 * t for t in v] for m, v in cpu.items()}}


def measure_variant(name: str, steps: int, repeats: int, compete: bool = False) -> dict:
    """The variant's step as fit() runs it: its compiled program, timed and profiled."""
    run = build_run(VARIANTS[name], TrainConfig(seed=0))
    state = engine.seed_slice(run.states, 0)
    train_step = run.parts.training_step()
    rng = np.random.default_rng(0)
    split = engine.to_device(rng.integers(0, 256, MNIST_TRAIN, dtype=np.uint8),
                             rng.integers(0, 10, MNIST_TRAIN[0]).astype(np.int32))
    batch = TrainConfig().batch_size
    order, mask = jax.jit(engine.epoch_order, static_argnums=(1, 2))(state, split.size, batch)
    totals = engine.zero_totals(train_step, state, split, batch, 1)
    # The state is donated, as make_train_epoch donates it: each call continues from the
    # state the last one returned.
    carry = [state, totals]
    if run.epochs.engine == "scan":  # make_train_epoch's chunk program
        program = jax.jit(engine.run_steps(train_step), donate_argnums=0)
        rest = (split, order, mask, np.int32(0), np.int32(steps))
        compiled = program.lower(*carry, *rest).compile()

        def call():
            carry[:] = compiled(*carry, *rest)
            return carry
    else:  # the loop engine: one compiled step per batch
        program = jax.jit(lambda s, t: engine._run_step(train_step, s, t, split, order, mask),
                          donate_argnums=0)
        compiled = program.lower(*carry).compile()

        def call():
            for _ in range(steps):
                carry[:] = compiled(*carry)
            return carry

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    instructions, computations = parse_hlo(compiled.as_text())

    jax.block_until_ready(call())  # warm-up
    walls, cpus = zip(*(time_steps(call, steps) for _ in range(repeats)))
    per_op, profiled_wall = profile_ops(call, steps)
    competed = contention(call, steps, repeats) if compete else None

    ops = []
    for op, (seconds, count) in per_op.items():
        if op not in instructions or instructions[op]["opcode"] in NO_THUNK:
            continue
        record = op_record(op, instructions, computations)
        record.update(per_step=count / steps, seconds=seconds / steps)
        if instructions[op]["opcode"] in ASYNC:
            alone = standalone_dot_seconds(op, instructions)
            record.update(launch_seconds=record["seconds"], timed="alone")
            if alone is not None:
                record["seconds"] = alone * record["per_step"]
        else:
            record["timed"] = "profiler"
        record["flops"] *= record["per_step"]
        record["transcendentals"] *= record["per_step"]
        record["bytes"] *= record["per_step"]
        ops.append(record)
    ops.sort(key=lambda r: -r["seconds"])
    body_flops = sum(r["flops"] for r in ops)
    return {
        "variant": name, "model": run.model.config.__repr__(), "engine": run.epochs.engine,
        "steps": steps, "repeats": repeats,
        "step_ms_median": 1e3 * statistics.median(walls), "step_ms_min": 1e3 * min(walls),
        # the process's CPU time (all its threads): what the step costs the machine, and
        # beside the wall time, how much of the processors the step got under load
        "step_cpu_ms_median": 1e3 * statistics.median(cpus),
        "step_ms_profiled": 1e3 * profiled_wall / steps,
        "ops_ms_sum": 1e3 * sum(r["seconds"] for r in ops),
        "flops_per_step": body_flops, "bytes_per_step": sum(r["bytes"] for r in ops),
        "xla_cost_analysis": {"flops": cost.get("flops"),
                              "bytes_accessed": cost.get("bytes accessed"),
                              "note": "one step of the loop body plus the chunk's own ops"},
        "contention": competed,
        "ops": ops,
    }


# ---------------------------------------------------------------------------- report

def floor_seconds(record: dict, floors: dict) -> float:
    return max(record["flops"] / (floors["matmul_gflops"] * 1e9),
               record["bytes"] / (floors["memory_gbs"] * 1e9))


def group_of(record: dict) -> str:
    """What an op does, in a few words, from its kind and the JAX source it came from."""
    src = record["source"]
    direction = "bwd" if record["backward"] else "fwd"
    if record["layer"]:
        return f"{direction} {record['layer']}"
    if "jvp" not in src:
        return "other (loss, optimizer, gather, loop)"
    return f"{direction} relu / pool" if re.search(r"relu|max|reduce_sum|select_n|convert_element_type|slice",
                                                  src) else f"{direction} other"


def markdown(result: dict, floors: dict, top: int) -> str:
    lines = [f"#### {result['variant']} ({result['engine']} engine), one training step, batch 32",
             "",
             "| op | what (from JAX) | kind | shape | per step | MFLOP | MB moved | µs | "
             "GFLOP/s | GB/s | floor µs | x floor |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rest = {"seconds": 0.0, "flops": 0.0, "bytes": 0.0, "n": 0}
    for i, r in enumerate(result["ops"]):
        floor = floor_seconds(r, floors)
        if i >= top:
            for k in ("seconds", "flops", "bytes"):
                rest[k] += r[k]
            rest["n"] += 1
            continue
        t = r["seconds"]
        src = r["source"].split("/")[-1]
        what = (" + ".join(r["layers"]) if len(r["layers"]) > 1 else
                group_of(r)) + f" {src}"
        lines.append(
            f"| {r['op']}{'*' if r['timed'] == 'alone' else ''} | {what} | {r['kind']} | {r['shape']} | "
            f"{r['per_step']:.0f} | {r['flops'] / 1e6:.2f} | {r['bytes'] / MB:.2f} | "
            f"{t * 1e6:.0f} | {r['flops'] / t / 1e9 if t else 0:.1f} | "
            f"{r['bytes'] / t / 1e9 if t else 0:.1f} | {floor * 1e6:.0f} | "
            f"{t / floor if floor else float('inf'):.1f} |")
    if rest["n"]:
        floor = floor_seconds(rest, floors)
        lines.append(f"| {rest['n']} other ops | | | | | {rest['flops'] / 1e6:.2f} | "
                     f"{rest['bytes'] / MB:.2f} | {rest['seconds'] * 1e6:.0f} | | | "
                     f"{floor * 1e6:.0f} | {rest['seconds'] / floor if floor else 0:.1f} |")
    groups = defaultdict(lambda: {"seconds": 0.0, "flops": 0.0, "bytes": 0.0, "n": 0})
    for r in result["ops"]:
        g = groups[group_of(r)]
        for k in ("seconds", "flops", "bytes"):
            g[k] += r[k]
        g["n"] += 1
    total = sum(g["seconds"] for g in groups.values())
    lines += ["", "| layer (fwd: forward and its linearization, bwd: transposed; a fusion counts "
              "for the layer most of its instructions name: a conv's bias add names it, ReLU and "
              "pooling name none) | ops | MFLOP | "
              "MB moved | µs | share | floor µs | x floor |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["seconds"]):
        floor = floor_seconds(g, floors)
        ratio = f"{g['seconds'] / floor:.1f}" if floor > 1e-6 else "-"
        lines.append(f"| {name} | {g['n']} | {g['flops'] / 1e6:.2f} | {g['bytes'] / MB:.2f} | "
                     f"{g['seconds'] * 1e6:.0f} | {g['seconds'] / total:.0%} | {floor * 1e6:.0f} | "
                     f"{ratio} |")
    fl = result["flops_per_step"] / (floors["matmul_gflops"] * 1e9)
    by = result["bytes_per_step"] / (floors["memory_gbs"] * 1e9)
    step = result["step_ms_median"] / 1e3
    lines += ["",
              f"Step: {result['step_ms_median']:.2f} ms median ({result['step_ms_min']:.2f} "
              f"min) over {result['repeats']} x {result['steps']} steps, "
              f"{result['step_cpu_ms_median']:.2f} ms of CPU time; under the profiler "
              f"{result['step_ms_profiled']:.2f} ms, ops' own time summed "
              f"{result['ops_ms_sum']:.2f} ms (* timed alone: Eigen runs it asynchronously). "
              f"{result['flops_per_step'] / 1e6:.1f} MFLOP "
              f"(XLA's cost analysis: {(result['xla_cost_analysis']['flops'] or 0) / 1e6:.1f}), "
              f"{result['bytes_per_step'] / MB:.1f} MB moved by the ops.",
              f"Floors: matmul {fl * 1e3:.2f} ms (at {floors['matmul_gflops']:.0f} GFLOP/s), "
              f"memory {by * 1e3:.2f} ms (at {floors['memory_gbs']:.1f} GB/s); "
              f"the step is {step / max(fl, by):.1f}x the larger, "
              f"{step / (fl + by):.1f}x their sum."]
    if result.get("contention"):
        c = result["contention"]
        lines.append(f"With one competing CPU-bound process: {c['step_ms_competing']:.2f} ms per "
                     f"step against {c['step_ms_alone']:.2f} ms without it (medians of "
                     f"{c['rounds']} alternating rounds): x{c['slowdown']:.2f}; CPU time "
                     f"{c['cpu_ms_competing']:.2f} against {c['cpu_ms_alone']:.2f} ms.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, from %s" % ", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=200, help="steps per timed call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant")
    parser.add_argument("--top", type=int, default=20, help="ops listed (the rest summed)")
    parser.add_argument("--compete", action="store_true",
                        help="also time the step with one competing CPU-bound process, "
                             "alternating with rounds without it")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}: choose from {', '.join(VARIANTS)}")

    flags = cpu_flags()
    tag = processor_tag(flags)
    load_start = list(os.getloadavg())
    floors = measure_floors()
    results = [measure_variant(v, args.steps, args.repeats, args.compete) for v in variants]
    floors_end = measure_floors()
    machine = {"processor": cpu_model(), "tag": tag, **flags, "cpus": os.cpu_count(),
               "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
               "xla_flags": os.environ.get("XLA_FLAGS", ""),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "versions": package_versions("jax", "jaxlib", "flax", "optax")}
    header = (f"{machine['processor']} ({tag}; {', '.join(flags.get('extensions', []))}), "
              f"{machine['cpus']} CPUs, load {load_start[0]:.2f} -> "
              f"{machine['load_average_end'][0]:.2f}; XLA_FLAGS={machine['xla_flags']!r}\n"
              f"Floors measured here: matmul {floors['matmul_gflops']:.1f} GFLOP/s "
              f"(again at the end: {floors_end['matmul_gflops']:.1f}), copy "
              f"{floors['copy_gbs']:.1f} GB/s ({floors_end['copy_gbs']:.1f}); 1 MB copy "
              f"{floors['copy_1mb_gbs']:.1f} GB/s ({floors_end['copy_1mb_gbs']:.1f}), "
              f"XLA elementwise "
              f"{floors['xla_elementwise_gbs']:.1f} GB/s")
    print(header)
    for result in results:
        print()
        print(markdown(result, floors, args.top))
    path = Path(args.json) if args.json else RESULTS_DIR / f"roofline-cpu-{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": " ".join(["python -m benchmarks.roofline",
                                                     *(argv if argv is not None else sys.argv[1:])]),
                                "machine": machine, "floors": floors, "floors_end": floors_end,
                                "variants": results}, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
