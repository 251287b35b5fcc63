"""Data sources, stratified subsets and the transforms shared by training, export and validation.

A data source is one string (usable in YAML and on the CLI): ``cifar100``, ``npz:PATH`` or
``folder:PATH``. Every source is loaded whole into memory as uint8 NHWC arrays: the datasets this
project targets are small images, and in-memory arrays make epochs fast and subsets trivial.

:func:`preprocess` and :func:`eval_transform` are the same torchvision ops applied to a batch and
to one image, so the float inputs fed to onnxruntime match the ones the PyTorch model saw.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from . import _datasets, _folder
from ._datasets import Split
from .errors import UserError, suggest

SCHEMES = ("cifar100", "npz", "folder")
_SOURCE_HELP = "'cifar100', 'npz:PATH' (arrays x_train, y_train, x_test, y_test) or 'folder:PATH' (ImageFolder tree)"


@dataclass
class DataSource:
    train: Split | None  # None when the source has no train split and it was not required
    test: Split
    class_names: list[str]
    #: False when the source has no class names (an npz without fine_label_names): only the count is known
    named: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def parse_source(source: str) -> tuple[str, str | None]:
    """``'npz:/x.npz'`` -> ``('npz', '/x.npz')``; ``'cifar100'`` -> ``('cifar100', None)``."""
    where = "data.source"
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"empty data source {source!r}", where=where, fix=f"use {_SOURCE_HELP}")
    source = source.strip()
    scheme, sep, arg = source.partition(":")
    if scheme == "cifar100":
        if sep:
            raise UserError(f"'cifar100' takes no path (got {source!r})", where=where,
                            fix="write 'cifar100' and set where it is stored with data.root or $D2D_DATA")
        return "cifar100", None
    if scheme in ("npz", "folder"):
        if not arg.strip():
            raise UserError(f"'{scheme}:' needs a path (got {source!r})", where=where, fix=f"write '{scheme}:PATH'")
        return scheme, arg.strip()
    hint = suggest(scheme.lower() if sep else source.lower(), SCHEMES)
    if not sep and source.endswith(".npz"):
        hint = f"did you mean 'npz:{source}'?"
    elif not sep and Path(source).expanduser().is_dir():
        hint = f"did you mean 'folder:{source}'?"
    raise UserError(f"unknown data source {source!r}" + (f"; {hint}" if hint else ""), where=where,
                    fix=f"use {_SOURCE_HELP}")


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Where CIFAR-100 is stored/downloaded and decoded folders are cached."""
    root = root or os.environ.get("D2D_DATA") or Path.home() / ".cache" / "distill2deploy" / "data"
    return Path(root).expanduser()


def load_source(source: str, *, root: str | None = None, download: bool = True,
                need_train: bool = True, num_classes: int | None = None,
                num_classes_key: str = "data.num_classes") -> DataSource:
    """Load a data source into memory, validating it.

    ``need_train=False`` lets a source without a training split (a test-only npz, a folder with
    only ``test/``) load; the train split is still returned whenever the source has one.
    ``num_classes`` (named in errors as ``num_classes_key``) is the class count of a source without
    class names (an npz without fine_label_names): its labels must lie in ``0..num_classes-1``.
    Sources with names ignore it (callers compare it with ``class_names`` where that matters).
    """
    scheme, arg = parse_source(source)
    if scheme == "cifar100":
        train, test, names = _datasets.load_cifar100(data_root(root), download=download, need_train=need_train)
    elif scheme == "npz":
        train, test, names = _datasets.load_npz(Path(arg).expanduser(), need_train=need_train,
                                                num_classes=num_classes, num_classes_key=num_classes_key)
    else:
        train, test, names = _folder.load_folder(Path(arg).expanduser(), need_train=need_train,
                                                   cache_dir=data_root(root) / "folder-cache")
    named = names is not None
    if names is None:  # load_npz inferred or checked the count
        top = max(int(s.labels.max()) for s in (train, test) if s is not None)
        names = [f"class_{i}" for i in range(num_classes if num_classes is not None else top + 1)]
    return DataSource(train=train, test=test, class_names=names, named=named)


