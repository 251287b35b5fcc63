"""Batched training augmentation on the accelerator: random crop with zero padding, flip, normalise.

The per-sample torchvision pipeline (:func:`distill2deploy.data.train_transform`) spends Python
time on every image in DataLoader workers; on a GPU that easily becomes the bottleneck for small
CIFAR networks. With ``data.augment.on_device: true`` the loader only gathers raw uint8 NHWC
batches (one numpy fancy-index per batch), the batch is moved to the device once, and this module
does the same augmentation there, vectorised over the batch:

* one gather from the zero-padded batch does crop *and* flip (the flip is folded into the column
  index), so there is no per-sample Python and no host synchronisation;
* the random parameters come from an explicit generator that the trainer seeds from
  (seed, epoch, step), so the augmentation of a batch does not depend on worker processes, on the
  number of processes or on where an interrupted run was resumed;
* the arithmetic is exactly torchvision's (``ToDtype(float32, scale=True)`` then ``Normalize``),
  so for the same crop offsets and flips the result is bitwise equal to the per-sample pipeline.

The output keeps the NHWC memory layout of the gather (a ``channels_last`` NCHW tensor), which
is what a ``channels_last`` model wants; otherwise it is made contiguous.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class CropFlipParams:
    """Per-image crop offsets into the padded image (``0..2*padding``) and flip flags, ``[N]`` each."""

    top: Tensor
    left: Tensor
    flip: Tensor

    def __getitem__(self, index: slice) -> CropFlipParams:
        return CropFlipParams(self.top[index], self.left[index], self.flip[index])

    def __len__(self) -> int:
        return int(self.top.shape[0])


def sample_params(n: int, *, padding: int, hflip: bool, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> CropFlipParams:
    """Draw the parameters of ``n`` images with torchvision's distributions.

    ``RandomCrop(size, padding=p)`` on a ``size``-sided image picks top and left uniformly from
    ``0..2p`` (both ends included); ``RandomHorizontalFlip()`` flips with probability 1/2.
    """
    device = generator.device if generator is not None and device is None else device
    if padding > 0:
        top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
        left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    else:
        top = left = torch.zeros(n, dtype=torch.int64, device=device)
    if hflip:
        flip = torch.rand(n, generator=generator, device=device) < 0.5
    else:
        flip = torch.zeros(n, dtype=torch.bool, device=device)
    return CropFlipParams(top=top, left=left, flip=flip)


def crop_flip(images: Tensor, params: CropFlipParams, padding: int) -> Tensor:
    """Crop every image of a ``[N, H, W, C]`` batch at its offset in the zero-padded batch, mirrored
    where ``flip`` is set; returns ``[N, H, W, C]`` (same dtype), one gather for the whole batch.

    Equals, image by image, ``hflip(crop(pad(img, padding), top, left, H, W))`` in torchvision.
    """
    if images.dim() != 4:
        raise ValueError(f"crop_flip: expected an [N, H, W, C] batch, got {tuple(images.shape)}")
    n, h, w, _ = images.shape
    if len(params) != n:
        raise ValueError(f"crop_flip: {len(params)} parameter rows for {n} images")
    padded = F.pad(images, (0, 0, padding, padding, padding, padding)) if padding > 0 else images
    device = images.device
    rows = params.top.to(device)[:, None] + torch.arange(h, device=device)                  # [N, H]
    cols = torch.arange(w, device=device).expand(n, w)
    cols = torch.where(params.flip.to(device)[:, None], w - 1 - cols, cols) + params.left.to(device)[:, None]
    batch = torch.arange(n, device=device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]                                 # [N, H, W, C]


class BatchAugment:
    """uint8 NHWC batch on the device -> normalised float32 NCHW batch (augmented when training).

    ``mean``/``std`` live on the device as tensors made once, so normalising never copies from the
    host (torchvision's functional ``normalize`` builds them from lists on every call).
    """

    def __init__(self, *, input_size: int, mean: Sequence[float], std: Sequence[float], crop_padding: int = 4,
                 hflip: bool = True, device: torch.device | str = "cpu",
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.input_size = int(input_size)
        self.padding = int(crop_padding)
        self.hflip = bool(hflip)
        self.memory_format = memory_format
        self.mean = torch.as_tensor([float(m) for m in mean], dtype=torch.float32, device=device).view(-1, 1, 1)
        self.std = torch.as_tensor([float(s) for s in std], dtype=torch.float32, device=device).view(-1, 1, 1)

    def params(self, n: int, generator: torch.Generator | None = None) -> CropFlipParams:
        return sample_params(n, padding=self.padding, hflip=self.hflip, generator=generator,
                             device=self.mean.device)

    def __call__(self, images: Tensor, params: CropFlipParams | None = None) -> Tensor:
        """``params`` None: evaluation (no crop, no flip); else the batch's crop/flip parameters."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"BatchAugment: expected a uint8 [N, H, W, 3] batch, got {images.dtype} "
                             f"{tuple(images.shape)}")
        if images.shape[1:3] != (self.input_size, self.input_size):
            # The per-sample pipeline resizes first, with the same torchvision op (it takes batches).
            nchw = TF.resize(images.permute(0, 3, 1, 2), [self.input_size, self.input_size], antialias=True)
            images = nchw.permute(0, 2, 3, 1)
        if params is not None and (self.padding > 0 or self.hflip):
            images = crop_flip(images, params, self.padding)
        x = images.permute(0, 3, 1, 2)                     # NCHW view, NHWC strides
        x = x.to(torch.float32).mul_(1.0 / 255)            # torchvision ToDtype(float32, scale=True)
        x = x.sub_(self.mean).div_(self.std)               # torchvision Normalize
        return x.contiguous(memory_format=self.memory_format)
