"""Data sets, in one registry. Each loader returns pixel-space tensors in [0, 1] plus an InputSpec.

Only the experimenter's code (attacks, training, evaluation) calls these loaders. The DHBE defence
never does: it is data-free, and a test patches every loader here to raise while it runs.
"""
from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from defense.errors import ConfigError, shown
from defense.registry import Registry
from defense.spec import InputSpec, require


@dataclass
class Split:
    """Images (N, C, H, W) float32 in [0, 1] and integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DataBundle:
    name: str
    train: Split
    test: Split
    spec: InputSpec


DatasetLoader = Callable[[Optional[Path], Optional[int], int], DataBundle]
DATASETS: Registry[DatasetLoader] = Registry("data set")


def load_dataset(name: str, data_dir: Optional[str | Path] = None, image_size: Optional[int] = None,
                 seed: int = 0) -> DataBundle:
    """Load a registered data set. `image_size` resizes square images (bilinear) when given."""
    loader = DATASETS.get(name)
    require(image_size is None or 4 <= image_size <= 512, f"image size must be in 4..512, got {image_size}")
    return loader(Path(data_dir) if data_dir is not None else None, image_size, seed)


def _resize(images: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    if size is None or images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)


def _bundle(name: str, train: Split, test: Split, image_size: Optional[int], num_classes: int) -> DataBundle:
    train = Split(_resize(train.images, image_size), train.labels)
    test = Split(_resize(test.images, image_size), test.labels)
    channels, height, width = train.images.shape[1:]
    per_channel = train.images.transpose(0, 1).reshape(channels, -1)
    spec = InputSpec(
        channels=channels, height=height, width=width, num_classes=num_classes,
        mean=tuple(per_channel.mean(dim=1).tolist()),
        std=tuple(per_channel.std(dim=1).clamp_min(1e-3).tolist()),
    )
    return DataBundle(name, train, test, spec)


def _seeded_split(images: torch.Tensor, labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified split: each class contributes the same fraction to the test set."""
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    for label in np.unique(labels.numpy()):
        members = np.flatnonzero(labels.numpy() == label)
        rng.shuffle(members)
        test_idx.extend(members[: int(round(len(members) * test_fraction))].tolist())
    mask = np.zeros(len(labels), dtype=bool)
    mask[test_idx] = True
    train_idx = torch.from_numpy(np.flatnonzero(~mask))
    test_idx_t = torch.from_numpy(np.flatnonzero(mask))
    return Split(images[train_idx], labels[train_idx]), Split(images[test_idx_t], labels[test_idx_t])


@DATASETS.register("digits")
def load_digits(data_dir: Optional[Path], image_size: Optional[int], seed: int) -> DataBundle:
    """The 1,797 8x8 handwritten digits embedded in scikit-learn; a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(raw.target, dtype=torch.long)
    train, test = _seeded_split(images, labels, test_fraction=0.2, seed=0)
    return _bundle("digits", train, test, image_size, num_classes=10)


# --- CIFAR: the python "pickle batch" format, read with an allow-listing unpickler -------------

class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of bytes, lists and numpy arrays) and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("builtins", "bytes"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) not in self._ALLOWED:
            raise ConfigError(f"refusing to unpickle {module}.{name}: not a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as handle:
        try:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
        except ConfigError:
            raise
        except Exception as exc:  # corrupt file
            raise ConfigError(f"{path} is not a readable CIFAR batch: {exc}") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise ConfigError(f"{path} is not a CIFAR batch (missing b'data' or {label_key!r})")
    data, labels = batch[b"data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ConfigError(f"{path} is not a CIFAR batch: b'data' must be an N x 3072 uint8 array")
    if isinstance(labels, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        labels = np.array(labels, dtype=np.int64)
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu" or labels.shape != (len(data),):
        raise ConfigError(f"{path} is not a CIFAR batch: {label_key!r} must be {len(data)} integers")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _find_folder(data_dir: Optional[Path], subfolder: str, required: list[str], dataset: str) -> Path:
    if data_dir is None:
        raise ConfigError(f"data set {shown(dataset)} needs --data-dir holding {', '.join(required)}")
    for candidate in (data_dir, data_dir / subfolder):
        if all(_existing(candidate / name) for name in required):
            return candidate
    raise ConfigError(f"data set {shown(dataset)}: {data_dir} must hold {', '.join(required)} (directly or in {subfolder}/)")


def _existing(path: Path) -> Optional[Path]:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _cifar(name: str, subfolder: str, train_files: list[str], test_file: str, label_key: bytes,
           num_classes: int, data_dir: Optional[Path], image_size: Optional[int]) -> DataBundle:
    folder = _find_folder(data_dir, subfolder, train_files + [test_file], name)

    def split(files: list[str]) -> Split:
        parts = [_read_cifar_batch(folder / f, label_key) for f in files]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts])).float() / 255.0
        return Split(images, torch.from_numpy(np.concatenate([p[1] for p in parts])))

    return _bundle(name, split(train_files), split([test_file]), image_size, num_classes)


@DATASETS.register("cifar10")
def load_cifar10(data_dir: Optional[Path], image_size: Optional[int], seed: int) -> DataBundle:
    files = [f"data_batch_{i}" for i in range(1, 6)]
    return _cifar("cifar10", "cifar-10-batches-py", files, "test_batch", b"labels", 10, data_dir, image_size)


@DATASETS.register("cifar100")
def load_cifar100(data_dir: Optional[Path], image_size: Optional[int], seed: int) -> DataBundle:
    return _cifar("cifar100", "cifar-100-python", ["train"], "test", b"fine_labels", 100, data_dir, image_size)


# --- MNIST and Fashion-MNIST: IDX files, gzip or not -----------------------------------------

_IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (unsigned-byte data) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise ConfigError(f"{path} is truncated: {len(raw) - header} of {expected} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write unsigned bytes as an IDX file (`read_idx`'s inverse; `compress`: PATH.gz), atomically."""
    from defense.fileio import atomic_path

    array = np.asarray(array)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    target = Path(str(path) + ".gz") if compress else Path(path)
    data = header + array.astype(np.uint8).tobytes()
    with atomic_path(target) as tmp:
        with (gzip.open(tmp, "wb") if compress else open(tmp, "wb")) as handle:
            handle.write(data)
    return target


