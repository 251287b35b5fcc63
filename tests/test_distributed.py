"""Multi-process training, sharding, on-device augmentation and the trainer's step machinery.

The 2-process test launches the real CLI under ``accelerate launch --multi_gpu --num_processes 2``
on CPU (gloo). Its reference is a 1-process run over the *same global batch* of 32 split the same
way: batch 16 with 2 gradient-accumulation steps. That reference, not a plain batch-32 run, is the
right one: BatchNorm normalises with per-process batch statistics, so 2 processes x 16 images are a
different computation from 1 x 32 (the KD loss of a fresh MobileNetV2 differs by ~25%), while
2 x 16 under DDP and 2 micro-batches of 16 accumulated are the same computation -- gradients
averaged over the two halves, one SGD step, the same images and augmentation (sampler and seeds do
not depend on the process count). Both runs use one intra-op thread per process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from distill2deploy.augment import BatchAugment, CropFlipParams, crop_flip, sample_params
from distill2deploy.config import CIFAR100_MEAN, CIFAR100_STD, DataConfig, DistillConfig, PipelineConfig
from distill2deploy.config_checks import check_config
from distill2deploy.data import DataSource, Split
from distill2deploy.errors import UserError
from distill2deploy.methods import get_method, list_methods
from distill2deploy.models.factory import create_model
from distill2deploy.training.checkpoint import recover_checkpoint
from distill2deploy.training.loaders import BatchPipe, SeededSamples, ShardedBatchSampler, make_train_loader, seed_for
from distill2deploy.training.processes import make_accelerator
from distill2deploy.training.step import TrainStep

from .conftest import SAMPLE_NPZ, WEIGHTS, need_shared


# ------------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("n,batch,world", [(100, 32, 1), (100, 32, 2), (100, 32, 3), (97, 16, 4), (64, 32, 2)])
def test_sampler_shards_see_every_sample_once(n, batch, world):
    samplers = [ShardedBatchSampler(n, batch, num_replicas=world, rank=r, seed=3) for r in range(world)]
    single = ShardedBatchSampler(n, batch, seed=3)
    for epoch in (0, 1):
        for s in [*samplers, single]:
            s.set_epoch(epoch)
        shards = [list(s) for s in samplers]
        assert len({len(b) for b in shards}) == 1, "every process must run the same number of steps"
        seen = [i for batches in shards for b in batches for i in b]
        dropped = n % batch if n % batch < world else 0
        assert len(seen) == len(set(seen)) == n - dropped
        # The global batch at each step is the 1-process batch, whatever the number of processes.
        for step, global_batch in zip(range(len(shards[0])), single):  # 1 process may keep a short tail
            assert sorted(i for b in shards for i in b[step]) == sorted(global_batch)
            assert [i for b in shards for i in b[step]] == global_batch  # contiguous slices, in order
            size, lo, count = samplers[0].shard(step)
            assert (size, lo, count) == (len(global_batch), 0, len(shards[0][step]))


def test_sampler_is_seeded_per_epoch_and_restarts_at_a_step():
    s = ShardedBatchSampler(50, 8, seed=1)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1
    s.set_epoch(0, start_step=3)
    assert list(s) == e0[3:] and len(s) == len(e0) - 3
    other = ShardedBatchSampler(50, 8, seed=2)
    assert list(other) != e0
    with pytest.raises(UserError):
        ShardedBatchSampler(50, 1, num_replicas=2)


def test_sample_seeds_follow_the_position_not_the_process_count():
    one = ShardedBatchSampler(40, 8, seed=5, sample_seeds=True)
    two = [ShardedBatchSampler(40, 8, num_replicas=2, rank=r, seed=5, sample_seeds=True) for r in range(2)]
    merged = [a + b for a, b in zip(*(list(s) for s in two))]
    assert merged == list(one)
    assert len({seed for batch in one for _, seed in batch}) == 40
    assert seed_for(5, 0, 1) != seed_for(5, 1, 0)


# ---------------------------------------------------------------------------- on-device augment
def _images(n=6, size=8, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)  # no zeros: padding shows


def test_crop_flip_matches_torchvision_per_image():
    x = _images()
    p = 3
    params = CropFlipParams(top=torch.tensor([0, 6, 3, 1, 5, 2]), left=torch.tensor([6, 0, 3, 4, 2, 1]),
                            flip=torch.tensor([True, False, True, False, True, False]))
    out = crop_flip(x, params, p)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(len(x)):
        img = x[i].permute(2, 0, 1)
        ref = TF.crop(TF.pad(img, [p]), int(params.top[i]), int(params.left[i]), 8, 8)
        if params.flip[i]:
            ref = TF.horizontal_flip(ref)
        assert torch.equal(out[i].permute(2, 0, 1), ref), i


def test_crop_pads_with_zeros_and_flip_mirrors():
    x = _images(n=2)
    p = 2
    corner = crop_flip(x, CropFlipParams(torch.tensor([0, 4]), torch.tensor([0, 4]), torch.tensor([False, False])), p)
    assert (corner[0, :p] == 0).all() and (corner[0, :, :p] == 0).all()          # top-left offset: zero rows/cols
    assert torch.equal(corner[0, p:, p:], x[0, :-p, :-p])
    assert (corner[1, -p:] == 0).all() and (corner[1, :, -p:] == 0).all()        # bottom-right offset
    centred = crop_flip(x, CropFlipParams(torch.tensor([p, p]), torch.tensor([p, p]), torch.tensor([False, True])), p)
    assert torch.equal(centred[0], x[0])
    assert torch.equal(centred[1], torch.flip(x[1], dims=(1,)))                  # W is dim 1 in HWC


def test_batch_augment_equals_the_per_sample_torchvision_pipeline():
    """For the same crop offsets and flips, bitwise the float tensors of data.train_transform."""
    x = _images(n=5, size=32, seed=1)
    aug = BatchAugment(input_size=32, mean=CIFAR100_MEAN, std=CIFAR100_STD, crop_padding=4, hflip=True)
    params = aug.params(5, torch.Generator().manual_seed(7))
    out = aug(x, params)
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    tail = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
    for i in range(5):
        img = TF.crop(TF.pad(x[i].permute(2, 0, 1), [4]), int(params.top[i]), int(params.left[i]), 32, 32)
        if params.flip[i]:
            img = TF.horizontal_flip(img)
        assert torch.equal(out[i], tail(img)), i
    evaluated = aug(x)  # no params: evaluation, normalisation only
    assert torch.equal(evaluated[0], tail(x[0].permute(2, 0, 1)))
    cl = BatchAugment(input_size=32, mean=CIFAR100_MEAN, std=CIFAR100_STD, memory_format=torch.channels_last)(x, params)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, out)


def test_augment_params_are_deterministic_and_distributed_like_torchvision():
    a = sample_params(4000, padding=4, hflip=True, generator=torch.Generator().manual_seed(3))
    b = sample_params(4000, padding=4, hflip=True, generator=torch.Generator().manual_seed(3))
    c = sample_params(4000, padding=4, hflip=True, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("top", "left", "flip"))
    assert not torch.equal(a.top, c.top)
    # RandomCrop(32, padding=4): offsets uniform on 0..8 inclusive; flips with probability 1/2.
    for offsets in (a.top, a.left):
        counts = torch.bincount(offsets, minlength=9)
        assert len(counts) == 9 and counts.min() > 4000 / 9 * 0.75 and counts.max() < 4000 / 9 * 1.25
    assert 0.45 < a.flip.float().mean() < 0.55
    none = sample_params(10, padding=0, hflip=False)
    assert not none.top.any() and not none.flip.any()
    # torchvision's own draws (RandomCrop.make_params) have the same support, uniformly.
    torch.manual_seed(0)
    rc = v2.RandomCrop(32, padding=4)
    tv = torch.tensor([rc.make_params([torch.zeros(3, 32, 32)])["top"] for _ in range(2000)])
    tv_counts = torch.bincount(tv, minlength=9)
    assert len(tv_counts) == 9 and tv_counts.min() > 2000 / 9 * 0.7


def test_seeded_samples_do_not_depend_on_workers_or_touch_the_global_rng():
    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    split = Split(images=images, labels=np.arange(12) % 3)
    source = DataSource(train=split, test=split, class_names=["a", "b", "c"])
    loaders = [make_train_loader(source, DataConfig(num_workers=w), global_batch=4, seed=9) for w in (0, 1)]
    sampler, ds = loaders[0].batch_sampler, loaders[0].dataset
    assert isinstance(ds, SeededSamples)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    runs = [[x for x, _ in loader] for loader in loaders]
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    sampler.set_epoch(1)  # another epoch: another order and other crops of the same images
    first = {tuple(i for i, _ in b) for b in sampler}
    sampler.set_epoch(0)
    assert first != {tuple(i for i, _ in b) for b in sampler}
    same_image = [ds[(0, seed)] for seed in (1, 2, 3, 1)]
    assert torch.equal(same_image[0][0], same_image[3][0])
    assert not all(torch.equal(same_image[0][0], other[0]) for other in same_image[1:3])


# ---------------------------------------------------------------------------------- the step
def _method(name: str, options: dict, teacher: str = "resnet20_cifar"):
    torch.manual_seed(0)
    cls = get_method(name)
    opts = cls.parse_options(options)
    student = create_model("mobilenetv2_x0_5_cifar", num_classes=10)
    teachers = [create_model(teacher, num_classes=10)] if cls.needs_teacher(opts) else []
    return cls(student, teachers, opts, num_classes=10, input_size=32)


@pytest.mark.slow
def test_every_method_gives_every_trained_parameter_a_gradient():
    """DDP runs without find_unused_parameters, so every method must give every trained parameter a gradient."""
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6) % 10
    accelerator = make_accelerator(DistillConfig())
    for name in list_methods():
        method = _method(name, {})
        step, _ = TrainStep.prepare(accelerator, method, DistillConfig(lr=0.01))
        step.model.train()
        step.forward_backward(x, y, 0.5)
        unused = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, (name, unused[:5])


@pytest.mark.parametrize("name,options", [("fitnet", {}), ("reviewkd", {}), ("eckd_f", {"bidirectional": False}),
                                          ("eckd_r", {"bidirectional": False})])
def test_frozen_teacher_runs_in_inference_mode_and_feature_losses_backpropagate(name, options):
    """Inference tensors cannot be saved for backward; MSE on teacher features saves its target."""
    method = _method(name, options)
    step, _ = TrainStep.prepare(make_accelerator(DistillConfig()), method, DistillConfig(lr=0.01))
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    outs = step.teacher_outputs(x)
    assert outs and not any(t.is_inference() for o in outs for t in [o.logits, *o.features])
    assert not any(p.requires_grad for t in step.teachers for p in t.parameters())
    before = [p.detach().clone() for p in method.student.parameters()]
    out = step(x, y)
    assert torch.isfinite(out.loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, method.student.parameters()))


def test_bf16_step_on_cpu_and_fp16_refused_when_training_starts():
    method = _method("kd", {})
    step, _ = TrainStep.prepare(make_accelerator(DistillConfig(mixed_precision="bf16")), method, DistillConfig())
    out = step(torch.randn(4, 3, 32, 32), torch.arange(4))
    assert torch.isfinite(out.loss) and out.logits.dtype == torch.bfloat16
    check_config(PipelineConfig(distill=DistillConfig(mixed_precision="fp16")))  # a GPU run validates anywhere
    with pytest.raises(UserError, match="bf16") as e:
        make_accelerator(DistillConfig(mixed_precision="fp16"))
    assert e.value.where == "distill.mixed_precision"
    make_accelerator(DistillConfig())  # back to fp32 for the tests that follow in this process


def test_accumulated_micro_batches_equal_one_big_batch_without_batchnorm():
    """Two micro-batches of 4 with loss_scale 1/2 give the gradient of the batch of 8 (no BN coupling)."""
    def run(chunks: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        method = get_method("ce")(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)), [],
                                  get_method("ce").parse_options({}), num_classes=5, input_size=2)
        step, _ = TrainStep.prepare(make_accelerator(DistillConfig()), method, DistillConfig(lr=0.1))
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 5, (8,), generator=g)
        for i, (xs, ys) in enumerate(zip(x.chunk(chunks), y.chunk(chunks))):
            step.forward_backward(xs, ys, 0.0, sync=i == chunks - 1, loss_scale=1 / chunks)
        step.optimizer_step()
        return [p.detach().clone() for p in method.parameters()]

    for a, b in zip(run(1), run(2)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_interrupted_checkpoint_rename_is_recovered(tmp_path):
    last = tmp_path / "last"
    old, partial = tmp_path / "last.old", tmp_path / "last.partial"
    old.mkdir()
    (old / "trainer_state.json").write_text("{}")
    partial.mkdir()  # killed while writing: no state file yet
    recover_checkpoint(last)
    assert (last / "trainer_state.json").is_file() and not old.exists()
    (tmp_path / "last.partial" / "trainer_state.json").write_text('{"new": 1}')
    last.rename(old)
    recover_checkpoint(last)  # killed between the renames: the complete new one wins
    assert json.loads((last / "trainer_state.json").read_text()) == {"new": 1}


# ------------------------------------------------------------------------------ two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_args(run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "distill2deploy", "distill", "quickstart", "--out", str(run_dir),
            "-o", f"data.source=npz:{SAMPLE_NPZ}", "-o", "teacher.model=resnet20_cifar",
            "-o", f"teacher.checkpoint={WEIGHTS / 'cifar100_resnet20.pth'}",
            "-o", "data.subset.train=64", "-o", "data.subset.test=64", "-o", "data.num_workers=0",
            "-o", "distill.epochs=2", "-o", "distill.milestones=[1]", "-o", "distill.lr=0.01",
            "-o", "distill.method=eckd_r", "-o", "distill.options={bidirectional: true, teacher_lr: 0.001}", *extra]


def _trained(path: Path) -> dict[str, torch.Tensor]:
    """Parameters only: BN running statistics are per process (averaged each epoch), not trained."""
    sd = torch.load(path, map_location="cpu")
    return {k: v for k, v in sd.items() if not any(s in k for s in ("running_", "num_batches_tracked"))}


@pytest.mark.slow
def test_two_processes_match_one_process_over_the_same_global_batch(tmp_path):
    need_shared()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    two = subprocess.run([*launch, *_cli_args(tmp_path / "two", "-o", "distill.batch_size=32")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, *_cli_args(tmp_path / "one", "-o", "distill.batch_size=16",
                                                     "-o", "distill.gradient_accumulation_steps=2")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    # Only the main process prints and writes.
    assert two.stdout.count("▶ distill") == 1 and two.stdout.count("✓ distill: done") == 1

    rows = {k: [json.loads(line) for line in (tmp_path / k / "distill" / "metrics.jsonl").read_text().splitlines()]
            for k in ("one", "two")}
    assert [r["epoch"] for r in rows["two"]] == [1, 2]
    for r1, r2 in zip(rows["one"], rows["two"]):
        assert r2["processes"] == 2 and r1["processes"] == 1
        assert r1["train_images"] == r2["train_images"] == 64          # every image once per epoch
        # Tolerance 1e-5 relative: the same computation, the sums of the logged per-batch values
        # are only reduced in another order (float32, ~1e-7 observed).
        for k, v in r1.items():
            if k.startswith("train_") and k != "train_images":
                assert r2[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (r1["epoch"], k)
        # Test accuracy also depends on BN running statistics, which are per process: 3 of 64 images.
        for k in ("test_top1", "test_teacher_top1"):
            assert abs(r1[k] - r2[k]) <= 3 / 64 + 1e-9, k
    # The trained weights of both networks: the same updates (observed bitwise equal; 1e-6 leaves room
    # for a different summation order in the all-reduce).
    for f in ("student.pt", "teacher_trained.pt"):
        a, b = _trained(tmp_path / "one" / "distill" / f), _trained(tmp_path / "two" / "distill" / f)
        assert a.keys() == b.keys()
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert worst <= 1e-6, (f, worst)


def test_on_device_batches_are_augmented_the_same_in_one_process_or_two():
    images = np.random.default_rng(1).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    source = DataSource(train=Split(images=images, labels=np.arange(20) % 4), test=None, class_names=list("abcd"))
    cfg = DataConfig(num_workers=0)
    cfg.augment.on_device = True

    def epoch(world: int, rank: int) -> list[torch.Tensor]:
        loader = make_train_loader(source, cfg, global_batch=8, seed=4, num_replicas=world, rank=rank)
        pipe = BatchPipe(cfg, loader.batch_sampler, torch.device("cpu"), torch.contiguous_format, seed=4)
        loader.batch_sampler.set_epoch(2)
        out = []
        for step, (x, y) in enumerate(loader):
            assert x.dtype == torch.uint8 and x.shape[1:] == (32, 32, 3)   # raw batches from the loader
            out.append(pipe((x, y), 2, step)[0])
        return out

    single = epoch(1, 0)
    halves = [epoch(2, r) for r in range(2)]
    assert len(single) == 3  # 20 images, global batch 8: 8 + 8 + 4
    for step, full in enumerate(single):
        assert torch.equal(torch.cat([halves[0][step], halves[1][step]]), full)


@pytest.mark.parametrize("main, local_main, shared, manages", [
    (True, True, True, True), (True, True, False, True),
    (False, True, True, False),  # another machine's first process: the shared directory is rank 0's
    (False, True, False, True),  # ... but it keeps its own unshared copy
    (False, False, True, False), (False, False, False, False),
])
def test_one_rule_decides_who_manages_a_run_directory(main, local_main, shared, manages):
    from types import SimpleNamespace

    from distill2deploy.distributed import manages_run_dir, writes_checkpoint

    state = SimpleNamespace(is_main_process=main, is_local_main_process=local_main)
    assert manages_run_dir(state, shared=shared) is manages
    acc = SimpleNamespace(**vars(state), project_configuration=SimpleNamespace(save_on_each_node=not shared))
    assert writes_checkpoint(acc) is manages