# ------------------------------------------------------------------------------------ subsets
def stratified_subset(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` samples with per-class counts proportional to class frequency.

    Counts are apportioned by largest remainder (so a balanced set stays exactly balanced, up to
    one sample per class), ties broken by a seeded shuffle rather than by class index so no class
    is systematically favoured; the same labels and seed always give the same indices.
    """
    labels = np.asarray(labels)
    total = len(labels)
    if n is None or n >= total:
        return np.arange(total)
    if n < 1:
        raise UserError(f"subset size must be positive, got {n}", where="data.subset",
                        fix="use a positive number, or null to keep the whole split")
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = n * counts / total
    take = np.floor(quota).astype(np.int64)
    frac = quota - take
    order = np.lexsort((rng.permutation(len(classes)), -frac))
    take[order[: n - int(take.sum())]] += 1
    picks = [rng.choice(np.flatnonzero(inverse == c), size=int(k), replace=False)
             for c, k in enumerate(take) if k]
    return np.sort(np.concatenate(picks))


def subset_source(ds: DataSource, train: int | None, test: int | None, seed: int) -> DataSource:
    """A stratified subset of each split (``None`` keeps a split whole); class names are kept."""

    def sub(split: Split | None, n: int | None, key: str) -> Split | None:
        if split is not None and n is not None and n > len(split):
            warnings.warn(f"{key}={n} but the data has only {len(split)} images in that split: using all "
                          f"{len(split)}", UserWarning, stacklevel=3)
        if split is None or n is None or n >= len(split):
            return split
        idx = stratified_subset(split.labels, n, seed)
        return Split(images=split.images[idx], labels=split.labels[idx])

    return DataSource(train=sub(ds.train, train, "data.subset.train"), test=sub(ds.test, test, "data.subset.test"),
                      class_names=list(ds.class_names), named=ds.named)


def warn_default_stats(split: Split, mean: Sequence[float], std: Sequence[float], *,
                       defaults: tuple[Sequence[float], Sequence[float]], sample: int = 4000) -> None:
    """Warn when the default (CIFAR-100) normalisation is used on images whose own statistics differ.

    The stats are measured on an evenly spaced sample of ``split``; they must be close to the
    defaults (mean within 0.03, std within 12%), which CIFAR-10 is and ImageNet-like photos are not.
    """
    if [float(v) for v in mean] != list(defaults[0]) or [float(v) for v in std] != list(defaults[1]):
        return  # chosen by the user
    x = split.images[:: max(1, len(split) // sample)].reshape(-1, 3).astype(np.float32) / 255.0
    m, s = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)
    if np.abs(m - np.asarray(mean)).max() > 0.03 or np.abs(s / np.asarray(std) - 1).max() > 0.12:
        warnings.warn(f"data.mean/data.std are the CIFAR-100 defaults, but these images have mean "
                      f"{np.round(m, 4).tolist()} and std {np.round(s, 4).tolist()}: set data.mean and data.std to "
                      "those values (they are recorded in the exported model)", UserWarning, stacklevel=2)


# -------------------------------------------------------------------------------- transforms
class ImageDataset(torch.utils.data.Dataset):
    """(transformed image, int label) pairs over an in-memory split; images go in as uint8 CHW."""

    def __init__(self, split: Split, transform: Callable[[torch.Tensor], Any] | None) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = torch.from_numpy(self.split.images[i]).permute(2, 0, 1)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.split.labels[i])


def _stats(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:  # users' values: config_checks.check_normalization
        raise ValueError(f"mean and std need 3 values (RGB), std > 0; got {mean} and {std}")
    return mean, std


def _resize(input_size: int) -> v2.Transform:
    """The one resize of every transform (a no-op when the image already has the input size)."""
    return v2.Resize((input_size, input_size), antialias=True)


def _tail(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    mean, std = _stats(mean, std)
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def train_transform(*, input_size: int, mean: Sequence[float], std: Sequence[float], crop_padding: int = 4,
                    hflip: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """The standard CIFAR augmentation: random crop after zero-padding, horizontal flip.

    Resize is a no-op (torchvision returns the input) when the image already has the input size.
    """
    ops: list[v2.Transform] = [_resize(input_size)]
    if crop_padding > 0:
        ops.append(v2.RandomCrop(input_size, padding=crop_padding, fill=0, padding_mode="constant"))
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops + _tail(mean, std))


def eval_transform(*, input_size: int, mean: Sequence[float],
                   std: Sequence[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Deterministic: resize (when needed), scale to [0, 1], normalise; works on CHW and NCHW."""
    return v2.Compose([_resize(input_size), *_tail(mean, std)])


def resize_images(images_uint8_nhwc: np.ndarray, *, input_size: int) -> np.ndarray:
    """The resize step of :func:`preprocess` alone, uint8 NHWC in and out.

    ``preprocess(resize_images(x, input_size=s), ..., input_size=s)`` equals ``preprocess(x, ...)``
    exactly (torchvision resizes uint8 to uint8 in both). A server resizes each upload this way when
    it arrives and normalises whole micro-batches later, once per batch.
    """
    x = np.asarray(images_uint8_nhwc)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise UserError(f"expected uint8 images shaped (N, H, W, 3), got {x.dtype} {x.shape}")
    if x.shape[1:3] == (input_size, input_size):
        return x
    t = _resize(input_size)(torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2))
    return t.permute(0, 2, 3, 1).contiguous().numpy()


def preprocess(images_uint8_nhwc: np.ndarray, *, mean: Sequence[float], std: Sequence[float],
               input_size: int, batch_size: int = 1024) -> np.ndarray:
    """float32 NCHW inputs for onnxruntime, computed by :func:`eval_transform` itself (batched)."""
    x = np.asarray(images_uint8_nhwc)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise UserError(f"expected uint8 images shaped (N, H, W, 3), got {x.dtype} {x.shape}",
                        fix="pass images as loaded by load_source")
    tf = eval_transform(input_size=input_size, mean=mean, std=std)
    out = np.empty((len(x), 3, input_size, input_size), dtype=np.float32)
    for i in range(0, len(x), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])).permute(0, 3, 1, 2)
        out[i:i + batch_size] = tf(chunk).numpy()
    return out