def _idx_dataset(name: str, data_dir: Optional[Path], image_size: Optional[int]) -> DataBundle:
    folder = _find_folder(data_dir, name if name != "fashion-mnist" else "FashionMNIST/raw", _IDX_FILES, name)
    arrays = [read_idx(_existing(folder / f)) for f in _IDX_FILES]  # type: ignore[arg-type]

    def split(images: np.ndarray, labels: np.ndarray) -> Split:
        if images.shape[0] != labels.shape[0]:
            raise ConfigError(f"{name}: {images.shape[0]} images but {labels.shape[0]} labels")
        return Split(torch.from_numpy(images.copy()).float().unsqueeze(1) / 255.0,
                     torch.from_numpy(labels.astype(np.int64)))

    return _bundle(name, split(arrays[0], arrays[1]), split(arrays[2], arrays[3]), image_size, 10)


@DATASETS.register("mnist")
def load_mnist(data_dir: Optional[Path], image_size: Optional[int], seed: int) -> DataBundle:
    return _idx_dataset("mnist", data_dir, image_size)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(data_dir: Optional[Path], image_size: Optional[int], seed: int) -> DataBundle:
    return _idx_dataset("fashion-mnist", data_dir, image_size)


# --- Bring your own: a Parquet file ------------------------------------------------------------

@DATASETS.register("parquet")
def load_parquet(data_dir: Optional[Path], image_size: Optional[int], seed: int) -> DataBundle:
    """A Parquet file (--data-dir FILE) with `image` and `label` columns and an optional `split`.

    `image` holds encoded image bytes (PNG/JPEG) or a flat list of pixel values; for lists the
    schema metadata gives `height`, `width` and `channels` (square single-channel is inferred).
    Values above 1 are read as 0..255. Without a `split` column a seeded 80/20 split is made.
    """
    import pyarrow.parquet as pq

    if data_dir is None or not Path(data_dir).is_file():
        raise ConfigError("data set 'parquet' needs --data-dir naming a .parquet file with image and label columns")
    try:
        table = pq.read_table(data_dir)
    except Exception as exc:
        raise ConfigError(f"{data_dir} is not a readable Parquet file: {exc}") from None
    missing = {"image", "label"} - set(table.column_names)
    if missing:
        raise ConfigError(f"{data_dir} lacks column(s) {', '.join(sorted(missing))}")
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    images = _decode_images(table.column("image").to_pylist(), meta)
    labels = torch.tensor(table.column("label").to_pylist(), dtype=torch.long)
    num_classes = int(meta.get("num_classes", int(labels.max()) + 1))
    if "split" in table.column_names:
        is_test = torch.tensor([s == "test" for s in table.column("split").to_pylist()])
        train, test = Split(images[~is_test], labels[~is_test]), Split(images[is_test], labels[is_test])
    else:
        train, test = _seeded_split(images, labels, 0.2, seed)
    if len(train) == 0 or len(test) == 0:
        raise ConfigError(f"{data_dir}: both train and test splits need rows")
    return _bundle("parquet", train, test, image_size, num_classes)


def _decode_images(values: list, meta: dict[str, str]) -> torch.Tensor:
    if not values:
        raise ConfigError("the Parquet file has no rows")
    if isinstance(values[0], (bytes, bytearray)):
        from PIL import Image

        arrays = [np.asarray(Image.open(io.BytesIO(v))) for v in values]
        stacked = np.stack(arrays).astype(np.float32)
        if stacked.ndim == 3:
            stacked = stacked[:, None]
        else:
            stacked = stacked.transpose(0, 3, 1, 2)
    else:
        flat = np.asarray(values, dtype=np.float32)
        channels = int(meta.get("channels", 1))
        side = int(round((flat.shape[1] / channels) ** 0.5))
        height, width = int(meta.get("height", side)), int(meta.get("width", side))
        if channels * height * width != flat.shape[1]:
            raise ConfigError(f"image lists of {flat.shape[1]} values do not fit {channels}x{height}x{width}")
        stacked = flat.reshape(-1, channels, height, width)
    if stacked.max() > 1.0:
        stacked = stacked / 255.0
    return torch.from_numpy(np.ascontiguousarray(stacked))
