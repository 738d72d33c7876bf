"""Bring your own model: a user's CNN, trained outside shrinkfleet, compressed by a fleet run.

    python bench/byo.py            # the real MNIST t10k images (10,000), two fleet runs
    python bench/byo.py --quick    # 2,000 of them, fewer epochs (a smoke run)

The real MNIST test set (``../shared/datasets/mnist-t10k``) is exported as a folder of PNG
files, one sub-folder per digit, which a fleet reads as an ``images`` dataset (32x32,
grayscale). The CNN below (BatchNorm, a depthwise convolution, a softmax output: not one of
shrinkfleet's own models) is trained here with plain Keras on the train split that prepare
makes, and saved as a ``.keras`` file. Then two fleet runs:

- ``byo-null``: the file as the teacher, ``student: null``: prune, cluster and code it;
- ``byo-mnv2``: the same teacher distilled into ``tf_keras.applications.MobileNetV2``.

Per model: the user's float32 bytes (the teacher's flatbuffer), the smallest coded variant
within one point of the teacher's accuracy, its ratio and drop, and the run's wall time.
Goal: with ``student: null``, a coded ratio >= 10x at <= 1 point drop. Writes
bench/results/byo.json (``models.<name>.ratio``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_project, print_table, run_cli, write_results

MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist-t10k"
GOAL_RATIO, GOAL_DROP = 10.0, 0.01


def export_png(folder: Path, limit: int | None) -> int:
    """MNIST t10k as PNG files, ``<folder>/<digit>/<index>.png``; returns how many."""
    from PIL import Image

    from shrinkfleet.datasets import load_mnist

    raw = load_mnist(MNIST)
    n = len(raw.y) if limit is None else min(limit, len(raw.y))
    for i in range(n):
        target = folder / str(int(raw.y[i]))
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(raw.x[i, :, :, 0]).save(target / f"{i:05d}.png")
    return n


def user_cnn(keras):
    """What a team might have trained: conv + BatchNorm, a depthwise-separable block, dense, softmax."""
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(32, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.Conv2D(64, 1, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x), name="user_cnn")


def train_outside(project: Path, params: dict, epochs: int) -> dict:
    """Train the user's CNN with plain Keras on the train split prepare makes; save it. Its test accuracy."""
    import numpy as np

    from shrinkfleet.config import parse_params
    from shrinkfleet.datasets import load_raw, prepare
    from shrinkfleet.tfenv import keras

    fleet = parse_params(params)
    spec = fleet.datasets["mnist-png"]
    data = prepare(load_raw(spec, project), fleet.data, fleet.seed)
    keras.utils.set_random_seed(0)
    model = user_cnn(keras)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(data.train.x, data.train.y, epochs=epochs, batch_size=64, verbose=0)
    path = project / "models" / "in" / "user.keras"
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    accuracy = float(np.mean(model.predict(data.test.x, verbose=0).argmax(axis=1) == data.test.y))
    return {"file_bytes": path.stat().st_size, "params": int(model.count_params()), "test_accuracy": accuracy}


def fleet_params(quick: bool) -> dict:
    epochs = 2 if quick else 5
    return {
        "fleet": "byo", "seed": 7,
        "run": {"workers": 2, "retries": 0, "retry_delay_seconds": 0},
        "teacher": {"epochs": epochs, "batch_size": 64, "learning_rate": 0.001, "patience": 0},
        "distill": {"temperature": 4.0, "alpha": 0.1, "epochs": epochs, "batch_size": 64, "learning_rate": 0.002,
                    "patience": 0},
        "prune": {"target_sparsity": 0.8, "epochs": epochs, "batch_size": 64, "learning_rate": 0.0005,
                  "frequency": 20},
        "cluster": {"clusters": 16, "epochs": 2, "learning_rate": 0.0002},
        "qat": {"epochs": 1, "learning_rate": 0.0001},
        "recipes": {"pruned-int8": {"steps": ["int8"]}, "pruned-clustered": {"steps": ["cluster", "float32"]},
                    "pruned-pcqat": {"steps": ["cluster", "pcqat", "int8"]}},
        "evaluate": {"latency_runs": 20, "latency_warmup": 3},
        "gate": {"max_accuracy_drop": GOAL_DROP, "objective": "coded_bytes"},
        "datasets": {"mnist-png": {"source": "images", "path": "data/raw/mnist-png", "image_size": [32, 32],
                                   "color": "grayscale"}},
        "models": {
            "byo-null": {"dataset": "mnist-png", "student": None,
                         "teacher": {"arch": "pretrained", "path": "models/in/user.keras"}},
            "byo-mnv2": {"dataset": "mnist-png", "teacher": {"arch": "pretrained", "path": "models/in/user.keras"},
                         "student": {"arch": "application", "name": "MobileNetV2", "options": {"alpha": 0.35}}},
        },
    }


