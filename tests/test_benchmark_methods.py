"""benchmarks/methods.py: the pieces its ranking rests on (fixed subsets, pairs, the seed-spread verdict).

The benchmark trains for hours; these check, in well under a second, that every seed of every method is
scored on the same images and that the KD-vs-CE verdict follows the rule the benchmark states.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_methods", REPO / "benchmarks" / "methods.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_methods"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def _folder(root: Path, per_class: dict[str, int]) -> Path:
    for split in ("train", "test"):
        for cls, n in per_class.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                (root / split / cls / f"{i:04d}.jpg").write_bytes(f"{split}{cls}{i}".encode())
    return root


def test_subset_folder_is_stratified_hard_linked_and_seed_fixed(bench, tmp_path: Path) -> None:
    src = _folder(tmp_path / "c", {"a": 20, "b": 20, "c": 10})
    sub = bench.subset_folder(src, 10, 5, seed=0)
    counts = {c.name: len(list(c.iterdir())) for c in (sub / "train").iterdir()}
    assert counts == {"a": 4, "b": 4, "c": 2}  # proportional to the class sizes
    assert sum(1 for _ in (sub / "test").glob("*/*")) == 5
    f = next((sub / "train" / "a").iterdir())
    assert f.stat().st_ino == (src / "train" / "a" / f.name).stat().st_ino  # a link, not a copy
    again = bench.subset_folder(src, 10, 5, seed=0)  # drawn once: the second call reuses it
    assert again == sub and sorted(again.rglob("*.jpg")) == sorted(sub.rglob("*.jpg"))
    other = bench.subset_folder(src, 10, 5, seed=1)
    assert other != sub
    # A bigger train subset with the same seed scores on exactly the same test images.
    bigger = bench.subset_folder(src, 20, 5, seed=0)
    rel = lambda d: sorted(p.relative_to(d) for p in (d / "test").glob("*/*"))  # noqa: E731
    assert rel(bigger) == rel(sub)


def _spread(mean: float, std: float) -> dict:
    return {"student_torch_top1": {"mean": mean, "std": std, "min": mean - std, "max": mean + std, "values": []},
            "seeds": [0, 1, 2]}


@pytest.mark.parametrize("kd_mean, verdict", [(0.46, "KD beats CE beyond the seed spread"),
                                              (0.43, "NOT separated by this budget")])
def test_summary_verdict_is_twice_the_larger_std(bench, kd_mean: float, verdict: str) -> None:
    # CE 40 ± 1, KD ± 2: the bar is 4 points, so +6 separates and +3 does not.
    text = bench.summary({"ce": _spread(0.40, 0.01), "kd": _spread(kd_mean, 0.02)})
    assert verdict in text
    assert f"{100 * (kd_mean - 0.40):+.2f}" in text


def test_summary_compares_each_pair_with_its_own_ce(bench) -> None:
    text = bench.summary({"r56-r20/ce": _spread(0.70, 0.002), "r56-r20/kd": _spread(0.72, 0.002),
                          "vgg-mnv2/ce": _spread(0.60, 0.002), "vgg-mnv2/kd": _spread(0.60, 0.002)})
    assert "r56-r20/KD − CE (last epoch): +2.00" in text and "vgg-mnv2/KD − CE (last epoch): +0.00" in text


def test_pairs_and_presets_parse(bench, tmp_path: Path) -> None:
    args = bench.parse_args(["--preset", "gpu-standard", "--out", str(tmp_path)])
    assert [p.label for p in args.pairs][:2] == ["resnet56-resnet20", "resnet110-resnet32"]
    assert args.seeds == [0, 1, 2] and set(args.multi_seed) == set(args.methods)
    one = bench.parse_args(["--preset", "cpu-2h", "--out", str(tmp_path)])
    assert [(p.teacher, p.student) for p in one.pairs] == [("wrn_16_2_cifar", "resnet20_cifar")]
    with pytest.raises(SystemExit):
        bench.parse_args(["--pairs", "resnet56_cifar"])
