"""The INT8 search on one exported model, then every candidate and its choice scored on the *test* split.

    python benchmarks/quantize_search.py MODEL.onnx --data SOURCE [--max-drop 1.0] [--runs 12]
        [--views 4] [--activation-types uint8 int8] [--also OTHER.int8.onnx ...] [--json OUT.json]

The search (``distill2deploy.deploy.quantize_search``) only ever sees the training split: it scores
candidates on a held-out slice of it and on ``--views`` unseen views of each image
(``quantize.search_views``), and keeps the fastest whose 95% upper bound of the drop is within the
budget. This script checks that promise where it matters, on the test split:

* the evidence table: for every candidate, the search's plain held-out drop, its estimate over
  image + views, the bound it decides on, and the drop the same file has on the test split (with
  its 95% interval: a few hundred test images measure a drop to about a point) and whether the
  bound's verdict holds there;
* fp32, the kept model and any ``--also`` models (e.g. the pipeline's default PTQ or a
  quantization-aware distilled file) scored on the whole test split and timed interleaved
  (``validate_models``, explicit threads).

It prints tables; it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill2deploy.config import QuantizeConfig  # noqa: E402
from distill2deploy.data import load_source, preprocess  # noqa: E402
from distill2deploy.deploy.evaluate import make_session, run_batched  # noqa: E402
from distill2deploy.deploy.metadata import read_metadata  # noqa: E402
from distill2deploy.deploy.quantize_score import Z_95, paired_drop  # noqa: E402
from distill2deploy.deploy.quantize_search import search_from_config  # noqa: E402
from distill2deploy.deploy.validate import validate_models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", help="where the kept model goes (default: MODEL.search.onnx)")
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=12, help="timed runs per candidate and batch size in the search")
    ap.add_argument("--test-runs", type=int, default=40, help="timed runs per model and batch size on the test split")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=QuantizeConfig().search_methods)
    ap.add_argument("--calib-samples", type=int, nargs="+", default=QuantizeConfig().search_calib_samples)
    ap.add_argument("--activation-types", nargs="+", default=["uint8"])
    ap.add_argument("--views", type=int, default=QuantizeConfig().search_views,
                    help="unseen views per held-out image (quantize.search_views; 0: the plain slice only)")
    ap.add_argument("--also", nargs="*", default=[], help="other INT8 files to score on the test split")
    ap.add_argument("--json")
    args = ap.parse_args()

    meta = read_metadata(args.onnx)
    data = load_source(args.data, need_train=True, num_classes=meta.get("num_classes"))
    out = Path(args.out or Path(args.onnx).with_suffix(".search.onnx"))
    q = QuantizeConfig(search=True, max_drop=args.max_drop, search_runs=args.runs, search_methods=args.methods,
                       search_calib_samples=args.calib_samples, search_activation_types=args.activation_types,
                       search_views=args.views)

    def images(m: dict) -> object:
        return preprocess(data.test.images, mean=m["mean"], std=m["std"], input_size=m["input_size"])

    x_test = images(meta)
    f_test = run_batched(make_session(args.onnx, threads=args.threads), x_test, 128)
    on_test: dict[str, dict] = {}

    def score_on_test(row: dict, path: Path) -> None:  # outside the search: it never sees these numbers
        on_test[row["name"]] = paired_drop(f_test, run_batched(make_session(path, threads=args.threads), x_test, 128),
                                           data.test.labels)

    search = search_from_config(args.onnx, out, images=data.train.images, labels=data.train.labels, q=q,
                                mean=meta["mean"], std=meta["std"], input_size=meta["input_size"], seed=0,
                                threads=args.threads, batch_sizes=args.batch_sizes, on_candidate=score_on_test)
    view_top1 = "" if not search["views"] else f", on {search['views']} views {100 * search['fp32_view_top1']:.2f}%"
    print(f"\nSearch on {search['eval_samples']} held-out training images (fp32 top-1 {100 * search['fp32_top1']:.2f}%"
          f"{view_top1}), budget {args.max_drop} pts, {args.threads} thread(s); test split: {len(data.test.labels)} "
          f"images, fp32 top-1 {100 * (f_test.argmax(1) == data.test.labels).mean():.2f}%")
    print("| candidate | held-out drop | estimate (image + views) | bound (decides) | test drop [95% CI] | "
          "test disagreement | bound's verdict on test | latency / fp32 [per-round IQR] |")
    for r in sorted(search["rows"], key=lambda r: r["latency_ratio"]):
        t = on_test[r["name"]]
        half = (t["drop_ucb_pt"] - t["drop_pt"]) / Z_95 * 1.96
        fits, holds = r["drop_ucb_pt"] <= args.max_drop, t["drop_pt"] <= args.max_drop
        verdict = (("fits, holds" if holds else "fits, FAILS") if fits
                   else ("rejected" if not holds else "rejected (fits on test)"))
        lo, hi = r["latency_ratio_range"]
        mark = " (kept)" if r["name"] == search["chosen"] else ""
        print(f"| {r['name']}{mark} | {r['drop_pt']:+.2f} | {r['est_drop_pt']:+.2f} | {r['drop_ucb_pt']:+.2f} | "
              f"{t['drop_pt']:+.2f} [{t['drop_pt'] - half:+.2f}, {t['drop_pt'] + half:+.2f}] | "
              f"{100 * t['disagreement']:.2f}% | {verdict} | {r['latency_ratio']:.3f} [{lo:.2f}, {hi:.2f}] |")
    fitting = [on_test[r["name"]]["drop_pt"] for r in search["rows"] if r["drop_ucb_pt"] <= args.max_drop]
    print(f"kept {search['chosen']}: test drop {on_test[search['chosen']]['drop_pt']:+.2f} pts; the bound accepted "
          f"{len(fitting)} of {len(search['rows'])} candidates, worst test drop among them "
          + (f"{max(fitting):+.2f}" if fitting else "-"))

    test = validate_models([args.onnx, out, *args.also], images, data.test.labels, batch_sizes=args.batch_sizes,
                           runs=args.test_runs, warmup=5, threads=args.threads)
    fp32 = next(iter(test["models"].values()))
    print(f"\nTest split ({fp32['accuracy']['n']} images), timed interleaved, {args.threads} thread(s):")
    print("| model | top-1 | drop vs fp32 (pts) | " + " | ".join(f"p50 / fp32 bs{b}" for b in args.batch_sizes) + " |")
    for name, m in test["models"].items():
        ratios = [m["latency_ms"][str(b)]["p50"] / fp32["latency_ms"][str(b)]["p50"] for b in args.batch_sizes]
        print(f"| {name} | {100 * m['accuracy']['top1']:.2f}% | {100 * (fp32['accuracy']['top1'] - m['accuracy']['top1']):+.2f} | "
              + " | ".join(f"{r:.3f}" for r in ratios) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"search": search, "candidates_on_test": on_test, "test": test},
                                              indent=1, default=str))


if __name__ == "__main__":
    main()
