"""Inference: int8 LiteRT against float32 LiteRT (and, labelled apart, float32 Keras), batch 1 and 32, on the CPU.

    python bench/inference.py            # LeNet-5 on the real MNIST test set (../shared/datasets)
    python bench/inference.py --quick    # a small MLP on scikit-learn's digits (CI smoke run)

The float model is trained once and served three ways: its float32 TFLite conversion and its
full-integer int8 conversion, both through LiteRT with one interpreter thread (the fair
comparison: same runtime, same per-call cost), and Keras through a compiled tf.function, kept as
a separate, labelled row (it pays TensorFlow's Python call overhead, about 0.9 ms, which no
served flatbuffer pays; comparing it with LiteRT measured that overhead, not int8). Latency: the
median of many timed calls after warm-up, per batch; accuracy on the same test split. Goal: int8
at least 1.5x faster than float32 LiteRT at batch 32 (bench/latency.py has the full picture).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, median, print_table, verdict, write_results

sys.path.insert(0, str(ROOT))
GOAL = 1.5
THREADS = 1


def _time(call, x: np.ndarray, runs: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        call(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - t0)
    return median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small MLP on the digits")
    ap.add_argument("--mnist", type=Path, default=Path(os.environ.get(
        "SHRINKFLEET_MNIST_DIR", ROOT.parent / "shared" / "datasets" / "mnist-t10k")))
    ap.add_argument("--runs", type=int, default=None, help="timed calls per case (default 500, quick 100)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/[quick-]inference.json)")
    args = ap.parse_args(argv)
    runs = args.runs or (100 if args.quick else 500)

    from shrinkfleet import training, zoo
    from shrinkfleet.config import CnnArch, MlpArch, SplitConfig
    from shrinkfleet.datasets import load_mnist, load_sklearn, prepare
    from shrinkfleet.evaluation import TFLiteModel, accuracy_of, keras_caller, to_tflite

    if args.quick:
        data = prepare(load_sklearn("digits"), SplitConfig(), seed=0)
        arch, name, epochs = MlpArch(hidden=[64, 32]), "MLP 64-32 on digits", 10
    else:
        data = prepare(load_mnist(args.mnist), SplitConfig(test_fraction=0.2, val_fraction=0.1), seed=0)
        arch, name, epochs = CnnArch(filters=[6, 16], kernel_size=5, dense=[120, 84]), "LeNet-5 on MNIST", 8
    model = zoo.build(arch, data.input_shape, data.num_classes, name="bench")
    training.fit(model, data.train.x, data.train.y, (data.val.x, data.val.y), loss=training.sparse_ce(),
                 metrics=["accuracy"], epochs=epochs, batch_size=64, learning_rate=2e-3, seed=0)
    float32 = TFLiteModel(to_tflite(model, "float32"), THREADS)
    int8 = TFLiteModel(to_tflite(model, "int8", representative=data.train.x[:200]), THREADS)
    keras_call = keras_caller(model)
    cases = {
        f"float32 LiteRT ({float32.runtime})": (float32, float32),
        f"int8 LiteRT ({int8.runtime})": (int8, int8),
        "float32 Keras (tf.function, not comparable)": (keras_call, lambda x: keras_call(x)),
    }
    rows, results = [], {}
    for label, (predict, call) in cases.items():
        acc = accuracy_of(lambda x, p=predict: np.concatenate([np.asarray(p(x[i:i + 32]), dtype=np.float32)
                                                               for i in range(0, len(x), 32)]),
                          data.test.x, data.test.y)
        b1 = _time(call, data.test.x[:1], runs)
        b32 = _time(call, data.test.x[:32], max(runs // 4, 25))
        results[label] = {"accuracy": acc, "batch1_ms": b1, "batch32_ms": b32, "batch32_ms_per_sample": b32 / 32}
        rows.append({"variant": label, "accuracy %": f"{acc * 100:.2f}", "batch 1 ms": f"{b1:.3f}",
                     "batch 32 ms": f"{b32:.3f}", "ms / sample at 32": f"{b32 / 32:.4f}"})
    fv, iv, kv = results.values()
    speed1, speed32 = fv["batch1_ms"] / iv["batch1_ms"], fv["batch32_ms"] / iv["batch32_ms"]
    print_table(rows, f"Inference: {name}, {len(data.test.y)} test images, CPU, {os.cpu_count()} cores, "
                      f"LiteRT {THREADS} thread")
    print(f"\nint8 vs float32 LiteRT: {speed1:.2f}x at batch 1, {speed32:.2f}x at batch 32 (goal >= {GOAL}x: "
          f"{verdict(speed32 >= GOAL)}); accuracy {fv['accuracy'] * 100:.2f}% -> {iv['accuracy'] * 100:.2f}%; "
          f"Keras at batch 1 is {kv['batch1_ms'] / fv['batch1_ms']:.0f}x slower than the same float32 model on LiteRT")
    path = write_results("inference", {
        "quick": args.quick, "model": name, "test_samples": len(data.test.y), "runs": runs, "threads": THREADS,
        "results": results, "speedup_batch1": speed1, "speedup_batch32": speed32,
        "keras_over_litert_float32_batch1": kv["batch1_ms"] / fv["batch1_ms"], "goal_batch32": GOAL,
        "meets_goal": speed32 >= GOAL,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
