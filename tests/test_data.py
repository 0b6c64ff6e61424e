import gzip
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import write_image_folder
from vit_mqa.data import datasets as data_module
from vit_mqa.data.datasets import (
    DATASETS,
    DataConfig,
    load_data,
    load_idx_dataset,
    locate_idx_dataset,
    parse_idx,
    read_image,
)
from vit_mqa.errors import VitMqaError

MNIST = DATASETS["mnist"]
STEMS = list(MNIST.files.values())


def test_mnist_loads_verified_with_fixed_split(data_root):
    data = load_data(DataConfig(dataset="mnist", data_dir=str(data_root)))
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape == (55000, 1, 28, 28)
    assert len(data.val) == 5000 and len(data.test) == 10000
    assert data.classes == [str(i) for i in range(10)]
    # Every class occurs in the validation split; labels in range.
    assert torch.bincount(data.val.labels, minlength=10).min() > 300
    again = load_data(DataConfig(dataset="mnist", data_dir=str(data_root), val_size=5000))
    assert torch.equal(again.val.labels, data.val.labels)
    assert torch.equal(again.val.images, data.val.images)
    # The split is disjoint from training: no validation image occurs in the training set.
    train_rows = {bytes(r) for r in data.train.images.flatten(1).numpy()[:20000]}
    assert not any(bytes(r) in train_rows for r in data.val.images.flatten(1).numpy()[:200])


def _system_datasets_with_fashion(data_root: Path, root: Path) -> Path:
    """A stand-in for /usr/share/datasets holding Fashion-MNIST, as Debian's
    dataset-fashion-mnist lays it out (links to the data root's verified files)."""
    (root / "fashion-mnist").mkdir(parents=True)
    for stem in DATASETS["fashion-mnist"].files.values():
        (root / "fashion-mnist" / f"{stem}.gz").symlink_to(
            data_root / "fashion-mnist" / f"{stem}.gz")
    return root


def test_fashion_mnist_loads_from_the_data_root(data_root):
    data = load_data(DataConfig(dataset="fashion-mnist", data_dir=str(data_root),
                                download=False))
    assert data.source == str(data_root / "fashion-mnist")
    assert len(data.train) == 55000 and len(data.test) == 10000
    assert data.classes[9] == "Ankle boot"


def test_fashion_mnist_loads_from_system_datasets(data_root, tmp_path, monkeypatch):
    system = _system_datasets_with_fashion(data_root, tmp_path / "datasets")
    monkeypatch.setattr(data_module, "SYSTEM_DATASETS", system)
    monkeypatch.delenv("VIT_MQA_DATA", raising=False)
    data = load_data(DataConfig(dataset="fashion-mnist", download=False))
    assert data.source == str(system / "fashion-mnist")
    assert torch.bincount(data.test.labels, minlength=10).tolist() == [1000] * 10


def _copy_mnist(src_root: Path, dst: Path, raw: bool = False) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for stem in STEMS:
        if raw:
            with gzip.open(src_root / "mnist" / f"{stem}.gz", "rb") as f:
                (dst / stem).write_bytes(f.read())
        else:
            shutil.copy(src_root / "mnist" / f"{stem}.gz", dst / f"{stem}.gz")
    return dst


def test_raw_uncompressed_files_are_accepted(data_root, tmp_path):
    _copy_mnist(data_root, tmp_path / "mnist", raw=True)
    arrays, directory = load_idx_dataset(MNIST, str(tmp_path), download=False)
    assert directory == tmp_path / "mnist"
    assert arrays["train-images"].shape == (60000, 28, 28)


def test_lookup_order_data_dir_then_env(data_root, tmp_path, monkeypatch):
    other = _copy_mnist(data_root, tmp_path / "other" / "mnist")
    monkeypatch.setenv("VIT_MQA_DATA", str(tmp_path / "other"))
    assert locate_idx_dataset(MNIST, str(data_root)) == data_root / "mnist"
    assert locate_idx_dataset(MNIST, None) == other
    assert locate_idx_dataset(MNIST, str(tmp_path / "empty")) == other


