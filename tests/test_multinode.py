"""Two "machines" on loopback: two launchers (``--num_machines 2``), one process each.

The reference is a 2-process run on one machine with the same global batch: the same computation
(DDP over two shards of every global batch), so the trained weights must match whether the two
machines share one run directory or each has its own. With separate run directories the second
machine gets the teacher's weights from rank 0 and keeps its own checkpoint, so a rerun resumes
on both; a rank that cannot see an input stops every rank with one message and exit code 2.
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

from .conftest import REPO, SAMPLE_NPZ, WEIGHTS, need_shared
from .test_distributed import _free_port, _trained

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--mixed_precision", "no", "--dynamo_backend", "no"]


def _args(run_dir: Path, *extra: str, checkpoint: str | None = None) -> list[str]:
    """A 1-epoch KD run on 64 images, global batch 32: two optimizer steps of 2 x 16 images."""
    return ["-m", "distill2deploy", "distill", "quickstart", "--out", str(run_dir),
            "-o", f"data.source=npz:{SAMPLE_NPZ}", "-o", "teacher.model=resnet20_cifar",
            "-o", f"teacher.checkpoint={checkpoint or WEIGHTS / 'cifar100_resnet20.pth'}",
            "-o", "data.subset.train=64", "-o", "data.subset.test=64", "-o", "data.num_workers=0",
            "-o", "distill.epochs=1", "-o", "distill.batch_size=32", "-o", "distill.method=kd", *extra]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _two_machines(run_dirs: tuple[Path, Path], *extra: str, cwds: tuple[Path, Path] = (REPO, REPO),
                  checkpoint: str | None = None) -> list[subprocess.CompletedProcess]:
    """Start machine 0 and machine 1 as two launchers that meet on 127.0.0.1."""
    port = str(_free_port())
    procs = [subprocess.Popen([*LAUNCH, "--num_machines", "2", "--machine_rank", str(m), "--main_process_ip",
                               "127.0.0.1", "--main_process_port", port,
                               *_args(run_dirs[m], *extra, checkpoint=checkpoint)],
                              cwd=cwds[m], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m in (0, 1)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _ok(results: list[subprocess.CompletedProcess]) -> None:
    for m, r in enumerate(results):
        assert r.returncode == 0, f"machine {m}:\n" + r.stdout[-3000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory) -> Path:
    """The reference: 2 processes on one machine, same global batch."""
    need_shared()
    run_dir = tmp_path_factory.mktemp("one_machine")
    r = subprocess.run([*LAUNCH, "--num_machines", "1", "--main_process_port", str(_free_port()), *_args(run_dir)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir


def _same_result(reference: Path, run_dir: Path) -> None:
    rows = [json.loads((d / "distill" / "metrics.jsonl").read_text().splitlines()[-1]) for d in (reference, run_dir)]
    assert rows[0]["processes"] == rows[1]["processes"] == 2
    assert rows[0]["train_images"] == rows[1]["train_images"] == 64
    for k, v in rows[0].items():
        if k.startswith(("train_", "test_")):
            assert rows[1][k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    a, b = _trained(reference / "distill" / "student.pt"), _trained(run_dir / "distill" / "student.pt")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


@pytest.mark.slow
def test_two_machines_sharing_one_run_directory_match_one_machine(one_machine, tmp_path):
    shared = tmp_path / "run"
    results = _two_machines((shared, shared))
    _ok(results)
    assert results[0].stdout.count("▶ distill") == 1 and "▶" not in results[1].stdout
    _same_result(one_machine, shared)


@pytest.mark.slow
def test_two_machines_with_their_own_run_directories_match_one_machine_and_resume(one_machine, tmp_path):
    dirs = (tmp_path / "m0", tmp_path / "m1")
    _ok(_two_machines(dirs))
    _same_result(one_machine, dirs[0])
    # Artifacts only on rank 0's machine; machine 1 holds what its rank read or needs to resume.
    assert (dirs[0] / "distill" / "stage.json").is_file() and not (dirs[1] / "distill" / "stage.json").exists()
    manifest = json.loads((dirs[0] / "teacher" / "stage.json").read_text())
    assert (dirs[1] / "teacher" / "teacher.pt").read_bytes() == (dirs[0] / "teacher" / "teacher.pt").read_bytes()
    assert manifest["outputs"]["weights"]["path"] == "teacher/teacher.pt"
    assert (dirs[1] / "distill" / "checkpoints" / "last" / "random_states_1.pkl").is_file()
    assert not list(dirs[0].glob(".d2d-machine-*")) and not list(dirs[1].glob(".d2d-machine-*"))

    # A deleted output is rebuilt from the finished checkpoint, which each machine finds in its own run
    # directory: both resume from it (no retraining) and the result is the same.
    (dirs[0] / "distill" / "student.pt").unlink()
    results = _two_machines(dirs)
    _ok(results)
    for r in results:
        assert "resuming after epoch 1/1" in r.stdout + r.stderr
    _same_result(one_machine, dirs[0])


@pytest.mark.slow
def test_an_input_missing_on_one_machine_stops_both_with_one_message(tmp_path):
    """The same config names a relative checkpoint path that exists only where machine 0 starts."""
    need_shared()
    cwds = (tmp_path / "cwd0", tmp_path / "cwd1")
    for d in cwds:
        d.mkdir()
    (cwds[0] / "teacher.pth").symlink_to(WEIGHTS / "cifar100_resnet20.pth")
    results = _two_machines((tmp_path / "m0", tmp_path / "m1"), cwds=cwds, checkpoint="teacher.pth")
    for r in results:
        assert r.returncode != 0
        err = r.stderr[r.stderr.index("error: "):]
        assert err.startswith("error: the teacher stage's inputs, machine 1 (")
        assert "rank 1: teacher.checkpoint: file not found: teacher.pth" in err
        assert "Traceback" not in r.stderr.split("error: ")[0] and "exitcode  : 2" in r.stderr
    assert not (tmp_path / "m0" / "teacher").exists()


# ------------------------------------------------------------------ the agreement helpers, in-process
def _three_machines(rank: int, port: int, root: str, results) -> None:  # noqa: ANN001  (a spawned process)
    """Rank ``rank`` of 3 processes, each its own "machine" (local rank 0): runs every scenario."""
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="3", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    from distill2deploy import distributed
    from distill2deploy.errors import UserError

    out: dict[str, object] = {}

    def attempt(name: str, fn) -> None:  # noqa: ANN001
        try:
            out[name] = fn()
        except UserError as e:
            out[name] = "error: " + e.format()

    root_dir = Path(root)
    attempt("shared", lambda: distributed.check_start("c", root_dir / "shared"))
    attempt("separate", lambda: distributed.check_start("c", root_dir / f"own{rank}"))
    attempt("mixed", lambda: distributed.check_start("c", root_dir / ("pair" if rank < 2 else "own2")))
    attempt("config", lambda: distributed.check_start("c" if rank != 1 else "d", root_dir / "shared"))

    def fails_on_two() -> None:
        with distributed.agree("loading"):
            if rank == 2:
                raise UserError("nothing here", where="data.source", fix="copy it")
    attempt("agree", fails_on_two)
    attempt("main", lambda: distributed.on_main("asking", lambda: f"from {rank}"))
    state = None if rank == 2 else {"key": "k", "version": 2, "next_epoch": 3, "next_step": 0}
    attempt("resume", lambda: distributed.check_resume(state, "k", 2, root_dir / f"own{rank}" / "last"))
    attempt("resume_all", lambda: distributed.check_resume({**(state or {}), "key": "k", "version": 2, "next_epoch": 1,
                                                               "next_step": 5}, "k", 2, root_dir / "last"))
    results[rank] = out


@pytest.mark.slow
def test_ranks_agree_on_the_layout_and_stop_together(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    port = _free_port()
    procs = [ctx.Process(target=_three_machines, args=(r, port, str(tmp_path), results)) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    for r in range(3):
        out = results[r]
        assert out["shared"] is True and out["separate"] is False and out["main"] == "from 0"
        assert out["mixed"].startswith("error: --out: the run directory is shared by some machines but not by all")
        assert "machine 2 (" in out["mixed"] and "sees the run directories of machine 2" in out["mixed"]
        assert out["config"].startswith("error: multi-process run: the processes disagree on the config")
        assert "rank 1: config " in out["config"]
        assert out["agree"] == (f"error: loading, machine 2 ({socket.gethostname()}), rank 2: data.source: "
                                "nothing here\n  fix: copy it")
        assert out["resume_all"] is True
        assert out["resume"].startswith("error: multi-process run: the processes disagree on the checkpoint to resume")
        assert f"rank 2: none usable at {tmp_path / 'own2' / 'last'}" in out["resume"]
        assert f"rank 0: {tmp_path / 'own0' / 'last'} at epoch 3, step 0" in out["resume"]
    assert not list(tmp_path.rglob(".d2d-machine-*"))


def test_data_fingerprint_sees_one_changed_pixel_label_or_name():
    from distill2deploy.data import DataSource, Split
    from distill2deploy.distributed import data_fingerprint

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8), np.arange(6) % 2

    def source(images=images, labels=labels, names=("a", "b")) -> DataSource:  # noqa: ANN001
        split = Split(images=images.copy(), labels=labels.copy())
        return DataSource(train=split, test=Split(images=images[:2].copy(), labels=labels[:2].copy()),
                          class_names=list(names))

    base = data_fingerprint(source())
    assert data_fingerprint(source()) == base
    pixel = images.copy()
    pixel[3, 1, 2, 0] ^= 1
    assert data_fingerprint(source(images=pixel)) != base
    assert data_fingerprint(source(labels=labels[::-1].copy())) != base
    assert data_fingerprint(source(names=("a", "c"))) != base
    assert data_fingerprint(DataSource(train=None, test=source().test, class_names=["a", "b"])) != base
