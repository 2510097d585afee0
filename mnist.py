"""MNIST and Fashion-MNIST as in-memory tensors, read from local IDX files.

The loaders never return a partial or garbled dataset: every file is checked for its IDX
header, its size and (for MNIST) the SHA-256 of its uncompressed bytes, and any problem is
raised as a :class:`DatasetFileError` that names the file and what is wrong with it.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "DatasetFileError",
    "LabelledImages",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
]

VENDORED_MNIST = Path(__file__).resolve().parent / "data" / "mnist"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# IDX type codes (third byte of the magic number) and the big-endian numpy dtypes they denote.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

# Both datasets share file names and shapes; only MNIST has published checksums.
_SHAPES = {
    "train-images-idx3-ubyte": (60000, 28, 28),
    "train-labels-idx1-ubyte": (60000,),
    "t10k-images-idx3-ubyte": (10000, 28, 28),
    "t10k-labels-idx1-ubyte": (10000,),
}
_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


class DatasetFileError(ValueError):
    """A dataset file is truncated, corrupted, of the wrong kind or fails its checksum."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


class LabelledImages(NamedTuple):
    """Images and their class labels, held in memory: one split of a classification dataset.

    Attributes
    ----------
    images : torch.Tensor
        float32, shape (N, C, H, W), pixel values scaled from 0..255 to [0, 1] (MNIST and
        Fashion-MNIST: (N, 1, 28, 28); CIFAR and SVHN from ``image_data``: (N, 3, 32, 32)).
    labels : torch.Tensor
        int64, shape (N,), class indices 0..classes-1.
    """

    images: torch.Tensor
    labels: torch.Tensor


def read_idx(
    path: str | Path,
    *,
    shape: tuple[int, ...] | None = None,
    sha256: str | None = None,
) -> torch.Tensor:
    """Read an IDX file (gzip-compressed or raw) into a tensor.

    Parameters
    ----------
    path : str or Path
        The file. Gzip compression is recognised by the content, not the name.
    shape : tuple of int, optional
        The shape the file must declare in its header.
    sha256 : str, optional
        Expected SHA-256 hex digest of the *uncompressed* bytes.

    Returns
    -------
    torch.Tensor
        The array with the dtype of the file (uint8 for MNIST) in native byte order.

    Raises
    ------
    FileNotFoundError
        If `path` does not exist.
    DatasetFileError
        If the gzip stream is truncated or corrupted, the magic number is not IDX, the data is
        shorter or longer than the header declares, or the shape or checksum differ from the
        expected ones.
    """
    path = Path(path)
    content = path.read_bytes()
    if content[:2] == _GZIP_MAGIC:
        try:
            content = gzip.decompress(content)
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise DatasetFileError(path, f"corrupted or truncated gzip stream ({error})") from None

    if len(content) < 4 or content[:2] != b"\x00\x00" or content[2] not in _IDX_DTYPES:
        raise DatasetFileError(path, f"not an IDX file (magic number {content[:4].hex() or 'missing'})")
    dtype, n_dims = _IDX_DTYPES[content[2]], content[3]
    header_size = 4 + 4 * n_dims
    if len(content) < header_size:
        raise DatasetFileError(path, f"truncated header: {len(content)} of {header_size} bytes")
    dims = tuple(int(d) for d in np.frombuffer(content, dtype=">u4", count=n_dims, offset=4))
    if shape is not None and dims != tuple(shape):
        raise DatasetFileError(path, f"shape {dims} in the header, expected {tuple(shape)}")

    expected_size = header_size + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(content) < expected_size:
        raise DatasetFileError(path, f"truncated: {len(content)} of {expected_size} bytes")
    if len(content) > expected_size:
        raise DatasetFileError(path, f"{len(content) - expected_size} bytes after the data")
    if sha256 is not None and hashlib.sha256(content).hexdigest() != sha256:
        raise DatasetFileError(path, "SHA-256 of the uncompressed bytes differs from the published one")

    array = np.frombuffer(content, dtype=dtype, offset=header_size).reshape(dims)
    # astype copies into native byte order, which also gives torch a writable buffer.
    return torch.from_numpy(array.astype(dtype.newbyteorder("=")))


