"""The ``cifar100`` and ``npz:`` readers behind :func:`distill2deploy.data.load_source` (``folder:``: :mod:`._folder`).

Each reader turns its source into in-memory uint8 NHWC arrays and validates them on the way in:
a wrong dtype, an NCHW array or a mislabelled file caught here is a one-line :class:`UserError`
instead of a shape error deep inside a training loop (or, worse, a model trained on garbage).
"""
from __future__ import annotations

import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import numpy as np

from .errors import UserError

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
NPZ_TRAIN_KEYS = ("x_train", "y_train")
NPZ_TEST_KEYS = ("x_test", "y_test")
NPZ_NAMES_KEY = "fine_label_names"


@dataclass
class Split:
    """One split in memory (what every reader returns; :mod:`distill2deploy.data` builds on it)."""

    images: np.ndarray  # uint8 NHWC
    labels: np.ndarray  # int64 (N,)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


# ----------------------------------------------------------------------------------- cifar100
def load_cifar100(root: Path, *, download: bool, need_train: bool) -> tuple[Split | None, Split, list[str]]:
    """torchvision's CIFAR-100, with its download failures turned into instructions.

    ``need_train`` is accepted for symmetry only: the official files always hold both splits.
    """
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import check_integrity, extract_archive

    root = _cifar_root(root, CIFAR100.base_folder)
    tgz = root / CIFAR100.filename
    folder = root / CIFAR100.base_folder
    files_ok = all(check_integrity(str(folder / name), md5)
                   for name, md5 in CIFAR100.train_list + CIFAR100.test_list)
    if not files_ok and not download and tgz.is_file():
        # torchvision only extracts a local archive as part of download(); do it here so a user
        # who copied the official tar.gz over by hand need not also allow downloads.
        if not check_integrity(str(tgz), CIFAR100.tgz_md5):
            raise UserError(f"{tgz} is not the official CIFAR-100 archive (md5 mismatch: truncated or corrupted)",
                            where="data.source 'cifar100'",
                            fix=f"copy it again from {CIFAR100_URL}, or delete it and allow data.download")
        extract_archive(str(tgz), str(root))
    try:
        test = CIFAR100(str(root), train=False, download=download)
        train = CIFAR100(str(root), train=True, download=False)
    except (URLError, OSError, RuntimeError) as e:
        raise _cifar_unavailable(root, download, e) from None
    names = list(test.classes)
    return (Split(np.ascontiguousarray(train.data), np.asarray(train.targets, dtype=np.int64)),
            Split(np.ascontiguousarray(test.data), np.asarray(test.targets, dtype=np.int64)), names)


def _cifar_root(root: Path, base_folder: str) -> Path:
    """Accept the directory *holding* ``cifar-100-python`` and also the folder or archive itself."""
    if root.name == base_folder or root.name.endswith(".tar.gz"):
        return root.parent
    return root


def _cifar_unavailable(root: Path, download: bool, err: Exception) -> UserError:
    fix = (f"on a machine with internet, download {CIFAR100_URL} and put the tar.gz (or its extracted "
           f"'cifar-100-python' folder) under {root} (choose that directory with data.root or $D2D_DATA); "
           "or use local files with data.source 'npz:PATH' (x_train, y_train, x_test, y_test arrays) "
           "or 'folder:PATH' (ImageFolder with train/ and test/)")
    if download:
        what = f"CIFAR-100 is not under {root} and could not be downloaded ({type(err).__name__}: {err})"
    elif (root / "cifar-100-python").is_dir():
        what = (f"CIFAR-100 files under {root / 'cifar-100-python'} are incomplete or corrupted "
                "(expected train, test and meta with the official checksums) and data.download is false")
    else:
        what = f"CIFAR-100 is not under {root} and data.download is false"
    return UserError(what, where="data.source 'cifar100'", fix=fix)


