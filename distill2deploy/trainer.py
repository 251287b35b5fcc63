"""The training loop, under Hugging Face Accelerate, shared by the teacher and distill stages.

One process or many (``accelerate launch``): the loop only talks to ``Accelerator``, so DDP,
mixed precision and gradient accumulation come from its config. Checkpoints are Accelerate's
``save_state`` directories, written to a temp dir and renamed, so a killed run resumes from the
last complete one.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import _io
from .config import DataConfig, DistillConfig, ScheduleConfig
from .data import DataSource, ImageDataset, eval_transform, train_transform
from .methods import DistillMethod, TeacherOutput
from .models.factory import extract

STATE_FILE = "trainer_state.json"


@dataclass
class TrainResult:
    epochs: int
    last_top1: float
    best_top1: float
    best_epoch: int
    extra_top1: dict[str, float]
    seconds: float
    resumed_from_epoch: int | None


def make_loaders(source: DataSource, data_cfg: DataConfig, batch_size: int, seed: int
                 ) -> tuple[DataLoader, DataLoader]:
    """Training loader (augmented, shuffled with a seeded generator) and test loader."""
    if source.train is None:
        raise ValueError("training needs a train split")  # load_source(need_train=True) guarantees it
    tf_train = train_transform(input_size=data_cfg.input_size, mean=data_cfg.mean, std=data_cfg.std,
                               crop_padding=data_cfg.augment.crop_padding, hflip=data_cfg.augment.hflip)
    tf_eval = eval_transform(input_size=data_cfg.input_size, mean=data_cfg.mean, std=data_cfg.std)
    g = torch.Generator().manual_seed(seed)
    workers = data_cfg.num_workers
    train = DataLoader(ImageDataset(source.train, tf_train), batch_size=batch_size, shuffle=True, generator=g,
                       num_workers=workers, persistent_workers=workers > 0, drop_last=False)
    test = DataLoader(ImageDataset(source.test, tf_eval), batch_size=max(batch_size, 128), shuffle=False,
                      num_workers=workers, persistent_workers=workers > 0)
    return train, test


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """Top-1/top-5 over the whole (possibly sharded) test set, gathered across processes."""
    was_training = model.training
    model.eval()
    correct1 = torch.zeros((), device=accelerator.device)
    correct5 = torch.zeros((), device=accelerator.device)
    total = torch.zeros((), device=accelerator.device)
    for images, labels in loader:
        images, labels = images.to(accelerator.device), labels.to(accelerator.device)
        with accelerator.autocast():
            logits = model(images)
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top5[:, 0] == labels).sum()
        correct5 += (top5 == labels[:, None]).any(dim=1).sum()
        total += labels.numel()
    model.train(was_training)
    n = max(total.item(), 1.0)
    return {"top1": correct1.item() / n, "top5": correct5.item() / n}


def _teacher_outputs(teachers: list[nn.Module], images: torch.Tensor, indices: list[int] | None,
                     accelerator: Accelerator) -> list[TeacherOutput]:
    outs = []
    with torch.no_grad(), accelerator.autocast():
        for t in teachers:
            logits, feats = extract(t, images, indices)
            outs.append(TeacherOutput(logits=logits.float(), features=feats))
    return outs


def make_accelerator(cfg: DistillConfig) -> Accelerator:
    """One Accelerator per process and run: DDP, mixed precision and accumulation come from here."""
    return Accelerator(mixed_precision=cfg.mixed_precision,
                       gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                       step_scheduler_with_optimizer=False)


def train(accelerator: Accelerator, method: DistillMethod, source: DataSource, *, data_cfg: DataConfig,
          schedule: ScheduleConfig | DistillConfig, seed: int, out_dir: Path, key: str,
          eval_model: nn.Module | None = None, desc: str = "train") -> TrainResult:
    """Train ``method`` for ``schedule.epochs`` epochs, resuming from ``out_dir`` when ``key`` matches.

    ``eval_model`` is the network whose test accuracy is tracked (default: ``method.student``).
    Writes ``metrics.jsonl`` (one row per epoch), ``checkpoints/last`` (Accelerate state) and
    ``best.pt`` (the best epoch's weights) under ``out_dir``.
    """
    set_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_process_batch = max(1, schedule.batch_size // accelerator.num_processes)
    train_loader, test_loader = make_loaders(source, data_cfg, per_process_batch, seed)

    specs = method.optimizers(schedule.lr)
    optimizers = {name: torch.optim.SGD(spec.params, lr=spec.lr, momentum=schedule.momentum,
                                        weight_decay=schedule.weight_decay, nesterov=schedule.nesterov)
                  for name, spec in specs.items()}
    schedulers = {name: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=schedule.milestones,
                                                             gamma=schedule.gamma)
                  for name, opt in optimizers.items()}
    names = list(optimizers)
    prepared = accelerator.prepare(method, *optimizers.values(), *schedulers.values(), train_loader, test_loader)
    method_p = prepared[0]
    opts = list(prepared[1:1 + len(names)])
    scheds = list(prepared[1 + len(names):1 + 2 * len(names)])
    train_loader, test_loader = prepared[-2], prepared[-1]
    model_to_eval = eval_model if eval_model is not None else method.student
    teachers = [t.to(accelerator.device).eval().requires_grad_(False) for t in method.frozen_teachers()]
    indices = method.teacher_feature_indices()

    ckpt_dir = out_dir / "checkpoints" / "last"
    metrics_path = out_dir / "metrics.jsonl"
    start_epoch, best, best_epoch, resumed = 0, -1.0, -1, None
    state = _read_state(ckpt_dir)
    if state is not None and state.get("key") == key:
        accelerator.load_state(str(ckpt_dir))
        start_epoch, best, best_epoch = state["epoch"] + 1, state["best_top1"], state["best_epoch"]
        resumed = state["epoch"]
        accelerator.print(f"[{desc}] resuming after epoch {state['epoch'] + 1}/{schedule.epochs} from {ckpt_dir}")
    elif accelerator.is_main_process:
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)  # from another config: not resumable
        metrics_path.unlink(missing_ok=True)
    if accelerator.is_main_process and metrics_path.exists():
        rows = [r for r in _io.read_jsonl(metrics_path) if r.get("epoch", 0) <= start_epoch]
        _io.write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    steps_per_epoch = len(train_loader)
    t0 = time.perf_counter()
    bar = tqdm(total=schedule.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, desc=desc,
               unit="step", dynamic_ncols=True, disable=not accelerator.is_local_main_process)
    last: dict[str, float] = {"top1": float("nan")}
    extra: dict[str, float] = {}
    for epoch in range(start_epoch, schedule.epochs):
        method_p.train()
        epoch_t0 = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        seen = torch.zeros((), device=accelerator.device)
        correct = torch.zeros((), device=accelerator.device)
        for step, (images, labels) in enumerate(train_loader):
            progress = epoch + step / steps_per_epoch
            with accelerator.accumulate(method_p):
                t_out = _teacher_outputs(teachers, images, indices, accelerator) if teachers else []
                out = method_p(images, labels, t_out, progress)
                accelerator.backward(out.loss)
                for opt in opts:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            n = labels.shape[0]
            seen += n
            correct += (out.logits.detach().argmax(1) == labels).sum()
            for k, v in {"loss": out.loss.detach(), **out.logs}.items():
                sums[k] = sums.get(k, torch.zeros((), device=accelerator.device)) + v.float() * n
            bar.update(1)
            if step % 20 == 0:  # the only host sync inside the epoch, for the bar
                bar.set_postfix(epoch=f"{epoch + 1}/{schedule.epochs}", loss=f"{out.loss.item():.3f}")
        for s in scheds:
            s.step()
        # Reduce the epoch's sums across processes once, then evaluate.
        keys = sorted(sums)
        totals = accelerator.reduce(torch.stack([sums[k] for k in keys] + [correct, seen]), reduction="sum")
        n_seen = totals[-1].item()
        train_logs = {k: totals[i].item() / max(n_seen, 1) for i, k in enumerate(keys)}
        last = evaluate(model_to_eval, test_loader, accelerator)
        extra = {f"{name}_top1": evaluate(m, test_loader, accelerator)["top1"]
                 for name, m in method.extra_eval_models().items()}
        row: dict[str, Any] = {
            "epoch": epoch + 1, "lr": opts[0].param_groups[0]["lr"], "train_top1": totals[-2].item() / max(n_seen, 1),
            **{f"train_{k}": v for k, v in train_logs.items()}, "test_top1": last["top1"], "test_top5": last["top5"],
            **{f"test_{k}": v for k, v in extra.items()}, "epoch_seconds": time.perf_counter() - epoch_t0,
            "images_per_second": n_seen / (time.perf_counter() - epoch_t0),
        }
        if last["top1"] > best:
            best, best_epoch = last["top1"], epoch + 1
            if accelerator.is_main_process:
                with _io.atomic_path(out_dir / "best.pt") as tmp:
                    torch.save(accelerator.unwrap_model(method_p).student.state_dict(), tmp)
        if accelerator.is_main_process:
            _io.append_jsonl(metrics_path, row)
            bar.write(f"[{desc}] epoch {epoch + 1}/{schedule.epochs}: loss {train_logs.get('loss', math.nan):.4f} "
                      f"test top-1 {100 * last['top1']:.2f}%"
                      + "".join(f", {k} {100 * v:.2f}%" for k, v in extra.items()))
        _save_checkpoint(accelerator, ckpt_dir, {"key": key, "epoch": epoch, "best_top1": best,
                                                 "best_epoch": best_epoch})
    bar.close()
    if start_epoch >= schedule.epochs and schedule.epochs > 0:  # finished before: report the stored numbers
        last = evaluate(model_to_eval, test_loader, accelerator)
    accelerator.wait_for_everyone()
    return TrainResult(epochs=schedule.epochs, last_top1=last["top1"], best_top1=max(best, last["top1"]),
                       best_epoch=best_epoch, extra_top1=extra, seconds=time.perf_counter() - t0,
                       resumed_from_epoch=resumed)


def _read_state(ckpt_dir: Path) -> dict[str, Any] | None:
    f = ckpt_dir / STATE_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        return None


def _save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, state: dict[str, Any]) -> None:
    """Accelerate state into a temp dir, renamed over the previous checkpoint only when complete."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".partial")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _io.write_json(tmp / STATE_FILE, state)
        old = ckpt_dir.with_name(ckpt_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if ckpt_dir.exists():
            ckpt_dir.rename(old)
        tmp.rename(ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
