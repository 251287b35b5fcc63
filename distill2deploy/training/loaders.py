"""What the training loop reads: seeded, sharded, restartable batches (and their augmentation).

Two things decide whether a run is *exactly* reproducible, and both live here:

* **Data order and sharding** (:class:`ShardedBatchSampler`): epoch ``e`` is a permutation drawn
  from ``(seed, e)``, cut into global batches of ``batch_size``; process ``r`` of ``N`` takes its
  contiguous slice of every global batch. Each epoch sees every sample exactly once, and the
  global batches (and their augmentation) do not depend on ``N``; a resumed run restarts at any
  step without replaying the ones before.
* **Augmentation randomness**: seeded per batch from ``(seed, epoch, step)`` (on-device,
  :class:`BatchPipe` with :mod:`distill2deploy.augment`) or per sample from ``(seed, epoch,
  position)`` (torchvision per-sample transforms, :class:`SeededSamples`), never from worker
  processes or from how far a run got before a kill.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..augment import BatchAugment
from ..config import DataConfig
from ..data import DataSource, ImageDataset, Split, eval_transform, train_transform
from ..errors import UserError

_MASK64 = (1 << 64) - 1


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 rounds): (seed, epoch, step) streams never collide
    the way ``seed + epoch + step`` would."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & _MASK64)) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


class ShardedBatchSampler(Sampler[list[Any]]):
    """Seeded global batches, sharded over processes, restartable at any step.

    Epoch ``e``'s order is ``randperm(n)`` from a generator seeded with ``(seed, e)``; step ``k``'s
    global batch is ``order[k*B:(k+1)*B]`` and this process takes slice ``rank`` of it
    (``tensor_split``: sizes differ by at most one). A last global batch smaller than the number of
    processes is dropped (at most ``N - 1`` samples an epoch), so every process runs the same number
    of steps, as DDP requires. With ``sample_seeds`` each index comes with a seed for its
    augmentation, mixed from ``(seed, e, position in the epoch)``.
    """

    def __init__(self, num_samples: int, global_batch: int, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, sample_seeds: bool = False) -> None:
        if global_batch < num_replicas:
            raise UserError(f"batch size {global_batch} is smaller than the {num_replicas} processes",
                            where="batch_size", fix=f"use a global batch size of at least {num_replicas}")
        if num_samples < num_replicas:
            raise UserError(f"{num_samples} training images cannot be shared by {num_replicas} processes",
                            where="data.subset.train", fix="use more training images or fewer processes")
        self.num_samples, self.global_batch = int(num_samples), int(global_batch)
        self.num_replicas, self.rank, self.seed = int(num_replicas), int(rank), int(seed)
        self.shuffle, self.sample_seeds = shuffle, sample_seeds
        self.epoch, self.start = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        return full + (1 if rest >= self.num_replicas else 0)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from step ``start_step`` (the steps before it are not loaded)."""
        self.epoch, self.start = int(epoch), int(start_step)

    def shard(self, step: int) -> tuple[int, int, int]:
        """(global batch size, this process's offset in it, its size) at ``step``."""
        size = min(self.global_batch, self.num_samples - step * self.global_batch)
        base, extra = divmod(size, self.num_replicas)
        lo = self.rank * base + min(self.rank, extra)
        return size, lo, base + (1 if self.rank < extra else 0)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(seed_for(self.seed, self.epoch)))

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start, 0)

    def __iter__(self) -> Iterator[list[Any]]:
        order = self.order()
        for step in range(self.start, self.steps_per_epoch):
            _, lo, count = self.shard(step)
            first = step * self.global_batch + lo
            idx = order[first:first + count].tolist()
            if self.sample_seeds:
                yield [(i, seed_for(self.seed, self.epoch, first + k)) for k, i in enumerate(idx)]
            else:
                yield idx