def test_wrong_checksum_is_a_clear_error(data_root, tmp_path):
    d = _copy_mnist(data_root, tmp_path / "mnist", raw=True)
    raw = bytearray((d / "t10k-labels-idx1-ubyte").read_bytes())
    raw[100] = (raw[100] + 1) % 10  # still a valid IDX file, but not MNIST's
    (d / "t10k-labels-idx1-ubyte").write_bytes(bytes(raw))
    with pytest.raises(VitMqaError, match="checksum mismatch for .*t10k-labels-idx1-ubyte"):
        load_idx_dataset(MNIST, str(tmp_path), download=False)


def test_corrupt_gzip_is_a_clear_error(data_root, tmp_path):
    d = _copy_mnist(data_root, tmp_path / "mnist")
    blob = (d / "t10k-images-idx3-ubyte.gz").read_bytes()
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(VitMqaError, match="corrupt or truncated"):
        load_idx_dataset(MNIST, str(tmp_path), download=False)


def test_parse_idx_rejects_bad_files():
    good = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    assert parse_idx(good, "x").tolist() == [1, 2, 3]
    with pytest.raises(VitMqaError, match="bad magic"):
        parse_idx(b"\x1f\x8b\x08\x00", "x")
    with pytest.raises(VitMqaError, match="holds 2 bytes"):
        parse_idx(good[:-1], "x")


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on loopback serving a folder."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_missing_dataset_is_downloaded_verified_into_the_cache(data_root, http_server,
                                                              tmp_path, monkeypatch):
    www, url = http_server
    _copy_mnist(data_root, www)
    monkeypatch.delenv("VIT_MQA_DATA", raising=False)
    monkeypatch.setenv("VIT_MQA_MIRRORS", f"http://127.0.0.1:9/ {url}")  # first one refuses
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    arrays, directory = load_idx_dataset(MNIST, str(tmp_path / "nowhere"))
    assert directory == tmp_path / "cache" / "vit-mqa" / "mnist"
    assert sorted(p.name for p in directory.iterdir()) == sorted(s + ".gz" for s in STEMS)
    assert arrays["test-labels"].shape == (10000,)


