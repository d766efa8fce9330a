import shutil

import numpy as np
import pytest

from mnist_jax import data
from mnist_jax.errors import DataError

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.mnist
def test_real_mnist_shapes_dtypes_and_known_facts(mnist):
    assert mnist.train.images.shape == (60000, 28, 28, 1)
    assert mnist.test.images.shape == (10000, 28, 28, 1)
    assert mnist.train.images.dtype == np.uint8 and mnist.train.labels.dtype == np.int32
    assert mnist.train.labels.shape == (60000,) and mnist.test.labels.shape == (10000,)
    assert np.bincount(mnist.train.labels).tolist() == TRAIN_COUNTS
    assert np.bincount(mnist.test.labels).tolist() == TEST_COUNTS
    assert mnist.train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.test.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert mnist.train.images.mean() == pytest.approx(33.318, abs=1e-3)
    assert (mnist.train.images / 255.0).mean() == pytest.approx(0.13066, abs=1e-5)


@pytest.mark.mnist
def test_loaded_once_per_process(mnist_path):
    assert data.load_mnist(mnist_path) is data.load_mnist(str(mnist_path))


@pytest.mark.mnist
def test_data_dir_from_environment(mnist_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(mnist_path))
    assert data.resolve_data_dir(None) == mnist_path
    assert data.fetch_files(None)[("test", "labels")].name == "t10k-labels-idx1-ubyte.gz"


@pytest.fixture
def copy_of_mnist(mnist_path, tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for f in mnist_path.glob("*.gz"):
        shutil.copy(f, folder / f.name)
    return folder


@pytest.mark.mnist
def test_corrupt_file_is_refused_by_name(copy_of_mnist):
    target = copy_of_mnist / "train-labels-idx1-ubyte.gz"
    raw = bytearray(target.read_bytes())
    raw[200] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz.*checksum"):
        data.fetch_files(copy_of_mnist)


@pytest.mark.mnist
def test_truncated_file_is_refused_by_name(copy_of_mnist):
    target = copy_of_mnist / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        data.fetch_files(copy_of_mnist)


@pytest.mark.mnist
def test_missing_file_is_refused_by_name(copy_of_mnist):
    (copy_of_mnist / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="has no t10k-labels-idx1-ubyte.gz"):
        data.fetch_files(copy_of_mnist)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.fetch_files(tmp_path / "nowhere")


def test_idx_decoder_rejects_wrong_content(tmp_path):
    import gzip

    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress((2049).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes([1, 2, 3])))
    with pytest.raises(DataError, match="header promises 5"):
        data.read_idx(path, "labels")
    path.write_bytes(gzip.compress((2051).to_bytes(4, "big") + bytes(8)))
    with pytest.raises(DataError, match="not an IDX labels file"):
        data.read_idx(path, "labels")
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a readable gzip file"):
        data.read_idx(path, "labels")


def test_synthetic_source_shapes_and_determinism():
    a, b = data.synthetic(100, 50, seed=3), data.synthetic(100, 50, seed=3)
    assert a.train.images.shape == (100, 28, 28, 1) and a.train.images.dtype == np.uint8
    assert a.test.labels.shape == (50,) and a.test.labels.dtype == np.int32
    np.testing.assert_array_equal(a.train.images, b.train.images)


@pytest.mark.mnist
def test_the_holdout_is_stratified_disjoint_and_fixed(mnist):
    splits = data.make_splits(mnist, "holdout")
    rest, holdout = data.stratified_holdout(mnist.train.labels, 5_000)
    # Each class's share of 5,000 (count / 12), floors 4,994 in all; the 6 largest
    # remainders (classes 3, 1, 4, 5, 9, then 0 before 8 on a tie) get one more.
    assert np.bincount(splits.val.labels).tolist() == [494, 562, 496, 511, 487, 452, 493, 522, 487, 496]
    assert len(splits.train.labels) == 55_000 and len(splits.val.labels) == 5_000
    assert not set(rest) & set(holdout) and len(set(rest) | set(holdout)) == 60_000
    np.testing.assert_array_equal(splits.val.images, mnist.train.images[holdout])
    np.testing.assert_array_equal(splits.train.labels, mnist.train.labels[rest])
    # The same images every time: the split depends on no training seed or variant.
    again = data.make_splits(mnist, "holdout")
    np.testing.assert_array_equal(again.val.images, splits.val.images)
    assert splits.test.labels.tolist()[:5] == [7, 2, 1, 0, 4] and len(splits.test.labels) == 10_000


def test_a_limited_holdout_run_never_trains_on_its_validation_images(tiny):
    full = data.make_splits(tiny, "holdout", holdout_size=100)
    limited = data.make_splits(tiny, "holdout", holdout_size=100, limit=120)
    assert len(limited.train.labels) == 120 and len(limited.val.labels) == 20
    train_rows = {row.tobytes() for row in limited.train.images}
    assert not any(row.tobytes() in train_rows for row in full.val.images)
    np.testing.assert_array_equal(limited.val.images, full.val.images[:20])


def test_the_notebook_protocol_validates_on_the_test_set(tiny):
    splits = data.make_splits(tiny, "test")
    assert splits.validation == "test" and splits.val is splits.test
    assert len(splits.train.labels) == 500


def test_a_holdout_larger_than_the_training_set_is_refused(tiny):
    with pytest.raises(data.DataError, match="holdout of 500"):
        data.make_splits(tiny, "holdout", holdout_size=500)
