"""Deep-Compression benchmark: LeNet-300-100 and LeNet-5 on real MNIST, next to the paper's rows.

    python bench/compression.py            # the full run (about 2 minutes on 2 CPU cores)
    python bench/compression.py --quick    # a smoke run on 1,500 images (about 2 minutes)

Data: the 10,000-image MNIST test set in ../shared/datasets/mnist-t10k (the only MNIST
split available offline), split with a fixed seed into 2,000 test images and 8,000 for
training (of which 800 are held out for validation). Each LeNet is trained in float32 (the
baseline, "float32 bytes" = its TFLite flatbuffer), then compressed with shrinkfleet's own
code: the bounded search (prune -> cluster -> convert) picks, on the validation split, the
smallest variant within the accuracy bound, and that variant is entropy-coded. Accuracy is
reported on the untouched test split. Results go to bench/results/compression.json.

Deep Compression (Han et al., ICLR 2016), Table 1, trained on all 60,000 images:
LeNet-300-100 1070 KB -> 27 KB (40x), top-1 error 1.64% -> 1.58%;
LeNet-5 1720 KB -> 44 KB (39x), top-1 error 0.80% -> 0.74%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER = {
    "LeNet-300-100": {"float_kb": 1070, "compressed_kb": 27, "ratio": 40, "error_before": 1.64, "error_after": 1.58},
    "LeNet-5": {"float_kb": 1720, "compressed_kb": 44, "ratio": 39, "error_before": 0.80, "error_after": 0.74},
}


def fleet_params(mnist: Path, quick: bool) -> dict:
    """The benchmark as a shrinkfleet fleet definition (validated by the same schema)."""
    epochs = 3 if quick else 30
    return {
        "fleet": "bench-compression",
        "seed": 7,
        "data": {"val_fraction": 0.1, "test_fraction": 0.2},
        "teacher": {"epochs": epochs, "batch_size": 64, "learning_rate": 0.001, "patience": 4},
        "prune": {"epochs": 2 if quick else 16, "batch_size": 64, "learning_rate": 0.0005, "frequency": 25,
                  "end_fraction": 0.7, "initial_sparsity": 0.0, "target_sparsity": 0.9},
        "cluster": {"epochs": 1 if quick else 4, "learning_rate": 0.0002, "init": "kmeans_plus_plus"},
        # The search sets the sparsity of the big layers; the small ones keep more weights
        # (as in the paper: LeNet-300-100 kept 8%/9%/26% per layer, LeNet-5 66%/12%/8%/19%).
        "search": {"enabled": True, "budget": 2 if quick else 8, "max_accuracy_drop": 0.004,
                   "sparsities": [0.96, 0.95, 0.94, 0.93] if not quick else [0.9],
                   "clusters": [16, 32] if not quick else [16], "conversions": ["float32"]},
        "datasets": {"mnist": {"source": "mnist", "path": str(mnist), **({"limit": 1200} if quick else {})}},
        "models": {
            "lenet-300-100": {"dataset": "mnist", "teacher": {"arch": "mlp", "hidden": [300, 100]},
                              "student": {"arch": "mlp", "hidden": [300, 100]},
                              "distill": {}, "prune": {"layer_sparsity": {"dense_1": 0.9, "logits": 0.75}},
                              "quantize": {}, "recipes": []},
            "lenet-5": {"dataset": "mnist",
                        "teacher": {"arch": "cnn", "filters": [20, 50], "kernel_size": 5, "padding": "valid",
                                    "dense": [500]},
                        "student": {"arch": "mlp", "hidden": [300, 100]},
                        "distill": {}, "prune": {"layer_sparsity": {"conv_0": 0.5, "conv_1": 0.85, "logits": 0.8}},
                        "quantize": {}, "recipes": []},
        },
    }


def run_model(name: str, cfg, data) -> dict:
    from shrinkfleet import coding, training
    from shrinkfleet.evaluation import TFLiteModel, accuracy_of, to_tflite
    from tasks.compress import search
    from tasks.teacher import train_teacher

    t0 = time.perf_counter()
    model, history = train_teacher(cfg.teacher_arch, cfg.teacher, data, cfg.seed, name="lenet")
    train_s = time.perf_counter() - t0
    float_bytes = len(to_tflite(model, "float32"))
    float_acc = training.accuracy(model, data.test.x, data.test.y)
    t0 = time.perf_counter()
    trials = search(cfg, model, model, data)  # Deep Compression compresses the network itself
    search_s = time.perf_counter() - t0
    rows = []
    for trial, v in trials.items():
        acc = accuracy_of(TFLiteModel(v.content).predict, data.test.x, data.test.y)
        assert coding.decode(v.coded) == v.content  # the coded model is the variant, bit for bit
        rows.append({"trial": trial, "steps": v.steps, "val_drop_pts": 100 * v.search["val_drop"],
                     "test_accuracy": acc, "test_drop_pts": 100 * (float_acc - acc), "flatbuffer_bytes": len(v.content),
                     "coded_bytes": len(v.coded), "ratio": float_bytes / len(v.coded), "best": v.search["best"],
                     **{k: val for k, val in coding.measure(v.content).items() if k != "coded_bytes"}})
    best = next((r for r in rows if r["best"]), None)
    return {"model": name, "params": int(model.count_params()), "float32_bytes": float_bytes,
            "float_test_accuracy": float_acc, "train_epochs": len(history["loss"]), "train_seconds": train_s,
            "search_seconds": search_s, "trials": rows, "best": best}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (1,500 images, few epochs)")
    parser.add_argument("--mnist", type=Path, default=Path(os.environ.get(
        "SHRINKFLEET_MNIST_DIR", ROOT.parent / "shared" / "datasets" / "mnist-t10k")))
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/[quick-]compression.json)")
    parser.add_argument("--models", default="LeNet-300-100,LeNet-5", help="comma-separated")
    args = parser.parse_args(argv)
    args.out = args.out or ROOT / "bench" / "results" / f"{'quick-' if args.quick else ''}compression.json"
    if not args.mnist.is_dir():
        print(f"error: {args.mnist} not found (the MNIST IDX files; set --mnist or SHRINKFLEET_MNIST_DIR)",
              file=sys.stderr)
        return 2

    from shrinkfleet.config import parse_params
    from shrinkfleet.datasets import load_raw, prepare
    from shrinkfleet.storage import atomic_write_text

    fleet = parse_params(fleet_params(args.mnist.resolve(), args.quick), source="bench/compression.py")
    spec = fleet.datasets["mnist"]
    data = prepare(load_raw(spec, ROOT), fleet.data, fleet.seed, limit=spec.limit,
                   limit_test=300 if args.quick else None)
    results = []
    for name in args.models.split(","):
        print(f"== {name}: training the float32 baseline, then searching ...", flush=True)
        results.append(run_model(name, fleet.resolve(name.lower()), data))

    header = f"{'model':<14} {'float32 B':>10} {'best coded B':>12} {'ratio':>7} {'acc float':>9} " \
             f"{'acc best':>9} {'drop pts':>8} {'bits/nz':>7}  recipe"
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        b = r["best"]
        if b is None:
            acc = 100 * r["float_test_accuracy"]
            print(f"{r['model']:<14} {r['float32_bytes']:>10,} {'-':>12} {'-':>7} {acc:>8.2f}%  no trial passed")
            continue
        print(f"{r['model']:<14} {r['float32_bytes']:>10,} {b['coded_bytes']:>12,} {b['ratio']:>6.1f}x "
              f"{100 * r['float_test_accuracy']:>8.2f}% {100 * b['test_accuracy']:>8.2f}% {b['test_drop_pts']:>8.2f} "
              f"{b['bits_per_nonzero']:>7.2f}  {' > '.join(b['steps'])}")
        p = PAPER.get(r["model"])
        if p:
            print(f"{'  (paper)':<14} {p['float_kb'] * 1000:>10,} {p['compressed_kb'] * 1000:>12,} {p['ratio']:>6.0f}x "
                  f"{100 - p['error_before']:>8.2f}% {100 - p['error_after']:>8.2f}% "
                  f"{p['error_after'] - p['error_before']:>8.2f}")
    doc = {
        "benchmark": "compression",
        "measured": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "quick": args.quick,
        "data": {"source": str(args.mnist), "train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "paper": PAPER,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