def load_mnist(root: str | Path | None = None, *, download: bool = False) -> tuple[LabelledImages, LabelledImages]:
    """Load MNIST's training and test sets, checking every file's SHA-256.

    Parameters
    ----------
    root : str or Path, optional
        Folder with the four IDX files (``.gz`` or uncompressed), directly or in torchvision's
        ``MNIST/raw`` layout. Defaults to the copy vendored in ``data/mnist`` next to this
        module, whatever the working directory.
    download : bool
        If the files are not in `root`, download them into ``root/MNIST/raw`` through
        torchvision. Never happens when a local copy exists.

    Returns
    -------
    (train, test) : tuple of LabelledImages
        60,000 and 10,000 images as float32 (N, 1, 28, 28) in [0, 1], labels as int64 (N,).
    """
    return _load_idx_dataset(VENDORED_MNIST if root is None else root, "MNIST", _MNIST_SHA256, download)


def load_fashion_mnist(
    root: str | Path = DEBIAN_FASHION_MNIST, *, download: bool = False
) -> tuple[LabelledImages, LabelledImages]:
    """Load Fashion-MNIST, the harder drop-in replacement for MNIST (Zalando, MIT license).

    The files are checked for their IDX headers, shapes and sizes; Fashion-MNIST publishes
    checksums only for its own ``.gz`` wrappers, which repackaged copies (Debian's) do not keep.

    Parameters
    ----------
    root : str or Path
        Folder with the four IDX files, directly or in torchvision's ``FashionMNIST/raw``
        layout. Defaults to where Debian's ``dataset-fashion-mnist`` package installs them.
    download : bool
        If the files are not in `root`, download them into ``root/FashionMNIST/raw`` through
        torchvision (`root` must then be writable).

    Returns
    -------
    (train, test) : tuple of LabelledImages
        Same format as :func:`load_mnist`.
    """
    return _load_idx_dataset(root, "FashionMNIST", {}, download)


def _load_idx_dataset(
    root: str | Path, torchvision_name: str, sha256: dict[str, str], download: bool
) -> tuple[LabelledImages, LabelledImages]:
    root = Path(root)
    paths = _find_files(root, torchvision_name)
    if download and len(paths) < len(_SHAPES):
        import torchvision  # only needed here, and slow to import

        getattr(torchvision.datasets, torchvision_name)(root, download=True)
        paths = _find_files(root, torchvision_name)
    missing = sorted(set(_SHAPES) - set(paths))
    if missing:
        hint = "" if download else " (pass download=True to fetch them through torchvision)"
        raise FileNotFoundError(f"{root}: no {', '.join(missing)} (.gz or uncompressed){hint}")

    arrays = {name: read_idx(path, shape=_SHAPES[name], sha256=sha256.get(name)) for name, path in paths.items()}
    return _make_split(arrays, paths, "train"), _make_split(arrays, paths, "t10k")


def _find_files(root: Path, torchvision_name: str) -> dict[str, Path]:
    """Map each IDX file name to where it is, preferring uncompressed files (faster to read)."""
    found = {}
    for name in _SHAPES:
        for folder in (root, root / "raw", root / torchvision_name / "raw"):
            candidates = [folder / name, folder / f"{name}.gz"]
            path = next((p for p in candidates if p.is_file()), None)
            if path is not None:
                found[name] = path
                break
    return found


def _make_split(arrays: dict[str, torch.Tensor], paths: dict[str, Path], prefix: str) -> LabelledImages:
    images_name, labels_name = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    for name in (images_name, labels_name):
        if arrays[name].dtype != torch.uint8:
            raise DatasetFileError(paths[name], f"{arrays[name].dtype} values, expected unsigned bytes")
    images, labels = arrays[images_name], arrays[labels_name]
    if labels.max() > 9:
        raise DatasetFileError(paths[labels_name], f"label {labels.max().item()} outside 0..9")
    return LabelledImages(images.unsqueeze(1).float().div_(255), labels.long())
