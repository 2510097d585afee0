"""IDX reading and the MNIST / Fashion-MNIST loaders."""

import gzip
import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import mnist
import utils

VENDORED = Path(utils.__file__).parent / "data" / "mnist"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path, array, type_code=0x08, compress=False):
    """Write `array` as IDX by hand (big-endian dims, then the data), independent of read_idx."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    content = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(content) if compress else content)
    return content


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "dtype, type_code", [(np.uint8, 0x08), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D)]
)
def test_idx_round_trip(tmp_path, compress, dtype, type_code):
    signed = dtype != np.uint8  # negative values check the sign, large ones the byte order
    array = ((np.arange(24) - 12 * signed) * (1000 if signed else 1)).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / "tiny-idx3"
    content = write_idx(path, array, type_code, compress)
    tensor = utils.read_idx(path, shape=(2, 3, 4), sha256=hashlib.sha256(content).hexdigest())
    np.testing.assert_array_equal(tensor.numpy(), array)
    assert tensor.numpy().dtype == np.dtype(dtype)


def test_idx_truncated(tmp_path):
    path = tmp_path / "labels-idx1"
    content = write_idx(path, np.arange(100, dtype=np.uint8))
    path.write_bytes(content[:-10])
    with pytest.raises(utils.DatasetFileError, match=r"labels-idx1: truncated: 98 of 108 bytes"):
        utils.read_idx(path)


def test_idx_trailing_bytes(tmp_path):
    path = tmp_path / "labels-idx1"
    path.write_bytes(write_idx(path, np.arange(10, dtype=np.uint8)) + b"junk")
    with pytest.raises(utils.DatasetFileError, match="4 bytes after the data"):
        utils.read_idx(path)


def test_idx_truncated_gzip(tmp_path):
    path = tmp_path / "images-idx3.gz"
    write_idx(path, np.zeros((5, 28, 28), dtype=np.uint8), compress=True)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(utils.DatasetFileError, match=r"images-idx3.gz: corrupted or truncated gzip"):
        utils.read_idx(path)


def test_idx_corrupted_gzip(tmp_path):
    path = tmp_path / "images-idx3.gz"
    write_idx(path, np.arange(5 * 28 * 28).astype(np.uint8).reshape(5, 28, 28), compress=True)
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))
    with pytest.raises(utils.DatasetFileError, match=r"images-idx3.gz: corrupted or truncated gzip"):
        utils.read_idx(path)


def test_idx_wrong_magic(tmp_path):
    path = tmp_path / "not-idx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(utils.DatasetFileError, match=r"not-idx: not an IDX file \(magic number 89504e47\)"):
        utils.read_idx(path)


def test_idx_wrong_shape_and_checksum(tmp_path):
    path = tmp_path / "labels-idx1"
    write_idx(path, np.arange(10, dtype=np.uint8))
    with pytest.raises(utils.DatasetFileError, match=r"shape \(10,\) in the header, expected \(60000,\)"):
        utils.read_idx(path, shape=(60000,))
    with pytest.raises(utils.DatasetFileError, match="labels-idx1: SHA-256"):
        utils.read_idx(path, sha256="0" * 64)


def test_vendored_mnist_matches_the_published_facts(mnist):
    train, test = mnist
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.images.min() == 0 and train.images.max() == 1
    assert train.labels.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert test.labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def make_torchvision_layout(root, corrupt=None):
    """Copy the vendored files, uncompressed, into torchvision's ``MNIST/raw`` layout."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in VENDORED.glob("*.gz"):
        content = gzip.decompress(gz.read_bytes())
        if gz.stem == corrupt:
            content = content[:1000] + bytes([content[1000] ^ 1]) + content[1001:]
        (raw / gz.stem).write_bytes(content)
    return raw


def test_reads_torchvision_layout_uncompressed(tmp_path, mnist):
    make_torchvision_layout(tmp_path)
    train, test = utils.load_mnist(tmp_path)
    assert torch.equal(train.images, mnist[0].images) and torch.equal(test.labels, mnist[1].labels)


def test_one_flipped_bit_fails_the_checksum(tmp_path):
    make_torchvision_layout(tmp_path, corrupt="t10k-images-idx3-ubyte")
    with pytest.raises(utils.DatasetFileError, match="t10k-images-idx3-ubyte: SHA-256"):
        utils.load_mnist(tmp_path)


def test_missing_file_is_named_and_partial_data_refused(tmp_path):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        shutil.copy(VENDORED / name, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no t10k-labels-idx1-ubyte .*download=True"):
        utils.load_mnist(tmp_path)


class FakeTorchvisionMNIST:
    """Stands in for torchvision.datasets.MNIST's download: writes the files, counts calls."""

    calls = 0

    def __init__(self, root, download):
        type(self).calls += 1
        make_torchvision_layout(Path(root))


def test_downloads_only_when_asked_and_missing(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeTorchvisionMNIST)
    with pytest.raises(FileNotFoundError):
        utils.load_mnist(tmp_path)
    assert FakeTorchvisionMNIST.calls == 0
    train, _ = utils.load_mnist(tmp_path, download=True)
    assert FakeTorchvisionMNIST.calls == 1 and len(train.labels) == 60000
    utils.load_mnist(tmp_path, download=True)  # now local: no second download
    assert FakeTorchvisionMNIST.calls == 1


def test_default_root_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mnist.VENDORED_MNIST == VENDORED.resolve()
    train, _ = utils.load_mnist()
    assert len(train.labels) == 60000


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"{FASHION} absent: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_the_debian_package():
    train, test = utils.load_fashion_mnist()
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert 0 <= train.images.min() and train.images.max() <= 1
    # Fashion-MNIST is balanced: 6,000 and 1,000 images per class.
    assert train.labels.bincount().tolist() == [6000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