# ---------------------------------------------------------------------------------------- npz
def load_npz(path: Path, *, need_train: bool, num_classes: int | None = None,
             num_classes_key: str = "data.num_classes") -> tuple[Split | None, Split, list[str] | None]:
    """Arrays ``x_train, y_train, x_test, y_test`` (+ optional ``fine_label_names``) from one file.

    The class count is the number of names; without names it is ``num_classes`` when given (labels
    must lie below it), else one more than the largest label -- refused when some class index below
    that has no image in any split, the sign of a stray label (one label 150 in a 100-class file
    would otherwise make a 151-class model). Names are ``None`` when the file has none.
    """
    where = str(path)
    if not path.exists():
        raise UserError("file not found", where=where,
                        fix="check the path after 'npz:' (relative paths are resolved from the current directory)")
    if path.is_dir():
        raise UserError("is a directory, not an .npz file", where=where,
                        fix=f"for a tree of image files use 'folder:{path}'")
    # np.load leaks its file handle when the zip cannot be parsed, so the file is opened here.
    with open(path, "rb") as fh:
        try:
            f = np.load(fh, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"not a readable .npz archive ({type(e).__name__}: {e})", where=where,
                            fix="write it with numpy.savez / savez_compressed(path, x_train=..., y_train=..., "
                                "x_test=..., y_test=...)") from None
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise UserError("is a single .npy array, not an .npz archive of named arrays", where=where,
                            fix="write it with numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
        with f:
            arrays, names_arr, has_train = _read_npz(f, where, need_train)

    splits: dict[str, Split] = {}
    for split in ("train", "test") if has_train else ("test",):
        x = _check_images(arrays[f"x_{split}"], f"x_{split}", where)
        y = _check_labels(arrays[f"y_{split}"], len(x), f"y_{split}", f"x_{split}", where)
        splits[split] = Split(x, y)

    names = _check_names(names_arr, where) if names_arr is not None else None
    count = len(names) if names is not None else num_classes
    if count is not None:
        _check_label_range(splits, count, where, NPZ_NAMES_KEY if names is not None else num_classes_key)
    else:
        _check_no_gaps(splits, where, num_classes_key)
    return splits.get("train"), splits["test"], names


def _check_label_range(splits: dict[str, Split], count: int, where: str, source: str) -> None:
    top = max(int(s.labels.max()) for s in splits.values())
    if top >= count:
        bad = {k: int((s.labels >= count).sum()) for k, s in splits.items()}
        detail = ", ".join(f"{n} in y_{k}" for k, n in bad.items() if n)
        said = f"{source} has only {count} names" if source == NPZ_NAMES_KEY else f"{source} is {count}"
        raise UserError(f"labels go up to {top} but {said} ({detail} out of range 0..{count - 1}): the file is "
                        "mislabelled", where=where,
                        fix=f"fix those labels, or give the real class count ({source})")


def _check_no_gaps(splits: dict[str, Split], where: str, num_classes_key: str) -> None:
    """Without names the class count comes from the largest label; every index below it must occur."""
    labels = np.concatenate([s.labels for s in splits.values()])
    counts = np.bincount(labels)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        top = len(counts) - 1
        raise UserError(f"has no {NPZ_NAMES_KEY}, and its labels skip {len(empty)} of the class indices 0..{top} "
                        f"(e.g. {', '.join(map(str, empty[:5].tolist()))} have no image; label {top} occurs "
                        f"{counts[top]} time(s)): inferring {top + 1} classes from the largest label would be a guess",
                        where=where, fix=f"store {NPZ_NAMES_KEY} (their number fixes the class count) or set "
                                         f"{num_classes_key}, and fix any stray labels")


def _read_npz(f: np.lib.npyio.NpzFile, where: str, need_train: bool
              ) -> tuple[dict[str, np.ndarray], np.ndarray | None, bool]:
    """Check which arrays are present (a missing one is an error that lists the others) and read them."""
    present = list(f.files)
    missing = [k for k in NPZ_TEST_KEYS if k not in present]
    if missing:
        raise UserError(f"missing array(s) {', '.join(missing)}; the file has: {', '.join(present) or 'nothing'}",
                        where=where, fix="name the arrays x_train, y_train, x_test, y_test (uint8 NHWC images, "
                                         "integer labels) and optionally fine_label_names")
    has_train = [k in present for k in NPZ_TRAIN_KEYS]
    if any(has_train) and not all(has_train):
        have, lack = (("x_train", "y_train") if has_train[0] else ("y_train", "x_train"))
        raise UserError(f"has {have} but not {lack}; the file has: {', '.join(present)}", where=where,
                        fix="store both training arrays or neither")
    if not any(has_train) and need_train:
        raise UserError(f"has no training split (x_train, y_train); the file has: {', '.join(present)}",
                        where=where, fix="add x_train and y_train; files with only the test split work for "
                                         "stages that only evaluate (e.g. validate)")
    keys = [*(NPZ_TRAIN_KEYS if all(has_train) else ()), *NPZ_TEST_KEYS]
    arrays = {k: _read_member(f, k, where) for k in keys}
    names_arr = _read_member(f, NPZ_NAMES_KEY, where) if NPZ_NAMES_KEY in present else None
    return arrays, names_arr, all(has_train)


def _read_member(f: np.lib.npyio.NpzFile, key: str, where: str) -> np.ndarray:
    try:
        return f[key]
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UserError(f"array {key} is an object array (needs pickle, which is not loaded for safety)",
                            where=where, fix=f"store {key} with a plain dtype, e.g. np.asarray(..., dtype=str) "
                                             "for names or np.uint8 for images") from None
        raise UserError(f"array {key} cannot be read ({e})", where=where, fix="re-create the file") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise UserError(f"array {key} is corrupted ({type(e).__name__}: {e})", where=where,
                        fix="re-create or re-copy the file") from None


def _check_images(x: np.ndarray, key: str, where: str) -> np.ndarray:
    if x.ndim == 4 and x.shape[-1] != 3 and x.shape[1] == 3:
        raise UserError(f"{key} has shape {x.shape}, which looks like NCHW (channels first); images must be NHWC",
                        where=where, fix=f"store {key}.transpose(0, 2, 3, 1)")
    if x.ndim != 4 or x.shape[-1] != 3:
        hint = {2: f"if rows are official CIFAR 3072-byte records use "
                   f"{key}.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)",
                3: f"for grey images (N, H, W) use np.repeat({key}[..., None], 3, axis=-1)"}.get(x.ndim, "")
        if x.ndim == 4 and x.shape[-1] == 1:
            hint = f"for grey images use np.repeat({key}, 3, axis=-1)"
        elif x.ndim == 4 and x.shape[-1] == 4:
            hint = f"drop the alpha channel: {key}[..., :3]"
        raise UserError(f"{key} has shape {x.shape}; expected (N, H, W, 3) uint8 RGB images", where=where,
                        fix=hint or f"store {key} as an (N, H, W, 3) array")
    if x.dtype != np.uint8:
        fix = f"store {key}.astype(np.uint8)"
        if x.dtype.kind == "f":
            fix = (f"if the values are in [0, 1] store np.round({key} * 255).astype(np.uint8); "
                   f"if in 0..255, {key}.astype(np.uint8)")
        raise UserError(f"{key} has dtype {x.dtype}; images must be uint8 (0..255)", where=where, fix=fix)
    if len(x) == 0:
        raise UserError(f"{key} holds no images", where=where, fix="store at least one image per split")
    return np.ascontiguousarray(x)


def _check_labels(y: np.ndarray, n: int, key: str, xkey: str, where: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        fix = f"one-hot labels: store {key}.argmax(1)" if y.ndim == 2 else f"store {key} as a 1-D array"
        raise UserError(f"{key} has shape {y.shape}; expected (N,) class indices", where=where, fix=fix)
    if y.dtype.kind not in "iu":
        integral = y.dtype.kind == "f" and bool(np.all(np.isfinite(y))) and bool(np.all(y == np.round(y)))
        raise UserError(f"{key} has dtype {y.dtype}; labels must be integer class indices", where=where,
                        fix=f"store {key}.astype(np.int64)" if integral else f"store integer class indices in {key}")
    if len(y) != n:
        raise UserError(f"{xkey} has {n} images but {key} has {len(y)} labels", where=where,
                        fix="store exactly one label per image")
    if y.min() < 0:
        i = int(np.argmin(y))
        raise UserError(f"{key} has negative labels (e.g. {key}[{i}] = {int(y[i])})", where=where,
                        fix="labels are class indices 0..num_classes-1")
    return y.astype(np.int64)


def _check_names(names: np.ndarray, where: str) -> list[str]:
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise UserError(f"{NPZ_NAMES_KEY} must be a 1-D array of strings, got dtype {names.dtype} shape {names.shape}",
                        where=where, fix=f"store {NPZ_NAMES_KEY}=np.asarray(names, dtype=str)")
    out = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    dupes = sorted(n for n, c in Counter(out).items() if c > 1)
    if dupes:
        raise UserError(f"{NPZ_NAMES_KEY} repeats {', '.join(map(repr, dupes[:5]))}", where=where,
                        fix="class names must be unique")
    return out
