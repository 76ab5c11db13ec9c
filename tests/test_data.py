"""Datasets: MNIST-1D generation and cache, loaders, validation split, MNIST from idx files."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
import torch

from neuralign.data import (
    DataConfig,
    DatasetNotFoundError,
    TensorLoader,
    build_data,
    cache_dir,
    list_datasets,
    load_mnist1d,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALIGN_CACHE", str(tmp_path / "cache"))


def test_cache_dir_env_override(tmp_path, monkeypatch):
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("NEURALIGN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "neuralign"


def test_mnist1d_generated_once_and_cached(tmp_path):
    state = (np.random.get_state()[1].copy(), random.getstate())
    d = load_mnist1d(300)
    assert d["x"].shape == (240, 40) and d["x_test"].shape == (60, 40)
    assert d["x"].dtype == np.float32 and d["y"].dtype == np.int64
    assert set(np.unique(d["y"])) <= set(range(10))
    # the generator seeds numpy and random globally: the caller's state must survive
    assert np.array_equal(np.random.get_state()[1], state[0]) and random.getstate() == state[1]
    files = list((tmp_path / "cache").glob("mnist1d-300-*.npz"))
    assert len(files) == 1
    # a second call reads the cache: tamper with the file and see it come back
    with np.load(files[0]) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["y"] = np.zeros_like(arrays["y"])
    np.savez(files[0], **arrays)
    assert (load_mnist1d(300)["y"] == 0).all()


def test_mnist1d_bundle():
    b = build_data(DataConfig(name="mnist1d", num_samples=300, batch_size=64, val_split=0.25))
    assert b.info.input_shape == (1, 40) and b.info.num_classes == 10
    assert b.train.dataset_size == 180 and b.val.dataset_size == 60
    assert b.test.dataset_size == 60
    x, y = next(iter(b.train))
    assert x.shape == (64, 1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_val_split_is_disjoint_and_fixed():
    x = torch.arange(100).float()[:, None]
    y = torch.zeros(100, dtype=torch.long)
    from neuralign.data.config import _split

    tr, val = _split(100, 0.2, seed=3)
    assert len(val) == 20 and len(tr) == 80
    assert not set(tr.tolist()) & set(val.tolist())
    tr2, val2 = _split(100, 0.2, seed=3)
    assert torch.equal(val, val2)
    del x, y


def test_tensor_loader_order_depends_on_epoch_only():
    x = torch.arange(50).float()[:, None]
    y = torch.arange(50)
    a = TensorLoader(x, y, 8, shuffle=True, seed=1)
    b = TensorLoader(x, y, 8, shuffle=True, seed=1)

    def order(loader, epoch):
        loader.set_epoch(epoch)
        return torch.cat([yb for _, yb in loader]).tolist()

    assert len(a) == 7
    assert order(a, 3) == order(b, 3)  # same (seed, epoch): same batches
    assert order(a, 3) != order(a, 4)  # next epoch: a new permutation
    assert sorted(order(a, 5)) == list(range(50))  # every example once
    ev = TensorLoader(x, y, 8, shuffle=False)
    assert order(ev, 0) == list(range(50))


def test_synthetic_shape():
    b = build_data(DataConfig(name="synthetic", shape=[3, 8, 8], num_classes=4, num_samples=40,
                              batch_size=16))
    x, y = next(iter(b.train))
    assert x.shape == (16, 3, 8, 8) and int(y.max()) < 4
    assert b.info.input_shape == (3, 8, 8) and b.info.num_classes == 4


def test_unknown_dataset_lists_valid():
    with pytest.raises(ValueError, match="valid: .*mnist1d"):
        build_data(DataConfig(name="mnist2d"))
    assert {"mnist1d", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet",
            "synthetic"} <= set(list_datasets())


def _write_idx(path, array: np.ndarray) -> None:
    """An idx file as LeCun's MNIST files are (big-endian dims, unsigned bytes)."""
    code = 0x08  # unsigned byte
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, code, array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def _write_mnist(raw) -> tuple[dict, dict]:
    """Small MNIST-like idx files (30 train, 10 test images) in ``raw``."""
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (30, 28, 28)), "t10k": rng.integers(0, 256, (10, 28, 28))}
    labels = {"train": np.arange(30) % 10, "t10k": (np.arange(10) * 3) % 10}
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images[split])
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels[split])
    return images, labels


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_from_idx_files(tmp_path, name, folder):
    images, labels = _write_mnist(tmp_path / "data" / folder / "raw")
    b = build_data(DataConfig(name=name, data_dir=str(tmp_path / "data"), batch_size=30,
                              eval_batch_size=10))
    assert b.info.input_shape == (1, 28, 28) and b.info.num_classes == 10
    assert b.train.dataset_size == 30 and b.test.dataset_size == 10
    x, y = next(iter(b.test))  # the test loader keeps the file's order
    assert y.tolist() == labels["t10k"].tolist()
    # the images are the file's bytes, scaled and standardised with one mean and std
    ref = torch.tensor(images["t10k"], dtype=torch.float32) / 255.0
    flat_x, flat_ref = x.flatten(1), ref.flatten(1)
    scale = (flat_x[0, 1] - flat_x[0, 0]) / (flat_ref[0, 1] - flat_ref[0, 0])
    torch.testing.assert_close(flat_x, (flat_ref - flat_ref[0, 0]) * scale + flat_x[0, 0],
                               rtol=1e-4, atol=1e-4)
    xt, yt = next(iter(b.train))
    assert sorted(yt.tolist()) == sorted(labels["train"].tolist())


