import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

# Bit-identical results on a GPU need XLA's deterministic kernels (some reductions and
# scatter gradients use atomics otherwise: an H100 gave different parameters for the same
# seed). Set before JAX starts its backend; subprocesses inherit it. No effect on CPU.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_gpu_deterministic_ops=true"]).strip()

# The Keras comparisons run Keras 3 on JAX, already installed; TensorFlow is not needed.
os.environ.setdefault("KERAS_BACKEND", "jax")

# One persistent compilation cache for the test session: the pytest workers and every
# command they start compile the same few programs again and again (the study's chunk
# program alone takes 5-10 s per process on these CPUs). It lives in a temporary folder
# made here, in the session's first process (pytest-xdist's workers inherit it), and
# removed when that process exits, so nothing outlives the session: an entry cut short by a
# kill would otherwise stay and warn in every later run. A maximum size turns on JAX's
# file lock around each read and write (filelock, in the test extra), so one process never
# reads an entry another is writing. A command a test kills at an arbitrary moment runs
# without it (`without_compilation_cache`); a process that kills itself at a chosen point
# (never inside a compilation) keeps it.
if "PYTEST_XDIST_WORKER" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="mnist_jax-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)
COMPILATION_CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR",
                               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                               "JAX_COMPILATION_CACHE_MAX_SIZE")


def without_compilation_cache(env: dict | None = None) -> dict:
    """`env` (default: this process's) without the session's compilation cache."""
    return {k: v for k, v in (os.environ if env is None else env).items()
            if k not in COMPILATION_CACHE_VARIABLES}

import jax  # noqa: E402
import pytest  # noqa: E402

from mnist_jax import data, interrupts  # noqa: E402

# Exact float32 products wherever the tests run: on recent GPUs JAX's default is TF32,
# which would break the float32 tolerances of the equivalence tests.
jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "mnist"


def mnist_dir() -> Path | None:
    """The offline MNIST folder: $MNIST_JAX_DATA_DIR, else ../shared/mnist."""
    env = os.environ.get(data.DATA_DIR_ENV)
    candidate = Path(env) if env else SHARED_MNIST
    return candidate if candidate.is_dir() else None


@pytest.fixture(autouse=True)
def no_signal_left_pending():
    """A test that sends itself SIGINT or SIGTERM (test_interrupts) leaves the request in
    mnist_jax.interrupts, and the next fit() in this process would stop at its first
    check(). Cleared after every test: each test starts as a fresh process would."""
    yield
    interrupts._requested = None


@pytest.fixture(scope="session")
def mnist_path() -> Path:
    path = mnist_dir()
    if path is None:
        message = f"no offline MNIST folder ({SHARED_MNIST} or ${data.DATA_DIR_ENV})"
        if os.environ.get("CI"):  # CI always has ../shared/mnist: a skip there would hide a bug
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def mnist(mnist_path):
    return data.load_mnist(mnist_path)


@pytest.fixture(scope="session")
def tiny():
    """A small learnable dataset (not divisible by 32, so the last batch is padded)."""
    return data.synthetic(num_train=500, num_test=200, seed=0)


# The study's own flags for one small real run: both models, 3 seeds (an interval and a
# test), 2 epochs, 960 training images (160 validation and test).
SMALL_STUDY_FLAGS = ("--seeds", "3", "--epochs", "2", "--train-limit", "960")


def session_folder(tmp_path_factory) -> Path:
    """A temporary folder of this test session, the same for all its pytest-xdist workers
    (each worker's own base folder is a subfolder of it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@pytest.fixture(scope="session")
def small_study(mnist_path, tmp_path_factory) -> SimpleNamespace:
    """One finished `python -m experiments.depth_study` run with SMALL_STUDY_FLAGS, shared
    by the tests that need one (about 40 s), made once per session: the first worker to
    need it runs it, another waits for it under the same file lock rather than running its
    own. `out` (copy it before changing anything) and the command's `stdout`."""
    from filelock import FileLock

    folder = session_folder(tmp_path_factory) / "small_study"
    folder.mkdir(exist_ok=True)
    out, stdout = folder / "study", folder / "stdout.txt"
    with FileLock(str(folder / "made.lock")):
        if not stdout.exists():  # written last: the study before it is whole
            shutil.rmtree(out, ignore_errors=True)  # what a failed attempt left
            proc = subprocess.run([sys.executable, "-m", "experiments.depth_study",
                                   "--data-dir", str(mnist_path), *SMALL_STUDY_FLAGS,
                                   "--out", str(out)],
                                  cwd=REPO, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, proc.stderr
            stdout.write_text(proc.stdout)
    return SimpleNamespace(out=out, stdout=stdout.read_text())


# Fixtures that run a real study (tens of seconds each): a test that uses one belongs to
# the full suite only, even where its `@pytest.mark.slow` was forgotten.
SLOW_FIXTURES = {"small_study", "width_study"}


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