class UInt8Batches(Dataset):
    """Raw uint8 NHWC batches: one numpy gather per batch (``__getitems__``), no per-sample Python."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(np.ascontiguousarray(self.split.images[idx]))
        return images, torch.from_numpy(np.asarray(self.split.labels[idx], dtype=np.int64))


def _as_batch(batch: Any) -> Any:
    """collate_fn of :class:`UInt8Batches`: the dataset already returns the batch."""
    return batch


class SeededSamples(Dataset):
    """Per-sample torchvision transforms with their RNG seeded per sample (``(index, seed)`` items).

    torchvision's random transforms draw from the global torch RNG; seeding it per sample inside
    ``fork_rng`` makes an image's augmentation a function of (seed, epoch, position) only -- the
    same with or without worker processes, in one process or many, and after a resume -- and leaves
    the training step's own RNG stream (dropout, ...) untouched.
    """

    def __init__(self, base: ImageDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, int]:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]


def make_train_loader(source: DataSource, data_cfg: DataConfig, *, global_batch: int, seed: int,
                      num_replicas: int = 1, rank: int = 0, pin_memory: bool = False) -> DataLoader:
    """This process's training loader; its ``batch_sampler`` is a :class:`ShardedBatchSampler`.

    Yields ``(uint8 [b, H, W, 3], labels)`` with ``data.augment.on_device`` (augment with
    :class:`~distill2deploy.augment.BatchAugment`), else normalised float ``[b, 3, H, W]`` batches.
    """
    if source.train is None:
        raise ValueError("training needs a train split")  # load_source(need_train=True) guarantees it
    aug = data_cfg.augment
    on_device = aug.on_device
    sampler = ShardedBatchSampler(len(source.train), global_batch, num_replicas=num_replicas, rank=rank, seed=seed,
                                  sample_seeds=not on_device)
    if on_device:
        dataset, collate = UInt8Batches(source.train), _as_batch
    else:
        tf = train_transform(input_size=data_cfg.input_size, mean=data_cfg.mean, std=data_cfg.std,
                             crop_padding=aug.crop_padding, hflip=aug.hflip)
        dataset, collate = SeededSamples(ImageDataset(source.train, tf)), None
    workers = data_cfg.num_workers
    # Own generator: creating an iterator must not draw from the global RNG (it would shift the
    # training step's random stream by where the run was resumed).
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed))


def make_test_loader(source: DataSource, data_cfg: DataConfig, batch_size: int) -> DataLoader:
    tf_eval = eval_transform(input_size=data_cfg.input_size, mean=data_cfg.mean, std=data_cfg.std)
    workers = data_cfg.num_workers
    return DataLoader(ImageDataset(source.test, tf_eval), batch_size=max(batch_size, 128), shuffle=False,
                      num_workers=workers, persistent_workers=workers > 0)


def make_loaders(source: DataSource, data_cfg: DataConfig, batch_size: int, seed: int
                 ) -> tuple[DataLoader, DataLoader]:
    """Single-process training loader (see :func:`make_train_loader`) and the test loader."""
    return (make_train_loader(source, data_cfg, global_batch=batch_size, seed=seed),
            make_test_loader(source, data_cfg, batch_size))


class BatchPipe:
    """Host batch -> device tensors ready for the model (on-device augmentation when configured)."""

    def __init__(self, data_cfg: DataConfig, sampler: ShardedBatchSampler, device: torch.device,
                 memory_format: torch.memory_format, seed: int) -> None:
        aug = data_cfg.augment
        self.on_device = aug.on_device
        self.sampler, self.device, self.memory_format, self.seed = sampler, device, memory_format, seed
        self.augment = BatchAugment(input_size=data_cfg.input_size, mean=data_cfg.mean, std=data_cfg.std,
                                    crop_padding=aug.crop_padding, hflip=aug.hflip, device=device,
                                    memory_format=memory_format) if self.on_device else None
        self.generator = torch.Generator(device=device) if self.on_device else None

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor], epoch: int, step: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.augment is not None:
            # Parameters for the whole global batch, this process takes its slice: the same
            # augmentation in one process or many.
            size, lo, count = self.sampler.shard(step)
            self.generator.manual_seed(seed_for(self.seed, epoch, step))
            params = self.augment.params(size, self.generator)[lo:lo + count]
            return self.augment(images, params), labels
        return images.contiguous(memory_format=self.memory_format), labels
