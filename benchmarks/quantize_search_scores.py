"""Which held-out score predicts an INT8 candidate's drop on the *test* split: kinds of views × statistics.

    python benchmarks/quantize_search_scores.py MODEL.onnx --data SOURCE [--views 4] [--max-drop 1.0]

The search (``distill2deploy.deploy.quantize_search``) may only score candidates on training images,
which a network has often memorised. This script builds the search's candidates (its defaults: the
``quantize.search_*`` grid and the float-nodes variant, timed once only), then scores fp32 and every
candidate on the held-out slice plain, on ``--views`` seeded views of each image of several kinds,
and on the test split. It prints:

1. per kind of view: fp32 top-1 and the range of INT8/fp32 disagreement over the candidates that
   are not broken (drop under 2 points on the held-out images), next to the test split: the views to use are
   the ones nearest the test split;
2. per score (drop, disagreement, 95% upper bound of the drop; on the plain slice and on image +
   views of each kind): how many candidates it accepts at ``--max-drop`` and the worst test drop
   among them, which is what a search on that score risks when the fastest is partly noise.

It asserts nothing. The results are in docs/quantize_search.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill2deploy._io import scratch_dir  # noqa: E402
from distill2deploy.config import QuantizeConfig  # noqa: E402
from distill2deploy.data import load_source, preprocess  # noqa: E402
from distill2deploy.deploy.evaluate import make_session, run_batched  # noqa: E402
from distill2deploy.deploy.metadata import read_metadata  # noqa: E402
from distill2deploy.deploy.quantize_score import paired_drop, unseen_views  # noqa: E402
from distill2deploy.deploy.quantize_search import candidate_grid, held_out_split, search_int8  # noqa: E402


def view_kinds(size: int) -> dict[str, v2.Transform | None]:
    """None: the search's own views (flip + TrivialAugmentWide)."""
    rrc = [v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    return {"pad-4 crop + flip (training aug)": v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()]),
            "random-resized crop 0.25-1 + flip": v2.Compose(rrc),
            "same + colour jitter 0.4": v2.Compose([*rrc, v2.ColorJitter(0.4, 0.4, 0.4, 0.1)]),
            "TrivialAugmentWide + flip (search)": None}


def scored_on(logits: dict[str, np.ndarray], kind: str) -> np.ndarray:
    """The held-out images' logits, followed by those of their views of ``kind`` (as the search scores)."""
    if kind == "held-out images":
        return logits[kind]
    return np.concatenate([logits["held-out images"], logits[kind]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx")
    ap.add_argument("--data", required=True)
    ap.add_argument("--views", type=int, default=QuantizeConfig().search_views)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    q, meta = QuantizeConfig(), read_metadata(args.onnx)
    data = load_source(args.data, need_train=True, num_classes=meta.get("num_classes"))
    prep = {"mean": meta["mean"], "std": meta["std"], "input_size": meta["input_size"]}
    calib_idx, eval_idx = held_out_split(data.train.labels, max(q.search_calib_samples), q.search_samples, args.seed)
    images, y, y_test = data.train.images[eval_idx], data.train.labels[eval_idx], data.test.labels
    inputs = {"held-out images": preprocess(images, **prep)}
    for kind, tf in view_kinds(images.shape[1]).items():
        inputs[kind] = preprocess(unseen_views(images, args.views, args.seed, tf), **prep)
    inputs["test split"] = preprocess(data.test.images, **prep)

    def logits(path: Path) -> dict[str, np.ndarray]:
        session = make_session(path, threads=args.threads)
        return {k: run_batched(session, x, 128) for k, x in inputs.items()}

    fp32, cands = logits(Path(args.onnx)), {}
    with scratch_dir(Path(args.onnx), "scores") as tmp:
        search_int8(args.onnx, Path(tmp) / "kept.onnx", calib_pool=preprocess(data.train.images[calib_idx], **prep),
                    eval_inputs=inputs["held-out images"], eval_labels=y,
                    view_inputs=inputs["TrivialAugmentWide + flip (search)"],
                    candidates=candidate_grid(q.search_methods, q.search_calib_samples, q.search_activation_types),
                    float_activations=q.search_float_activations, threads=args.threads, batch_sizes=[1], runs=1,
                    rounds=1, input_size=meta["input_size"], calib_batch_size=q.calib_batch_size,
                    progress=False,
                    on_candidate=lambda row, path: cands.update({row["name"]: logits(path)}))

    test = {n: paired_drop(fp32["test split"], c["test split"], y_test) for n, c in cands.items()}
    sane = [n for n, c in cands.items() if paired_drop(fp32["held-out images"], c["held-out images"], y)["drop_pt"] < 2]
    print(f"\n{args.onnx}: {len(y)} held-out training images x {args.views} views, {len(y_test)} test images; "
          f"fp32 top-1, and INT8/fp32 disagreement over the {len(sane)} candidates losing < 2 points on the held-out images")
    print("| " + " | ".join(inputs) + " |\n|" + "---|" * len(inputs))
    cells = []
    for k in inputs:
        labels = y_test if k == "test split" else np.tile(y, len(fp32[k]) // len(y))
        dis = [100 * np.mean(fp32[k].argmax(1) != cands[n][k].argmax(1)) for n in sane]
        cells.append(f"{100 * np.mean(fp32[k].argmax(1) == labels):.1f}% ({min(dis):.1f}-{max(dis):.1f}%)")
    print("| " + " | ".join(cells) + " |")

    print(f"\nAt a {args.max_drop}-point budget: candidates each score accepts, and the worst test drop among them")
    print("| scored on | drop: accepted, worst | disagreement: accepted, worst | 95% bound: accepted, worst |")
    print("|---|---|---|---|")
    for k in [k for k in inputs if k != "test split"]:
        scores = {n: paired_drop(scored_on(fp32, k), scored_on(c, k), y) for n, c in cands.items()}
        cells = []
        for stat, scale in (("drop_pt", 1), ("disagreement", 100), ("drop_ucb_pt", 1)):
            ok = [test[n]["drop_pt"] for n in cands if scale * scores[n][stat] <= args.max_drop]
            cells.append(f"{len(ok)}/{len(cands)}, " + (f"{max(ok):+.2f}" if ok else "-"))
        print(f"| {k}{'' if k == 'held-out images' else ' + images'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
