"""Image files -> the model's input tensor, and logits -> labelled top-k: shared by ``predict`` and the server.

There is exactly one way an image becomes a model input: Pillow decodes it (PNG, JPEG, WebP, ...,
any mode, with EXIF orientation applied), it is converted to RGB, and :func:`distill2deploy.data.preprocess`
resizes and normalises it with the mean/std/input size recorded in the ONNX metadata -- the same
torchvision ops the model was trained and validated with. A server that preprocessed differently
from ``predict`` or from ``validate`` would report one accuracy and deliver another.
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..data import preprocess, resize_images
from ..errors import UserError

#: Refuse to decode images with more pixels than this (Pillow's own bomb limit is a warning only).
MAX_PIXELS = 64_000_000


def decode_image(data: bytes, *, where: str = "image") -> np.ndarray:
    """Encoded image bytes -> uint8 RGB array (H, W, 3); a :class:`UserError` for anything else.

    ``Image.load()`` decodes the whole file here, so a truncated file fails now with a clear
    message instead of later as a grey half-image (Pillow only notices truncation when it reads
    the missing pixels).
    """
    if not data:
        raise UserError("empty image: no bytes were received", where=where,
                        fix="send the image file's bytes (PNG, JPEG or WebP)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise UserError(f"image is {im.width}x{im.height} pixels, more than {MAX_PIXELS:,}",
                                where=where, fix="downscale the image before sending it")
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # camera JPEGs: apply the orientation tag
            if im.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert would clip to 255, not scale
                grey = (np.asarray(im, dtype=np.uint32) * 255 + 32767) // 65535
                return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
            if im.mode in ("I", "F"):
                raise UserError(f"{'32-bit integer' if im.mode == 'I' else 'floating-point'} image: its value "
                                "range is not defined", where=where, fix="convert it to an 8-bit RGB PNG or JPEG")
            rgb = im if im.mode == "RGB" else im.convert("RGB")  # L, LA, P, RGBA, CMYK, 1 ...
            return np.asarray(rgb, dtype=np.uint8)
    except UnidentifiedImageError:
        raise UserError(f"not an image Pillow can read ({len(data)} bytes starting {data[:8]!r})",
                        where=where, fix="send a PNG, JPEG or WebP file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot decode the image ({type(e).__name__}: {str(e)[:200]})", where=where,
                        fix="the file is truncated or corrupt; send the complete file") from None


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """:func:`decode_image` of a file, with the file's path in any error."""
    p = Path(path)
    if not p.is_file():
        raise UserError("image file not found", where=str(p), fix="check the path")
    return decode_image(p.read_bytes(), where=str(p))


def fit_images(images: Sequence[np.ndarray], input_size: int) -> np.ndarray:
    """uint8 RGB images of any sizes -> one uint8 (N, S, S, 3) array, resized as :func:`preprocess` does.

    Images of equal size are resized together; the result keeps the input order. The server calls
    this per request and normalises whole micro-batches afterwards (:func:`preprocess` on this array
    gives exactly what :func:`preprocess_images` gives).
    """
    if not images:
        raise UserError("no images given", fix="pass at least one image")
    size = int(input_size)
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    for idx in groups.values():
        out[idx] = resize_images(np.stack([images[i] for i in idx]), input_size=size)
    return out


def preprocess_images(images: Sequence[np.ndarray], meta: Mapping[str, Any]) -> np.ndarray:
    """uint8 RGB images of any sizes -> float32 NCHW, resized and normalised as the model's metadata says."""
    size = int(meta["input_size"])
    return preprocess(fit_images(images, size), mean=meta["mean"], std=meta["std"], input_size=size)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable: the max is subtracted first)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def top_k(logits: np.ndarray, class_names: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """Per row, the ``k`` most probable classes as ``{"index", "label", "probability"}``, best first.

    Ties go to the lower class index, so the same logits always give the same answer.
    """
    if int(k) < 1:
        raise UserError(f"top_k must be >= 1, got {k}", fix="ask for top_k=1 or more")
    probs = softmax(logits)
    k = min(int(k), probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"index": int(c), "label": str(class_names[c]), "probability": float(p[c])} for c in row]
            for p, row in zip(probs, order)]
