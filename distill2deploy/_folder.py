"""The ``folder:`` reader behind :func:`distill2deploy.data.load_source`: an ImageFolder tree.

Decoded once into uint8 NHWC arrays and cached (keyed by every file's path, size and mtime), so
later runs load a folder as fast as an npz; validated on the way in like the other readers
(:mod:`distill2deploy._datasets`).
"""
from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from ._datasets import Split
from ._io import atomic_path, obj_sha256
from .errors import UserError

_FOLDER_CACHE_VERSION = 1
_PROGRESS_MIN_IMAGES = 2000  # below this a progress bar is just noise


def load_folder(path: Path, *, need_train: bool, cache_dir: Path | None) -> tuple[Split | None, Split, list[str]]:
    """An ImageFolder tree (``train/`` and ``test/`` or ``val/``), decoded once into memory."""
    where = str(path)
    if not path.exists():
        raise UserError("folder not found", where=where,
                        fix="check the path after 'folder:' (relative paths are resolved from the current directory)")
    if not path.is_dir():
        fix = f"for an .npz file use 'npz:{path}'" if path.suffix == ".npz" else "point 'folder:' at a directory"
        if path.name.endswith((".tar.gz", ".tgz", ".tar", ".zip")):
            fix = "extract the archive and point 'folder:' at the extracted directory"
        raise UserError("is not a directory", where=where, fix=fix)
    layout = f"lay it out as {path}/train/<class>/<image> and {path}/test/<class>/<image> (or val/ instead of test/)"
    test_dir = next((path / d for d in ("test", "val") if (path / d).is_dir()), None)
    train_dir = path / "train" if (path / "train").is_dir() else None
    if test_dir is None:
        subdirs = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise UserError(f"has no test/ or val/ subfolder (subfolders: {', '.join(subdirs) or 'none'})",
                        where=where, fix=layout)
    if train_dir is None and need_train:
        raise UserError("has no train/ subfolder, and this stage trains", where=where, fix=layout)

    test_classes = _find_classes(test_dir, layout)
    if train_dir is not None:
        train_classes = _find_classes(train_dir, layout)
        if train_classes != test_classes:
            only_train = sorted(set(train_classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(train_classes))
            raise UserError(f"class folders of train/ and {test_dir.name}/ differ (only in train/: "
                            f"{', '.join(only_train) or '-'}; only in {test_dir.name}/: {', '.join(only_test) or '-'})",
                            where=where, fix="both splits need the same class folders (that fixes the label order)")
    class_to_idx = {c: i for i, c in enumerate(test_classes)}
    test = _load_image_split(test_dir, class_to_idx, layout, cache_dir)
    train = _load_image_split(train_dir, class_to_idx, layout, cache_dir) if train_dir is not None else None
    return train, test, test_classes


def _find_classes(split_dir: Path, layout: str) -> list[str]:
    from torchvision.datasets.folder import find_classes

    try:
        classes, _ = find_classes(str(split_dir))
    except FileNotFoundError:
        raise UserError("has no class subfolders", where=str(split_dir), fix=layout) from None
    return classes


def _load_image_split(split_dir: Path, class_to_idx: dict[str, int], layout: str,
                      cache_dir: Path | None) -> Split:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    try:
        samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:  # a class folder without a single image file
        raise UserError(str(e).split("\n")[0], where=str(split_dir),
                        fix=f"every class folder needs at least one image ({', '.join(IMG_EXTENSIONS)})") from None
    listing = []
    for file, label in samples:
        st = os.stat(file)
        listing.append((os.path.relpath(file, split_dir), label, st.st_size, st.st_mtime_ns))
    key = obj_sha256({"v": _FOLDER_CACHE_VERSION, "dir": str(split_dir.resolve()),
                      "classes": sorted(class_to_idx, key=class_to_idx.get), "files": listing})
    cache = cache_dir / f"{split_dir.parent.name}-{split_dir.name}-{key[:20]}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as f:
                return Split(f["images"], f["labels"])
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error):
            pass  # a damaged cache is rebuilt below
    split = _decode_all(split_dir, samples)
    if cache is not None:
        try:
            with atomic_path(cache) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, images=split.images, labels=split.labels)
        except OSError as e:
            warnings.warn(f"could not write the decoded-image cache {cache}: {e}", stacklevel=2)
    return split


def _decode_all(split_dir: Path, samples: list[tuple[str, int]]) -> Split:
    """Decode with torchvision's ImageFolder loader (PIL, converted to RGB) into one NHWC array.

    ``torchvision.io.decode_image`` is deprecated as of torchvision 0.29 and is only marginally
    faster on 32x32 JPEGs, so the ImageFolder default loader is used.
    """
    from torchvision.datasets.folder import pil_loader
    from tqdm.auto import tqdm

    images: list[np.ndarray] = []
    it = tqdm(samples, desc=f"decoding {split_dir}", unit="img", leave=False,
              disable=True if len(samples) < _PROGRESS_MIN_IMAGES else None)
    for file, _ in it:
        try:
            images.append(np.asarray(pil_loader(file)))
        except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(f"cannot be decoded as an image ({type(e).__name__}: {e})", where=file,
                            fix="replace or remove the file") from None
    shapes = Counter(im.shape for im in images)
    if len(shapes) > 1:
        common = shapes.most_common(1)[0][0]
        odd = [f"{f} {im.shape[1]}x{im.shape[0]}" for (f, _), im in zip(samples, images) if im.shape != common][:3]
        raise UserError(f"images have {len(shapes)} different sizes (most are {common[1]}x{common[0]}; e.g. "
                        f"{'; '.join(odd)})", where=str(split_dir),
                        fix="resize all images of the dataset to one size beforehand (data.input_size then "
                            "resizes them for the model)")
    return Split(np.stack(images), np.asarray([label for _, label in samples], dtype=np.int64))