def test_download_with_wrong_checksum_leaves_nothing(data_root, http_server, tmp_path,
                                                    monkeypatch):
    www, url = http_server
    _copy_mnist(data_root, www)
    with gzip.open(www / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x01" + (1).to_bytes(4, "big") + b"\x07")
    monkeypatch.delenv("VIT_MQA_DATA", raising=False)
    monkeypatch.setenv("VIT_MQA_MIRRORS", url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(VitMqaError, match="checksum mismatch"):
        load_idx_dataset(MNIST, str(tmp_path / "nowhere"))
    left = sorted(p.name for p in (tmp_path / "cache" / "vit-mqa" / "mnist").iterdir())
    assert "t10k-labels-idx1-ubyte.gz" not in left
    assert not [n for n in left if n.endswith(".part")]


def test_offline_error_says_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.delenv("VIT_MQA_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(VitMqaError) as info:
        load_idx_dataset(MNIST, str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "cache" / "vit-mqa" / "mnist") in message
    assert "train-images-idx3-ubyte.gz" in message and "set `data_dir`" in message


def test_image_folder_with_holdout_splits(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=15, size=(20, 24))
    data = load_data(DataConfig(dataset=str(root), val_size=4))
    assert data.classes == ["left", "right"]
    assert len(data.train) == 22 and len(data.val) == 4 and len(data.test) == 4
    assert data.preprocess.image_size == (20, 24) and data.preprocess.in_channels == 1
    assert data.train.images.dtype == torch.uint8


def test_validation_size_default_fraction_and_count(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=60, size=(12, 12))
    default = load_data(DataConfig(dataset=str(root)))  # 10 %: 12 test, then 11 validation
    assert (len(default.train), len(default.val), len(default.test)) == (97, 11, 12)
    fraction = load_data(DataConfig(dataset=str(root), val_size=0.25))
    assert (len(fraction.train), len(fraction.val), len(fraction.test)) == (68, 22, 30)
    assert DataConfig().val_count(60_000) == 5000  # MNIST keeps its 5,000 images
    for bad in (0, -1, 2.5, 1.0000001):
        with pytest.raises(VitMqaError, match="val_size must be a count of images"):
            DataConfig(dataset=str(root), val_size=bad).validate()
    gray = load_data(DataConfig(dataset=str(write_image_folder(tmp_path / "rgb", per_class=10,
                                                               mode="RGB")), in_channels=1))
    assert gray.preprocess.in_channels == 1 and gray.train.images.shape[1] == 1
    with pytest.raises(VitMqaError, match="mnist images have one channel"):
        load_data(DataConfig(dataset="mnist", in_channels=3))


def test_image_folder_with_train_and_test_dirs_resized_rgb(tmp_path):
    write_image_folder(tmp_path / "ds" / "train", per_class=10, mode="RGB", seed=1)
    write_image_folder(tmp_path / "ds" / "test", per_class=3, mode="RGB", seed=2)
    data = load_data(DataConfig(dataset=str(tmp_path / "ds"), val_size=4, image_size=16))
    assert data.train.images.shape == (16, 3, 16, 16)
    assert len(data.test) == 6 and data.preprocess.in_channels == 3


def test_bad_folder_inputs(tmp_path):
    with pytest.raises(VitMqaError, match="unknown dataset 'cifar-11'"):
        load_data(DataConfig(dataset="cifar-11"))
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    with pytest.raises(VitMqaError, match="of 5 images does not fit a training set of 8 "
                                          "images; pass a smaller `val_size`"):
        load_data(DataConfig(dataset=str(root), val_size=5))
    (root / "left" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(VitMqaError, match="cannot read image .*broken.png"):
        load_data(DataConfig(dataset=str(root), val_size=2))


def test_read_image_any_mode_and_size(tmp_path):
    from PIL import Image

    rgba = np.zeros((50, 40, 4), dtype=np.uint8)
    rgba[10:40, 10:30] = (255, 255, 255, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = read_image(tmp_path / "a.png", (28, 28), 1)
    assert x.shape == (1, 28, 28) and x.dtype == torch.uint8
    assert x[0, 0, 0] == 0 and x[0, 14, 14] == 255  # transparent -> black background
    Image.fromarray(rgba[..., :3]).save(tmp_path / "b.jpg")
    assert read_image(tmp_path / "b.jpg", (32, 32), 3).shape == (3, 32, 32)


def test_lookup_passes_over_a_copy_of_another_dataset(data_root, tmp_path, monkeypatch):
    """MNIST and Fashion-MNIST share file names: a folder of one is no copy of the other."""
    system = _system_datasets_with_fashion(data_root, tmp_path / "datasets")
    monkeypatch.setattr(data_module, "SYSTEM_DATASETS", system)
    monkeypatch.delenv("VIT_MQA_DATA", raising=False)
    arrays, directory = load_idx_dataset(DATASETS["fashion-mnist"], str(data_root / "mnist"),
                                         download=False)
    assert directory == system / "fashion-mnist"


def test_channel_stats_are_summed_in_chunks_and_match_torch():
    import torch

    from vit_mqa.data.datasets import channel_stats

    x = torch.randint(0, 256, (1001, 3, 6, 5), dtype=torch.uint8)
    mean, std = channel_stats(x, chunk=97)  # chunks that do not divide the count
    p = x.float() / 255
    assert mean == pytest.approx(p.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert std == pytest.approx(p.std(dim=(0, 2, 3)).tolist(), abs=1e-6)
    flat = torch.full((10, 1, 4, 4), 200, dtype=torch.uint8)
    assert channel_stats(flat) == ((pytest.approx(200 / 255),), (1e-3,))