def test_missing_mnist_names_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        build_data(DataConfig(name="mnist", data_dir=str(tmp_path)))
    msg = str(e.value)
    assert "MNIST/raw/train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "--data-dir" in msg and "--download" in msg
    assert "neuralign fetch mnist --data-dir DIR" in msg  # the project's own way to get it


def test_missing_cifar_and_imagenet_name_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py/data_batch_1"):
        build_data(DataConfig(name="cifar10", data_dir=str(tmp_path)))
    with pytest.raises(DatasetNotFoundError, match=r"train/<class>/<image>\.JPEG"):
        build_data(DataConfig(name="imagenet", data_dir=str(tmp_path)))


def test_imagenet_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            Image.new("RGB", (40, 30), (10, 200, 30)).save(d / "a.JPEG")
    b = build_data(DataConfig(name="imagenet", data_dir=str(tmp_path), batch_size=4,
                              eval_batch_size=4))
    assert b.info.num_classes == 2 and b.info.input_shape == (3, 224, 224)
    x, y = next(iter(b.test))
    assert x.shape == (2, 3, 224, 224) and y.tolist() == [0, 1]


def test_pydoc_next_character_sequences():
    b = build_data(DataConfig(name="pydoc", num_samples=200, batch_size=50))
    assert b.info.input_shape == (64,) and b.info.num_classes == 97
    assert b.info.dtype == torch.int64
    x, y = next(iter(b.train))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (50, 64)
    assert int(x.min()) >= 0 and int(x.max()) < 97
    torch.testing.assert_close(x[:, 1:], y[:, :-1])  # each target is the next character
    assert b.train.dataset_size == 200 and b.test.dataset_size > 700  # the text's last tenth


# -- fetch: the project's way to get MNIST, Fashion-MNIST and CIFAR ----------------------------


def _offline(monkeypatch):
    """torchvision's downloads fail as they do without a network."""
    from urllib.error import URLError

    import torchvision.datasets.cifar
    import torchvision.datasets.mnist

    def no_network(url, *a, **k):
        raise URLError(f"no network for {url}")

    for module in (torchvision.datasets.mnist, torchvision.datasets.cifar):
        monkeypatch.setattr(module, "download_and_extract_archive", no_network)


def test_fetch_keeps_files_already_there(tmp_path, monkeypatch, capsys):
    from neuralign.cli import main
    from neuralign.data import fetch

    _offline(monkeypatch)  # nothing to download: the files are in place
    _write_mnist(tmp_path / "FashionMNIST" / "raw")
    files = fetch("fashion-mnist", tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        f"FashionMNIST/raw/{split}-{kind}" for split, kind in (
            ("train", "images-idx3-ubyte"), ("train", "labels-idx1-ubyte"),
            ("t10k", "images-idx3-ubyte"), ("t10k", "labels-idx1-ubyte"))]
    assert main(["fetch", "fashion-mnist", "--data-dir", str(tmp_path)]) == 0
    assert f"fashion-mnist: 4 files in {tmp_path / 'FashionMNIST' / 'raw'}" in capsys.readouterr().out
    # and training reads them from there
    assert build_data(DataConfig(name="fashion-mnist", data_dir=str(tmp_path))).info.num_classes == 10


@pytest.mark.parametrize("name,expected", [("mnist", "MNIST/raw/t10k-labels-idx1-ubyte"),
                                           ("cifar10", "cifar-10-batches-py/data_batch_1")])
def test_fetch_offline_names_where_the_files_go(tmp_path, monkeypatch, capsys, name, expected):
    from neuralign.cli import main
    from neuralign.data import fetch

    _offline(monkeypatch)
    with pytest.raises(DatasetNotFoundError) as e:
        fetch(name, tmp_path)
    assert "download" in str(e.value) and str(tmp_path / expected) in str(e.value)
    assert main(["fetch", name, "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and expected in err


def test_fetch_refuses_what_is_not_downloaded(tmp_path):
    from neuralign.data import fetch

    with pytest.raises(ValueError, match="made locally"):
        fetch("mnist1d", tmp_path)
    with pytest.raises(ValueError, match="never downloaded"):
        fetch("imagenet", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*mnist, fashion-mnist"):
        fetch("nope", tmp_path)
