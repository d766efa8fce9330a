"""MNIST in memory: [N, 28, 28, 1] uint8 images and [N] int32 labels.

The four original files are fetched and checked by tensorflow-datasets' own download
manager against the checksums tensorflow-datasets registers for its `mnist` dataset. Its
manual folder comes first, so a folder already holding the files (`--data-dir`, or the
environment variable MNIST_JAX_DATA_DIR) works offline; without one the files are
downloaded once into a cache. Only the download manager is used: no TensorFlow.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import socket
import sys
import tempfile
import urllib.parse
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mnist_jax.errors import DataError

DATA_DIR_ENV = "MNIST_JAX_DATA_DIR"
DEFAULT_CACHE = Path.home() / ".cache" / "mnist_jax"
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10

# (split, kind) -> attribute of tensorflow-datasets' mnist module naming the file
_TFDS_FILENAME_ATTRS = {
    ("train", "images"): "_MNIST_TRAIN_DATA_FILENAME",
    ("train", "labels"): "_MNIST_TRAIN_LABELS_FILENAME",
    ("test", "images"): "_MNIST_TEST_DATA_FILENAME",
    ("test", "labels"): "_MNIST_TEST_LABELS_FILENAME",
}
_IDX_MAGIC = {"images": 2051, "labels": 2049}  # IDX headers: ubyte data, 3 or 1 dimensions


class Arrays(NamedTuple):
    images: np.ndarray  # [N, 28, 28, 1] uint8
    labels: np.ndarray  # [N] int32


class Dataset(NamedTuple):
    train: Arrays
    test: Arrays


VALIDATIONS = ("holdout", "test")
HOLDOUT_SIZE = 5_000
# The holdout's own fixed seed: the same images for every training seed and variant, and
# independent of them (a training seed never moves an image between train and holdout).
HOLDOUT_SEED = 20_261_125


class Splits(NamedTuple):
    """What a run trains on, selects epochs on, and reports on.

    validation "holdout": val is a stratified holdout of the training set, train the rest,
    test the test set (evaluated once per seed, on the restored best weights).
    validation "test": the notebook's protocol, train on all training images and select
    on the test set (val and test are the same images: the test figure is then optimistic).
    `holdout_size` (None under "test") and `limit` say how they were made (make_splits),
    so that a run's record can tell two slices with the same counts apart.
    """

    train: Arrays
    val: Arrays
    test: Arrays
    validation: str
    holdout_size: int | None = None
    limit: int | None = None

    def record(self) -> dict:
        """What config.json records of the data (and --resume compares): the protocol,
        the holdout size and train limit, and the examples in each split."""
        return {"validation": self.validation, "holdout_size": self.holdout_size,
                "train_limit": self.limit, "train_examples": len(self.train.labels),
                "val_examples": len(self.val.labels), "test_examples": len(self.test.labels)}


def stratified_holdout(labels: np.ndarray, size: int, seed: int = HOLDOUT_SEED
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (rest, holdout) indices: `size` examples with each class's share of `labels`
    (largest remainders round the quotas to exactly `size`), drawn with `seed`."""
    n = len(labels)
    if not 0 < size < n:
        raise DataError(f"a holdout of {size:,} (the holdout size) must leave training images: "
                        f"use 1 to {n - 1:,} of the {n:,}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / n
    quotas = np.floor(exact).astype(int)
    # Hand the rounding remainder to the largest fractional parts (ties: lower class first).
    extra = np.argsort(-(exact - quotas), kind="stable")[:size - quotas.sum()]
    quotas[extra] += 1
    rng = np.random.default_rng(seed)
    holdout = np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quotas)])
    holdout = np.sort(holdout)
    rest = np.setdiff1d(np.arange(n), holdout, assume_unique=True)
    return rest, holdout


