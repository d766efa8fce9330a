"""Resource use sampled through each epoch by a background thread (psutil, NVML).

Per epoch: the mean and peak of system CPU %, this process's CPU % (of all cores), its
resident memory (RSS) and the system's used RAM in MB, and on NVIDIA GPUs the GPU load %
and VRAM used (whole device, as NVML reports it, all processes) against the total.
JAX preallocates most of a GPU's memory at start-up (XLA_PYTHON_CLIENT_PREALLOCATE), so
VRAM used says little about the model; `jax_peak_mb_since_start` is JAX's own peak of
bytes in use on the first device since the process started (all runs in it so far).
NVML devices are taken by index, so with CUDA_VISIBLE_DEVICES remapping GPUs the sampled
device may not be the one JAX uses.
psutil.cpu_count() reports the host's cores, not a container's CPU quota.
"""

from __future__ import annotations

import platform
import threading
from importlib import metadata
from collections import defaultdict
from pathlib import Path

import psutil

MB = 1024 * 1024


class ResourceSampler:
    """Call `begin_epoch()` and `end_epoch() -> dict` around each epoch; `close()` at the end."""

    def __init__(self, interval_s: float = 0.5, num_gpus: int | None = None):
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._cores = psutil.cpu_count() or 1
        self._gpus, self.gpu_note = _open_nvml(num_gpus)
        self._lock = threading.Lock()
        self._samples: dict[str, list[float]] = defaultdict(list)
        self._stop = threading.Event()
        # psutil's first cpu_percent() is a meaningless 0.0: prime both counters now.
        psutil.cpu_percent(None)
        self._process.cpu_percent(None)
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._thread.start()

    @property
    def has_gpu(self) -> bool:
        return bool(self._gpus)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self):
        sample = {
            "cpu_percent": psutil.cpu_percent(None),
            "process_cpu_percent": self._process.cpu_percent(None) / self._cores,
            "rss_mb": self._process.memory_info().rss / MB,
            "ram_used_mb": psutil.virtual_memory().used / MB,
        }
        if self._gpus:
            import pynvml
            # Separate reads: some devices (MIG slices) report memory but not utilisation.
            try:
                util = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._gpus]
                sample["gpu_util_percent"] = sum(util) / len(util)
            except pynvml.NVMLError:
                pass
            try:
                mem = [pynvml.nvmlDeviceGetMemoryInfo(h) for h in self._gpus]
                sample["vram_used_mb"] = sum(m.used for m in mem) / MB
                sample["vram_total_mb"] = sum(m.total for m in mem) / MB
            except pynvml.NVMLError:
                pass
        with self._lock:
            for key, value in sample.items():
                self._samples[key].append(float(value))

    def begin_epoch(self) -> None:
        with self._lock:
            self._samples = defaultdict(list)

    def end_epoch(self) -> dict[str, float]:
        """Mean and peak of each quantity since `begin_epoch`, plus JAX's device memory."""
        with self._lock:
            empty = not self._samples
        if empty:  # an epoch shorter than the interval: one sample, however short
            self._sample()
        with self._lock:
            samples = dict(self._samples)
        out = {"resource_samples": len(samples["cpu_percent"])}
        for key, values in samples.items():
            if key == "vram_total_mb":
                out[key] = max(values)
                continue
            out[f"{key}_mean"] = sum(values) / len(values)
            out[f"{key}_peak"] = max(values)
        peak = jax_peak_bytes()
        if peak is not None:
            out["jax_peak_mb_since_start"] = peak / MB
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._gpus:
            import pynvml
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass
            self._gpus = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_nvml(num_gpus: int | None):
    """NVML handles of the GPUs JAX uses, or ([], why not)."""
    import jax

    gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
    if not gpus:
        return [], f"no GPU in use by JAX (backend {jax.default_backend()}): GPU load and VRAM not sampled"
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as e:  # no driver, no library, not an NVIDIA device
        return [], f"NVML unavailable ({type(e).__name__}): GPU load and VRAM not sampled"
    try:
        n = min(pynvml.nvmlDeviceGetCount(), num_gpus or len(gpus))
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        if not handles:
            raise RuntimeError("NVML lists no device")
        name = pynvml.nvmlDeviceGetName(handles[0])
        return handles, f"sampling {n} GPU(s) through NVML: {name}"
    except Exception as e:
        pynvml.nvmlShutdown()
        return [], f"NVML unusable ({type(e).__name__}): GPU load and VRAM not sampled"


def jax_peak_bytes() -> int | None:
    """JAX's peak bytes in use on the first device so far (None where not reported, as on CPU)."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # some backends raise rather than return None
        return None
    return stats.get("peak_bytes_in_use") if stats else None


def cpu_model() -> str:
    """The processor's name (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(*packages: str) -> dict[str, str | None]:
    """Python's and each installed package's version (None where not installed)."""
    out = {"python": platform.python_version()}
    for package in packages:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out