def summarise(doc: dict) -> dict:
    """The smallest coded .tflite variant within the drop bound (or the best one when none is)."""
    teacher = doc["variants"]["teacher"]
    tflite = {n: v for n, v in doc["variants"].items() if v["format"] == "tflite"}
    within = {n: v for n, v in tflite.items() if v["accuracy_drop"] <= GOAL_DROP}
    name, v = min((within or tflite).items(), key=lambda kv: kv[1]["coded_bytes"] if within else
                  kv[1]["accuracy_drop"])
    return {"variant": name, "float_bytes": teacher["size_bytes"], "coded_bytes": v["coded_bytes"],
            "ratio": teacher["size_bytes"] / v["coded_bytes"], "teacher_accuracy": teacher["accuracy"],
            "accuracy": v["accuracy"], "accuracy_drop": v["accuracy_drop"], "within_drop": bool(within)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 images, fewer epochs")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/[quick-]byo.json)")
    args = ap.parse_args(argv)
    if not MNIST.is_dir():
        raise SystemExit(f"{MNIST} is absent: this benchmark needs the real MNIST t10k files")
    params = fleet_params(args.quick)
    with tempfile.TemporaryDirectory(prefix="bench-byo-") as tmp:
        project = make_project(Path(tmp) / "project", params)
        images = export_png(project / "data" / "raw" / "mnist-png", 2000 if args.quick else None)
        user = train_outside(project, params, epochs=2 if args.quick else 6)
        print(f"user CNN: {user['params']:,} parameters, {user['file_bytes']:,} B .keras, test accuracy "
              f"{user['test_accuracy'] * 100:.2f}% on {images:,} images", flush=True)
        models, seconds = {}, {}
        for name in params["models"]:
            run = run_cli(project, "run", "--models", name)
            seconds[name] = run.seconds
            models[name] = summarise(json.loads((project / "metrics" / f"{name}.json").read_text()))
            models[name]["wall_seconds"] = run.seconds
            print(f"{name}: {run.seconds:.0f} s", flush=True)
    rows = [{"model": n, "student": "none" if n == "byo-null" else "MobileNetV2 (alpha 0.35)",
             "variant": m["variant"], "float32 bytes": f"{m['float_bytes']:,}", "coded bytes": f"{m['coded_bytes']:,}",
             "coded ratio": f"{m['ratio']:.1f}x", "drop (pts)": f"{m['accuracy_drop'] * 100:+.2f}",
             "wall s": f"{m['wall_seconds']:.0f}"} for n, m in models.items()]
    print_table(rows, f"Bring your own model: MNIST t10k as PNG ({images:,} images), user CNN trained outside")
    null = models["byo-null"]
    ok = null["ratio"] >= GOAL_RATIO and null["accuracy_drop"] <= GOAL_DROP
    print(f"\nstudent: null: {null['ratio']:.1f}x at {null['accuracy_drop'] * 100:+.2f} pts (goal >= {GOAL_RATIO:g}x "
          f"at <= {GOAL_DROP * 100:g} pt): {'meets the goal' if ok else 'MISSES the goal'}")
    path = write_results("byo", {"quick": args.quick, "images": images, "user_model": user, "models": models,
                                 "params": yaml.safe_load(yaml.safe_dump(params)), "goal_ratio": GOAL_RATIO,
                                 "goal_drop": GOAL_DROP, "meets_goal": ok}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
