import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mnist_jax.checkpointing import BestCheckpoint, restore_state
from mnist_jax.config import ModelConfig, TrainConfig
from mnist_jax.errors import CheckpointError
from mnist_jax.train import init_state

SMALL = ModelConfig(conv_features=(8, 8), dense_features=(16,))


def test_round_trip_restores_the_exact_state(tmp_path):
    _, state = init_state(SMALL, TrainConfig(seed=0))
    state = state.replace(step=state.step + 7)
    with BestCheckpoint(tmp_path / "best") as ckpt:
        path = ckpt.save(3, state, {"val_accuracy": 0.5})
        assert path == (tmp_path / "best" / "3").absolute() and path.is_dir()
        restored = ckpt.restore(state)
    assert int(restored.step) == 7
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(a, b)


def test_only_the_latest_save_is_kept_and_plain_orbax_reads_it(tmp_path):
    _, state = init_state(SMALL, TrainConfig(seed=0))
    with BestCheckpoint(tmp_path / "best") as ckpt:
        ckpt.save(1, state, {"val_accuracy": 0.5})
        ckpt.save(4, state, {"val_accuracy": 0.7})
        assert ckpt.epoch == 4
    assert sorted(p.name for p in (tmp_path / "best").iterdir() if p.name.isdigit()) == ["4"]
    # No project code: Orbax alone, no target structure.
    with ocp.CheckpointManager((tmp_path / "best").absolute()) as manager:
        raw = manager.restore(4, args=ocp.args.StandardRestore())
    np.testing.assert_array_equal(raw["params"]["conv0"]["kernel"], state.params["conv0"]["kernel"])
    raw = ocp.StandardCheckpointer().restore((tmp_path / "best" / "4" / "default").absolute())
    assert int(raw["step"]) == int(state.step)


def test_missing_or_mismatched_checkpoints_are_one_line_errors(tmp_path):
    _, state = init_state(SMALL, TrainConfig(seed=0))
    with BestCheckpoint(tmp_path / "best") as ckpt:
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            ckpt.restore(state)
        ckpt.save(2, state, {"val_accuracy": 0.5})
    with pytest.raises(CheckpointError, match="no checkpoint for epoch 9"):
        restore_state(tmp_path / "best", 9, state)
    _, other = init_state(ModelConfig(conv_features=(8, 8, 8), dense_features=(16,)), TrainConfig())
    with pytest.raises(CheckpointError, match="cannot restore epoch 2"):
        restore_state(tmp_path / "best", 2, other)
