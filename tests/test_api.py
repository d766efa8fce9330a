"""The public API: `import mnist_jax as mj` gives what a study needs, lazily, and the
report's part works where JAX cannot be imported."""

import inspect
import shutil
import subprocess
import sys
import textwrap

import pytest

import mnist_jax as mj

from conftest import REPO

DOCUMENTED = ["fit", "ModelConfig", "TrainConfig", "load_mnist", "make_splits", "run_study",
              "write_study_report", "Parts", "train_step", "eval_step", "cross_entropy",
              "adam", "step_key", "TrainState", "init_state", "build_run", "run_epoch"]

# Run before anything else in a subprocess: JAX, Flax, Optax and Orbax cannot be imported.
BLOCK_JAX = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "orbax"):
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, Block())
""")


def test_the_documented_names_are_there_typed_and_documented():
    assert set(DOCUMENTED) <= set(mj.__all__) <= set(dir(mj))
    for name in mj.__all__:
        value = getattr(mj, name)
        assert inspect.getdoc(value), f"mj.{name} has no docstring"
        if inspect.isfunction(value):
            assert inspect.signature(value).return_annotation is not inspect.Signature.empty, \
                f"mj.{name} has no return type"
    assert mj.fit is __import__("mnist_jax.train", fromlist=["fit"]).fit


@pytest.mark.slow  # conftest.small_study: a real study in a subprocess
def test_the_report_works_without_jax(small_study, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(small_study.out, study)
    (study / "summary.json").unlink()
    code = BLOCK_JAX + textwrap.dedent(f"""
        import mnist_jax as mj
        mj.ModelConfig(conv_features=(8, 8))
        try:
            mj.fit
        except ImportError:
            pass
        else:
            raise SystemExit("fit imported with JAX blocked")
        from mnist_jax import report
        sys.exit(report.main([{str(study)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (study / "summary.json").is_file() and "2conv" in proc.stdout