def make_splits(dataset: Dataset, validation: str = "holdout",
                holdout_size: int = HOLDOUT_SIZE, limit: int | None = None) -> Splits:
    """The run's splits under a validation protocol (see Splits).

    `limit` (quick checks only) keeps the first `limit` training images and the first
    limit // 6 validation and test images, after the holdout is drawn from the full set,
    so a limited run's holdout images are still never trained on.
    """
    if validation not in VALIDATIONS:
        raise DataError(f"validation must be one of {VALIDATIONS}, got {validation!r}")
    train, test = dataset
    if validation == "holdout":
        rest, holdout = stratified_holdout(train.labels, holdout_size)
        train, val = _take(train, rest), _take(train, holdout)
    else:
        val = test
    if limit is not None:
        small = max(limit // 6, 1)
        train, val, test = _take(train, slice(limit)), _take(val, slice(small)), _take(test, slice(small))
    return Splits(train, val, test, validation,
                  holdout_size if validation == "holdout" else None, limit)


def _take(arrays: Arrays, index) -> Arrays:
    return Arrays(arrays.images[index], arrays.labels[index])


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The offline folder: the argument, else $MNIST_JAX_DATA_DIR, else None (download)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    return Path(chosen).expanduser() if chosen is not None else None


def fetch_files(data_dir: str | os.PathLike | None = None, source: str | None = None
                ) -> dict[tuple[str, str], Path]:
    """Paths of the four verified MNIST files, keyed by (split, "images" | "labels").

    Raises DataError, naming the file and where its folder came from (--data-dir or
    $MNIST_JAX_DATA_DIR, or `source` where given), when one is missing, truncated or
    corrupt. Without a folder, says on stderr that it downloads before it does, and fails
    fast when offline.
    """
    import tensorflow_datasets as tfds  # heavy: imported only when data is needed
    from tensorflow_datasets.core.download import downloader as tfds_downloader
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError
    from tensorflow_datasets.image_classification import mnist as tfds_mnist

    names = {key: getattr(tfds_mnist, attr) for key, attr in _TFDS_FILENAME_ATTRS.items()}
    manual_dir = resolve_data_dir(data_dir)
    if manual_dir is not None:
        source = source or _data_dir_source(data_dir)
        where = f"data folder {manual_dir} ({source})"
        if not manual_dir.exists():
            raise DataError(f"{where} does not exist")
        if not manual_dir.is_dir():
            raise DataError(f"{where} is a file, not a folder")
        missing = [name for name in names.values() if not (manual_dir / name).is_file()]
        # Without this check the download manager would try the network.
        if len(missing) == len(names):
            raise DataError(f"{where} holds none of the four MNIST files ({', '.join(missing)})")
        if missing:
            raise DataError(f"{where} has no {', '.join(missing)}")
        for name in names.values():  # the download manager would call it a download failure
            try:
                with open(manual_dir / name, "rb") as f:
                    f.read(1)
            except OSError as e:
                raise DataError(f"{name} in {where} cannot be read "
                                f"({e.strerror or _first_line(e)})") from None
    else:
        where = f"the download cache {DEFAULT_CACHE}"
    urls = {f"{split}_{kind}": tfds_mnist._MNIST_URL + name
            for (split, kind), name in names.items()}
    tfds.display_progress_bar(False)
    # A failed download is reported once, below; urllib3's retry warnings would repeat it.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as scratch:
        download_dir = scratch if manual_dir is not None else DEFAULT_CACHE / "downloads"
        if manual_dir is None and len(list((Path(download_dir) / "mnist").glob("*.gz"))) < 4:
            _before_download(tfds_mnist._MNIST_URL, tfds_downloader)
        manager = tfds.download.DownloadManager(
            download_dir=download_dir, manual_dir=manual_dir, dataset_name="mnist")
        try:
            paths = manager.download(urls)
        except NonMatchingChecksumError as e:
            bad = next((n for n in names.values() if n in str(e)), "a file")
            raise DataError(f"{bad} in {where} does not match the checksum tensorflow-datasets "
                            f"registers for it (truncated or corrupt): replace it") from None
        except Exception as e:  # network or file-system failures of the download itself
            if manual_dir is not None:  # the folder was given: no advice to give one
                raise DataError(f"could not read MNIST from {where} "
                                f"({type(e).__name__}: {_first_line(e)})") from None
            raise DataError(f"could not get MNIST ({type(e).__name__}: {_first_line(e)}); "
                            f"{OFFLINE_HINT}") from None
    return {(split, kind): Path(paths[f"{split}_{kind}"]) for split, kind in names}


OFFLINE_HINT = (f"offline, pass --data-dir DIR or set ${DATA_DIR_ENV} to a folder holding the "
                f"four MNIST .gz files")
CONNECT_TIMEOUT_S = 20  # to reach the download server before trying to download
DOWNLOAD_RETRIES = 2  # tensorflow-datasets' default, 10 with backoff, waits 200 s offline


def _before_download(url: str, tfds_downloader) -> None:
    """Say on stderr that MNIST is being downloaded, before any wait, and fail within
    CONNECT_TIMEOUT_S when the server cannot be reached (no network, no name service).
    Through a proxy (HTTPS_PROXY, ...) the server is not checked directly; the retries of a
    failing download are cut to DOWNLOAD_RETRIES either way."""
    host = urllib.parse.urlsplit(url).hostname
    print(f"downloading MNIST (4 files, 11 MB) from {url} into {DEFAULT_CACHE} "
          f"({OFFLINE_HINT})", file=sys.stderr, flush=True)
    if getattr(tfds_downloader, "MAX_RETRIES", 0) > DOWNLOAD_RETRIES:
        tfds_downloader.MAX_RETRIES = DOWNLOAD_RETRIES
    if urllib.request.getproxies():
        return
    try:
        socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else e.strerror or _first_line(e)
        raise DataError(f"could not download MNIST: cannot reach {host} ({reason}); "
                        f"{OFFLINE_HINT}") from None


def read_idx(path: Path, kind: str) -> np.ndarray:
    """Decode a gzipped IDX file: images -> [N, 28, 28, 1] uint8, labels -> [N] int32."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path.name} is not a readable gzip file ({_first_line(e)})") from None
    ndim = 3 if kind == "images" else 1
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != _IDX_MAGIC[kind]:
        raise DataError(f"{path.name} is not an IDX {kind} file")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path.name} holds {len(raw) - header} bytes of data, "
                        f"its header promises {int(np.prod(dims))}")
    data = np.frombuffer(raw, np.uint8, offset=header).reshape(dims)
    if kind == "images":
        if tuple(dims[1:]) != IMAGE_SHAPE[:2]:
            raise DataError(f"{path.name} holds {dims[1]}x{dims[2]} images, not 28x28")
        return data[..., None].copy()
    if data.max(initial=0) >= NUM_CLASSES:
        raise DataError(f"{path.name} has a label outside 0..9")
    return data.astype(np.int32)


def _data_dir_source(data_dir, name: str = "data_dir") -> str:
    """Where the data folder came from, for messages: the argument (`name`: the command
    line calls it --data-dir) or the environment variable."""
    return name if data_dir is not None else f"${DATA_DIR_ENV}"


@functools.lru_cache(maxsize=4)
def _load_cached(data_dir: Path | None, source: str) -> Dataset:
    files = fetch_files(data_dir, source)
    splits = {}
    for split in ("train", "test"):
        images = read_idx(files[(split, "images")], "images")
        labels = read_idx(files[(split, "labels")], "labels")
        if len(images) != len(labels):
            raise DataError(f"MNIST {split} has {len(images)} images but {len(labels)} labels")
        splits[split] = Arrays(images, labels)
    return Dataset(**splits)


def load_mnist(data_dir: str | os.PathLike | None = None, *, name: str = "data_dir") -> Dataset:
    """MNIST train (60,000) and test (10,000), read once per process and kept in memory.
    `name`: what error messages call `data_dir` (the command line: "--data-dir")."""
    return _load_cached(resolve_data_dir(data_dir), _data_dir_source(data_dir, name))


def synthetic(num_train: int = 512, num_test: int = 256, seed: int = 0,
              noise: float = 40.0) -> Dataset:
    """A small learnable stand-in for MNIST, for fast tests: class k is a bright 8x8
    square at the k-th of ten places, on a dark background with pixel noise."""
    rng = np.random.default_rng(seed)
    prototypes = np.zeros((NUM_CLASSES, *IMAGE_SHAPE))
    for k in range(NUM_CLASSES):
        row, col = 2 + 12 * (k // 5), 1 + 5 * (k % 5)
        prototypes[k, row:row + 8, col:col + 8] = 200.0

    def make(n):
        labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
        images = prototypes[labels] + rng.normal(0, noise, (n, *IMAGE_SHAPE))
        return Arrays(np.clip(images, 0, 255).astype(np.uint8), labels)

    return Dataset(train=make(num_train), test=make(num_test))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
