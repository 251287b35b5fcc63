"""Data sources (cifar100 / npz / folder), their validation errors, subsets and transforms."""
from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill2deploy.data import (
    DataSource,
    ImageDataset,
    Split,
    eval_transform,
    load_source,
    parse_source,
    preprocess,
    stratified_subset,
    subset_source,
    train_transform,
)
from distill2deploy.errors import UserError

from .conftest import CIFAR10_JPEG, SAMPLE_NPZ

MEAN, STD = [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]


def _images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def _good_arrays(n_classes: int = 3) -> dict:
    return dict(x_train=_images(12), y_train=np.arange(12) % n_classes,
                x_test=_images(6, seed=1), y_test=np.arange(6) % n_classes)


def _raises(source: str, *patterns: str, **kw) -> UserError:
    with pytest.raises(UserError) as ei:
        load_source(source, **kw)
    msg = ei.value.format()
    for p in patterns:
        assert p in msg, f"{p!r} not in:\n{msg}"
    return ei.value


# ------------------------------------------------------------------------------ parse_source
def test_parse_source_schemes():
    assert parse_source("cifar100") == ("cifar100", None)
    assert parse_source("npz:/a/b.npz") == ("npz", "/a/b.npz")
    assert parse_source("folder:data/c10") == ("folder", "data/c10")
    assert parse_source("npz:C:/x.npz") == ("npz", "C:/x.npz")  # only the first ':' separates


@pytest.mark.parametrize("bad,hint", [("npx:a.npz", "'npz'"), ("cifar10", "'cifar100'"), ("foldr:x", "'folder'"),
                                      ("data/x.npz", "'npz:data/x.npz'"), ("npz:", "needs a path"),
                                      ("cifar100:/data", "takes no path"), ("", "empty")])
def test_parse_source_errors_suggest(bad, hint):
    with pytest.raises(UserError) as ei:
        parse_source(bad)
    assert hint in ei.value.format()
    assert ei.value.where == "data.source"


def test_parse_source_bare_directory_suggests_folder(tmp_path):
    with pytest.raises(UserError, match="folder:"):
        parse_source(str(tmp_path))


