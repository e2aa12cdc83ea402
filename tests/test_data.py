import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from defense.data import DATASETS, load_dataset, write_idx
from defense.errors import ConfigError


def test_digits_is_real_split_fixed_and_resizable():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert len(a.train) + len(a.test) == 1797
    assert torch.equal(a.test.labels, b.test.labels)
    assert a.spec.shape == (1, 8, 8) and a.spec.num_classes == 10
    assert 0.0 <= float(a.train.images.min()) and float(a.train.images.max()) <= 1.0
    assert torch.bincount(a.test.labels).min() >= 30  # stratified
    big = load_dataset("digits", image_size=16)
    assert big.spec.shape == (1, 16, 16) and big.train.images.shape[1:] == (1, 16, 16)


def _cifar_batch(path, n, label_key, classes):
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
             label_key: rng.integers(0, classes, size=n).tolist()}
    path.write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_and_cifar100_from_standard_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _cifar_batch(folder / f"data_batch_{i}", 4, b"labels", 10)
    _cifar_batch(folder / "test_batch", 3, b"labels", 10)
    bundle = load_dataset("cifar10", tmp_path)
    assert bundle.train.images.shape == (20, 3, 32, 32) and len(bundle.test) == 3
    assert bundle.spec.channels == 3 and bundle.spec.num_classes == 10

    folder100 = tmp_path / "c100"
    folder100.mkdir()
    _cifar_batch(folder100 / "train", 5, b"fine_labels", 100)
    _cifar_batch(folder100 / "test", 2, b"fine_labels", 100)
    bundle = load_dataset("cifar100", folder100, image_size=16)
    assert bundle.spec.num_classes == 100 and bundle.spec.shape == (3, 16, 16)


def test_cifar_loader_refuses_a_pickle_that_would_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    folder = tmp_path / "c100"
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps(Evil()))
    _cifar_batch(folder / "test", 2, b"fine_labels", 100)
    with pytest.raises(ConfigError, match="refusing to unpickle"):
        load_dataset("cifar100", folder)
    assert not (tmp_path / "pwned").exists()


def _idx(path, array, compress):
    write_idx(path, array, compress)


@pytest.mark.parametrize("name,compress", [("mnist", False), ("fashion-mnist", True)])
def test_idx_data_sets_gzip_or_not(tmp_path, name, compress):
    rng = np.random.default_rng(1)
    _idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (6, 28, 28)), compress)
    _idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, 6), compress)
    _idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (3, 28, 28)), compress)
    _idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 3), compress)
    bundle = load_dataset(name, tmp_path)
    assert bundle.train.images.shape == (6, 1, 28, 28) and bundle.test.labels.shape == (3,)


def test_truncated_idx_and_missing_folder_are_one_line_errors(tmp_path):
    _idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)), False)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-10])
    for f, arr in (("train-labels-idx1-ubyte", np.zeros(2)), ("t10k-images-idx3-ubyte", np.zeros((1, 28, 28))),
                   ("t10k-labels-idx1-ubyte", np.zeros(1))):
        _idx(tmp_path / f, arr, False)
    with pytest.raises(ConfigError, match="truncated"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(ConfigError, match="train-images-idx3-ubyte") as info:
        load_dataset("mnist", tmp_path / "nowhere")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="unknown data set"):
        load_dataset("imagenet")


def test_parquet_bring_your_own(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (20, 64)).tolist()
    table = pa.table({"image": images, "label": [i % 4 for i in range(20)],
                      "split": ["test" if i % 5 == 0 else "train" for i in range(20)]})
    pq.write_table(table, tmp_path / "mine.parquet")
    bundle = load_dataset("parquet", tmp_path / "mine.parquet")
    assert bundle.spec.shape == (1, 8, 8) and bundle.spec.num_classes == 4
    assert len(bundle.test) == 4 and len(bundle.train) == 16
    assert float(bundle.train.images.max()) <= 1.0


def test_registry_lists_every_data_set():
    assert {"digits", "cifar10", "cifar100", "mnist", "fashion-mnist", "parquet"} <= set(DATASETS.names())


@pytest.mark.parametrize("data", ["objects", "floats", "short-rows", "labels-as-strings"])
def test_cifar_batches_of_the_wrong_kind_are_one_line_errors(tmp_path, data):
    """The allow-listing unpickler lets numpy arrays of any dtype through: an object array of bytes
    (which `np.asarray(..., uint8)` cannot convert), floats, rows of the wrong length and string
    labels are refused as not a CIFAR batch, not with a numpy traceback."""
    folder = tmp_path / "c100"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
    labels = [1, 2]
    if data == "objects":
        images = np.array([bytes(3072), bytes(3072)], dtype=object)
    elif data == "floats":
        images = images.astype(np.float64)
    elif data == "short-rows":
        images = images[:, :100]
    else:
        labels = ["a", "b"]
    (folder / "train").write_bytes(pickle.dumps({b"data": images, b"fine_labels": labels}, protocol=2))
    _cifar_batch(folder / "test", 2, b"fine_labels", 100)
    with pytest.raises(ConfigError, match="not a CIFAR batch"):
        load_dataset("cifar100", folder)