# ---------------------------------------------------------------------------------- cifar100
@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails like it does on an offline machine."""
    def fail(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", fail)


def test_cifar100_offline_gives_instructions(tmp_path, offline):
    err = _raises("cifar100", "could not be downloaded", "URLError", str(tmp_path),
                  "cifar-100-python", "data.root", "$D2D_DATA", "npz:PATH", "folder:PATH", root=str(tmp_path))
    assert err.fix and "cifar-100-python.tar.gz" in err.fix


def test_cifar100_no_download_and_missing(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("D2D_DATA", str(tmp_path / "from_env"))
    _raises("cifar100", "data.download is false", str(tmp_path / "from_env"), "npz:PATH", download=False)


def _fake_cifar100(root: Path, monkeypatch) -> tuple[np.ndarray, list[str]]:
    """The official pickle layout with 3 classes; checksums patched to match the fake files."""
    from torchvision.datasets import CIFAR100

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = ["apple", "bear", "cloud"]
    rng = np.random.default_rng(0)
    planar = {"train": rng.integers(0, 256, (9, 3072), dtype=np.uint8),
              "test": rng.integers(0, 256, (6, 3072), dtype=np.uint8)}
    for split, data in planar.items():
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": [i % 3 for i in range(len(data))]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names}, f)
    md5 = {n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in ("train", "test", "meta")}
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": md5["meta"]})
    return planar["test"], names


@pytest.mark.parametrize("download", [True, False])
def test_cifar100_from_local_folder(tmp_path, offline, monkeypatch, download):
    planar_test, names = _fake_cifar100(tmp_path, monkeypatch)
    ds = load_source("cifar100", root=str(tmp_path), download=download)
    assert ds.class_names == names and ds.num_classes == 3
    assert ds.train.images.shape == (9, 32, 32, 3) and ds.test.images.shape == (6, 32, 32, 3)
    assert ds.test.images.dtype == np.uint8 and ds.test.labels.dtype == np.int64
    assert ds.test.labels.tolist() == [0, 1, 2, 0, 1, 2]
    # official records are channel-planar R, G, B: pixel (0, 1) of image 2 is bytes 1, 1025, 2049
    np.testing.assert_array_equal(ds.test.images[2, 0, 1], planar_test[2, [1, 1025, 2049]])


@pytest.mark.parametrize("download", [True, False])
def test_cifar100_from_local_tar_gz(tmp_path, offline, monkeypatch, download):
    """The official archive copied under root is extracted without network access."""
    from torchvision.datasets import CIFAR100

    src = tmp_path / "src"
    _fake_cifar100(src, monkeypatch)
    root = tmp_path / "root"
    root.mkdir()
    tgz = root / "cifar-100-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    monkeypatch.setattr(CIFAR100, "tgz_md5", hashlib.md5(tgz.read_bytes()).hexdigest())
    ds = load_source("cifar100", root=str(root), download=download)
    assert len(ds.train) == 9 and len(ds.test) == 6 and ds.class_names == ["apple", "bear", "cloud"]


def test_cifar100_corrupt_files_without_download(tmp_path, offline, monkeypatch):
    _fake_cifar100(tmp_path, monkeypatch)
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"truncated")
    _raises("cifar100", "incomplete or corrupted", root=str(tmp_path), download=False)


# --------------------------------------------------------------------------------------- npz
@pytest.mark.skipif(not SAMPLE_NPZ.is_file(), reason=f"shared sample not found at {SAMPLE_NPZ}")
def test_shared_sample_loads():
    ds = load_source(f"npz:{SAMPLE_NPZ}")
    assert ds.num_classes == 100 and ds.class_names[:2] == ["apple", "aquarium_fish"]
    assert ds.train.images.shape == (486, 32, 32, 3) and ds.test.images.shape == (400, 32, 32, 3)
    assert ds.train.labels.dtype == np.int64 and ds.test.labels.max() < 100


def test_npz_valid_with_names(tmp_path):
    arrays = _good_arrays()
    ds = load_source(_npz(tmp_path / "d.npz", **arrays, fine_label_names=np.array(["a", "b", "c", "d"])))
    assert ds.class_names == ["a", "b", "c", "d"]  # a class with no images still counts
    np.testing.assert_array_equal(ds.train.images, arrays["x_train"])
    np.testing.assert_array_equal(ds.test.labels, arrays["y_test"])


def test_npz_infers_classes_over_all_splits(tmp_path):
    arrays = _good_arrays()
    arrays["y_test"] = np.array([0, 1, 2, 3, 4, 0], dtype=np.uint8)  # class 4 only in test
    ds = load_source(_npz(tmp_path / "d.npz", **arrays))
    assert ds.class_names == [f"class_{i}" for i in range(5)]
    assert ds.test.labels.dtype == np.int64


def test_npz_column_labels_accepted(tmp_path):
    arrays = _good_arrays()
    arrays["y_train"] = arrays["y_train"][:, None]
    assert load_source(_npz(tmp_path / "d.npz", **arrays)).train.labels.shape == (12,)


def test_npz_test_only(tmp_path):
    src = _npz(tmp_path / "t.npz", x_test=_images(4), y_test=np.array([0, 1, 1, 0]),
               fine_label_names=np.array(["cat", "dog"]))
    ds = load_source(src, need_train=False)
    assert ds.train is None and len(ds.test) == 4 and ds.class_names == ["cat", "dog"]
    _raises(src, "no training split (x_train, y_train)", "the file has: x_test", need_train=True)


def test_npz_missing_file_and_directory(tmp_path):
    _raises(f"npz:{tmp_path / 'nope.npz'}", "file not found")
    _raises(f"npz:{tmp_path}", "is a directory", "folder:")


def test_npz_not_an_archive(tmp_path):
    (tmp_path / "x.npz").write_text("hello, I am text")
    _raises(f"npz:{tmp_path / 'x.npz'}", "not a readable .npz")
    np.save(tmp_path / "a.npy", _images(2))
    _raises(f"npz:{tmp_path / 'a.npy'}", "single .npy array")


def test_npz_corrupt_zip(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, **_good_arrays())
    data = good.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    _raises(f"npz:{tmp_path / 'trunc.npz'}", "not a readable .npz", "BadZipFile")
    # a damaged member (central directory intact) must also be a UserError, not a zlib traceback
    buf = io.BytesIO()
    np.savez_compressed(buf, **_good_arrays())
    raw = bytearray(buf.getvalue())
    start = raw.index(b"x_train.npy") + 200
    raw[start:start + 64] = bytes(64)
    (tmp_path / "damaged.npz").write_bytes(bytes(raw))
    _raises(f"npz:{tmp_path / 'damaged.npz'}", "x_train")


def test_npz_missing_keys_lists_present(tmp_path):
    err = _raises(_npz(tmp_path / "d.npz", images=_images(3), labels=np.arange(3)),
                  "missing array(s) x_test, y_test", "the file has: images, labels")
    assert "x_train" in err.fix
    _raises(_npz(tmp_path / "h.npz", x_train=_images(3), x_test=_images(2), y_test=np.arange(2)),
            "has x_train but not y_train")


def test_npz_wrong_dtype(tmp_path):
    arrays = _good_arrays()
    arrays["x_train"] = arrays["x_train"].astype(np.float32) / 255
    err = _raises(_npz(tmp_path / "d.npz", **arrays), "x_train has dtype float32", "uint8")
    assert "* 255" in err.fix


def test_npz_nchw_is_recognised(tmp_path):
    arrays = _good_arrays()
    arrays["x_test"] = arrays["x_test"].transpose(0, 3, 1, 2)
    err = _raises(_npz(tmp_path / "d.npz", **arrays), "x_test", "NCHW")
    assert "transpose(0, 2, 3, 1)" in err.fix


@pytest.mark.parametrize("shape,hint", [((6, 8, 8), "np.repeat"), ((6, 8, 8, 1), "np.repeat"),
                                        ((6, 8, 8, 4), "alpha"), ((6, 192), "reshape")])
def test_npz_wrong_rank_or_channels(tmp_path, shape, hint):
    arrays = _good_arrays()
    arrays["x_test"] = np.zeros(shape, np.uint8)
    err = _raises(_npz(tmp_path / "d.npz", **arrays), "x_test has shape", "(N, H, W, 3)")
    assert hint in err.fix


def test_npz_length_mismatch(tmp_path):
    arrays = _good_arrays()
    arrays["y_train"] = arrays["y_train"][:-2]
    _raises(_npz(tmp_path / "d.npz", **arrays), "x_train has 12 images but y_train has 10 labels")


def test_npz_labels_not_integers(tmp_path):
    arrays = _good_arrays()
    arrays["y_test"] = arrays["y_test"].astype(np.float64)
    err = _raises(_npz(tmp_path / "d.npz", **arrays), "y_test has dtype float64", "integer")
    assert "astype(np.int64)" in err.fix
    arrays["y_test"] = np.eye(3)[np.arange(6) % 3]  # one-hot
    err = _raises(_npz(tmp_path / "d.npz", **arrays), "y_test has shape (6, 3)")
    assert "argmax" in err.fix


def test_npz_negative_labels(tmp_path):
    arrays = _good_arrays()
    arrays["y_train"] = arrays["y_train"] - 1
    _raises(_npz(tmp_path / "d.npz", **arrays), "y_train has negative labels", "= -1")


def test_npz_labels_out_of_range_of_names(tmp_path):
    arrays = _good_arrays()
    arrays["y_test"][0] = 7
    _raises(_npz(tmp_path / "d.npz", **arrays, fine_label_names=np.array(["a", "b", "c"])),
            "labels go up to 7", "only 3 names", "1 in y_test", "mislabelled")


def test_npz_bad_names(tmp_path):
    _raises(_npz(tmp_path / "d.npz", **_good_arrays(), fine_label_names=np.array(["a", "b", "a"])), "repeats 'a'")
    _raises(_npz(tmp_path / "o.npz", **_good_arrays(), fine_label_names=np.array(["a", 1, None], dtype=object)),
            "object array")


# ------------------------------------------------------------------------------------ folder
def _write_tree(root: Path, layout: dict[str, dict[str, int]], size: int = 8, fmt: str = "png") -> None:
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for cls, n in classes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.{fmt}")


def test_folder_tiny_tree(tmp_path):
    data = tmp_path / "ds"
    _write_tree(data, {"train": {"zebra": 2, "ant": 3}, "test": {"ant": 1, "zebra": 2}})
    ds = load_source(f"folder:{data}", root=str(tmp_path / "cache"))
    assert ds.class_names == ["ant", "zebra"]  # sorted folder names give the label order
    assert ds.train.images.shape == (5, 8, 8, 3) and ds.train.images.dtype == np.uint8
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1] and ds.test.labels.tolist() == [0, 1, 1]
    # PNG is lossless: the decoded pixels are exactly the written ones
    np.testing.assert_array_equal(ds.test.images[0], np.asarray(Image.open(data / "test" / "ant" / "0.png")))


def test_folder_val_and_test_only(tmp_path):
    _write_tree(tmp_path / "ds", {"val": {"a": 1, "b": 1}})
    ds = load_source(f"folder:{tmp_path / 'ds'}", need_train=False, root=str(tmp_path / "c"))
    assert ds.train is None and ds.class_names == ["a", "b"]
    _raises(f"folder:{tmp_path / 'ds'}", "no train/ subfolder", root=str(tmp_path / "c"))


def test_folder_cache_hit_and_invalidation(tmp_path):
    data, cache = tmp_path / "ds", tmp_path / "c"
    _write_tree(data, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    first = load_source(f"folder:{data}", root=str(cache))
    files = sorted((cache / "folder-cache").glob("*.npz"))
    assert len(files) == 2
    again = load_source(f"folder:{data}", root=str(cache))
    np.testing.assert_array_equal(first.train.images, again.train.images)
    _write_tree(data, {"train": {"b": 3}})  # adds b/2.png: a different listing -> a new cache entry
    third = load_source(f"folder:{data}", root=str(cache))
    assert len(third.train) == 5 and len(list((cache / "folder-cache").glob("*.npz"))) == 3


def test_folder_errors(tmp_path):
    c = str(tmp_path / "c")
    _raises(f"folder:{tmp_path / 'missing'}", "folder not found")
    np.savez(tmp_path / "x.npz", a=1)
    _raises(f"folder:{tmp_path / 'x.npz'}", "not a directory", "npz:")
    _write_tree(tmp_path / "flat", {"a": {"x": 1}})
    _raises(f"folder:{tmp_path / 'flat'}", "no test/ or val/", "subfolders: a")
    _write_tree(tmp_path / "mis", {"train": {"a": 1, "b": 1, "c": 1}, "test": {"a": 1, "b": 1, "d": 1}})
    _raises(f"folder:{tmp_path / 'mis'}", "differ", "only in train/: c", "only in test/: d", root=c)
    _write_tree(tmp_path / "empty", {"train": {"a": 1}, "test": {"a": 1}})
    (tmp_path / "empty" / "train" / "b").mkdir()
    (tmp_path / "empty" / "test" / "b").mkdir()
    _raises(f"folder:{tmp_path / 'empty'}", "Found no valid file", root=c)


def test_folder_corrupt_image_and_mixed_sizes(tmp_path):
    c = str(tmp_path / "c")
    _write_tree(tmp_path / "bad", {"train": {"a": 1}, "test": {"a": 2}})
    (tmp_path / "bad" / "test" / "a" / "1.png").write_bytes(b"not a png")
    err = _raises(f"folder:{tmp_path / 'bad'}", "cannot be decoded", root=c)
    assert err.where.endswith("1.png")
    _write_tree(tmp_path / "mix", {"train": {"a": 2}, "test": {"a": 1}})
    _write_tree(tmp_path / "mix", {"train": {"b": 1}, "test": {"b": 1}}, size=12)
    _raises(f"folder:{tmp_path / 'mix'}", "2 different sizes", "12x12", root=c)


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10_JPEG.is_file(), reason=f"shared CIFAR-10 JPEGs not found at {CIFAR10_JPEG}")
def test_folder_real_cifar10_jpegs(tmp_path):
    """A few hundred real JPEGs: label order airplane..truck, 32x32 RGB, natural-image statistics."""
    per_class: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR10_JPEG) as tar:
        members = []
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) == 3 and per_class.get(parts[:2], 0) < 15:
                per_class[parts[:2]] = per_class.get(parts[:2], 0) + 1
                members.append(m)
        tar.extractall(tmp_path / "c10", members=members, filter="data")
    ds = load_source(f"folder:{tmp_path / 'c10'}", root=str(tmp_path / "cache"))
    assert ds.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                              "ship", "truck"]
    assert ds.train.images.shape == (150, 32, 32, 3) and ds.test.images.shape == (150, 32, 32, 3)
    assert np.bincount(ds.test.labels).tolist() == [15] * 10
    mean = ds.train.images.reshape(-1, 3).mean(0) / 255
    assert np.all(np.abs(mean - [0.49, 0.48, 0.45]) < 0.08), mean  # full-set mean 0.491/0.482/0.447
    assert ds.train.images.std() > 30  # real images, not blank decodes


# ----------------------------------------------------------------------------------- subsets
def test_stratified_subset_balanced_and_deterministic():
    labels = np.repeat(np.arange(10), 50)
    rng = np.random.default_rng(1)
    labels = labels[rng.permutation(len(labels))]
    idx = stratified_subset(labels, 100, seed=3)
    assert len(idx) == 100 and len(np.unique(idx)) == 100 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx], minlength=10).tolist() == [10] * 10
    np.testing.assert_array_equal(idx, stratified_subset(labels, 100, seed=3))
    assert not np.array_equal(idx, stratified_subset(labels, 100, seed=4))
    counts = np.bincount(labels[stratified_subset(labels, 25, seed=0)], minlength=10)
    assert counts.sum() == 25 and counts.max() - counts.min() == 1  # as equal as possible


def test_stratified_subset_proportional_and_edges():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    idx = stratified_subset(labels, 20, seed=0)
    assert np.bincount(labels[idx]).tolist() == [12, 6, 2]
    np.testing.assert_array_equal(stratified_subset(labels, None, 0), np.arange(100))
    np.testing.assert_array_equal(stratified_subset(labels, 1000, 0), np.arange(100))
    with pytest.raises(UserError, match="positive"):
        stratified_subset(labels, 0, 0)


def test_subset_source_keeps_names_and_missing_train():
    test = Split(_images(30), np.arange(30) % 3)
    ds = DataSource(train=None, test=test, class_names=["a", "b", "c"])
    sub = subset_source(ds, train=10, test=9, seed=0)
    assert sub.train is None and sub.class_names == ["a", "b", "c"] and sub.num_classes == 3
    assert np.bincount(sub.test.labels).tolist() == [3, 3, 3]
    idx = stratified_subset(test.labels, 9, 0)
    np.testing.assert_array_equal(sub.test.images, test.images[idx])
    assert subset_source(ds, None, None, 0).test is test


# -------------------------------------------------------------------------------- transforms
def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)


def test_eval_transform_normalises():
    img = _images(1, size=32)[0]
    out = eval_transform(input_size=32, mean=MEAN, std=STD)(_chw(img))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (img.astype(np.float32) / 255 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    np.testing.assert_allclose(out.numpy(), expected.transpose(2, 0, 1), atol=1e-6)


def test_eval_transform_resizes():
    out = eval_transform(input_size=16, mean=MEAN, std=STD)(_chw(_images(1, size=32)[0]))
    assert out.shape == (3, 16, 16)


def test_train_transform_crop_pad_and_flip():
    img = _images(1, size=32)[0]
    ref = eval_transform(input_size=32, mean=MEAN, std=STD)(_chw(img))
    torch.manual_seed(0)
    plain = train_transform(input_size=32, mean=MEAN, std=STD, crop_padding=0, hflip=False)
    assert torch.equal(plain(_chw(img)), ref)
    flip = train_transform(input_size=32, mean=MEAN, std=STD, crop_padding=0, hflip=True)
    outs = [flip(_chw(img)) for _ in range(20)]
    assert all(torch.equal(o, ref) or torch.equal(o, ref.flip(-1)) for o in outs)
    assert any(torch.equal(o, ref.flip(-1)) for o in outs) and any(torch.equal(o, ref) for o in outs)
    crop = train_transform(input_size=32, mean=MEAN, std=STD, crop_padding=4, hflip=False)
    zero = (-torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1, 1)  # a zero-padded pixel after Normalize
    outs = [crop(_chw(img)) for _ in range(20)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outs)
    assert any(torch.allclose(o[:, :, :1], zero.expand(3, 32, 1)) or torch.allclose(o[:, :1], zero.expand(3, 1, 32))
               for o in outs), "4-pixel zero padding never showed at a border in 20 crops"


def test_image_dataset_items():
    split = Split(_images(4, size=32), np.array([3, 1, 0, 2]))
    ds = ImageDataset(split, eval_transform(input_size=32, mean=MEAN, std=STD))
    x, y = ds[1]
    assert len(ds) == 4 and y == 1 and isinstance(y, int) and x.shape == (3, 32, 32)
    raw, _ = ImageDataset(split, None)[2]
    assert raw.dtype == torch.uint8 and torch.equal(raw, _chw(split.images[2]))


@pytest.mark.parametrize("input_size", [32, 40])
def test_preprocess_matches_eval_transform(input_size):
    imgs = _images(5, size=32, seed=7)
    batch = preprocess(imgs, mean=MEAN, std=STD, input_size=input_size, batch_size=2)
    assert batch.shape == (5, 3, input_size, input_size) and batch.dtype == np.float32
    assert batch.flags["C_CONTIGUOUS"]
    tf = eval_transform(input_size=input_size, mean=MEAN, std=STD)
    single = np.stack([tf(_chw(im)).numpy() for im in imgs])
    np.testing.assert_array_equal(batch, single)


def test_preprocess_rejects_bad_input():
    with pytest.raises(UserError, match="uint8"):
        preprocess(np.zeros((2, 8, 8, 3), np.float32), mean=MEAN, std=STD, input_size=8)
    with pytest.raises(UserError, match=r"\(N, H, W, 3\)"):
        preprocess(np.zeros((2, 3, 8, 8), np.uint8), mean=MEAN, std=STD, input_size=8)


def test_transform_rejects_bad_stats():
    with pytest.raises(ValueError, match="3 values"):
        eval_transform(input_size=32, mean=[0.5], std=STD)
