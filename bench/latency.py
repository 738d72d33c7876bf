"""Latency, fairly: float32 TFLite against int8 and channel-pruned variants, all on LiteRT, same run.

    python bench/latency.py            # LeNet-5 and MobileNetV2 (alpha 0.35, 32x32 RGB) on real MNIST
    python bench/latency.py --quick    # LeNet-5 on 1,500 MNIST images, 1 epoch (a smoke run)

Data: the 10,000-image MNIST test set in ../shared/datasets/mnist-t10k, split with a fixed
seed into 2,000 test images and 8,000 for training (800 of them held out for validation);
MobileNetV2 sees the images resized to 32x32 and repeated over 3 channels.

Each model is trained in float32, then served four ways, every one as a TFLite flatbuffer on
the same LiteRT interpreter settings (XNNPACK, ``--threads`` threads, 1 by default as in
``evaluate.threads``): float32 (the baseline), full-integer int8, channel-pruned float32 and
channel-pruned int8. Channel pruning is :func:`shrinkfleet.channels.prune_channels` with the
``keep`` fraction that brings the model nearest to ``--macs-target`` (0.5) of its MACs, found by
bisection on the counted MACs, then a short fine-tune; its widths are rounded up to multiples
of ``--round-to`` (``channels.round_to``; by default 8 for MobileNetV2, whose layers are 8-1280
wide, and 1 for LeNet-5, whose 6-120 leave a multiple of 8 almost nothing to cut), and then the
same cut at exact widths is timed in the same run (``exact_width``, ``exact_width_int8``) as the
control. Latency: the median of ``--runs`` (at
least 200) timed calls after 50 warm-up calls, per batch size, each variant on its own
interpreter sized once for that batch (as the evaluate stage does), the variants timed in
alternating blocks of 25 calls so load drift on a shared machine hits them alike. Also MACs
(counted from the Keras graph), flatbuffer bytes and test accuracy.

Goals, at batch 32 against float32 TFLite: int8 >= 1.5x, channel-pruned >= 1.6x,
channel-pruned int8 >= 2.5x, at <= 1 point accuracy drop. Top-level keys of
bench/results/latency.json are the MobileNetV2 model's figures; ``models`` has each model's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, print_table, verdict, write_results

sys.path.insert(0, str(ROOT))

GOALS = {"int8": 1.5, "channel_pruned": 1.6, "channel_pruned_int8": 2.5}
MAX_DROP_PTS = 1.0
BATCHES = (1, 32)
MODELS = ("lenet5", "mobilenetv2")
# Channel-pruned widths rounded up to a multiple of this (channels.round_to). LeNet-5's layers are
# 6-120 wide, where a multiple of 8 leaves almost nothing to cut; MobileNetV2's are 8-1280.
ROUND_TO = {"lenet5": 1, "mobilenetv2": 8}
TITLES = {"lenet5": "LeNet-5 (6/16 filters 5x5, 120/84 dense), 28x28x1",
          "mobilenetv2": "MobileNetV2 alpha 0.35, 32x32x3"}


def to_rgb32(x: np.ndarray) -> np.ndarray:
    """28x28x1 images as 32x32x3 (bilinear resize, the grey value in every channel)."""
    from shrinkfleet.tfenv import tf

    out = [tf.image.resize(x[i: i + 1000], (32, 32)).numpy() for i in range(0, len(x), 1000)]
    return np.repeat(np.concatenate(out), 3, axis=-1).astype(np.float32)


def build(name: str, input_shape: tuple[int, ...]):
    from shrinkfleet import zoo
    from shrinkfleet.config import CnnArch
    from shrinkfleet.tfenv import keras

    if name == "lenet5":
        return zoo.build(CnnArch(filters=[6, 16], kernel_size=5, dense=[120, 84]), input_shape, 10, name="lenet5")
    model = keras.applications.MobileNetV2(input_shape=input_shape, alpha=0.35, weights=None, classes=10,
                                           classifier_activation=None)
    # The application's BatchNorm momentum (0.999) leaves the moving statistics far from the
    # batch ones after a few hundred steps, so the trained model would test near chance.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


def fit(model, data, epochs: int, learning_rate: float) -> None:
    from shrinkfleet import training

    training.fit(model, data.train.x, data.train.y, (data.val.x, data.val.y), loss=training.sparse_ce(),
                 metrics=["accuracy"], epochs=epochs, batch_size=64, learning_rate=learning_rate, seed=0)


def channel_prune(model, target: float, round_to: int = 1):
    """``prune_channels`` at the keep fraction whose MACs come nearest ``target`` of the model's."""
    from shrinkfleet.channels import prune_channels
    from shrinkfleet.macs import count_macs

    full = count_macs(model)
    lo, hi, best = 0.05, 1.0, None
    for _ in range(6):
        keep = (lo + hi) / 2
        result = prune_channels(model, keep, "l1", round_to)
        share = count_macs(result.model) / full
        if best is None or abs(share - target) < abs(best[1] - target):
            best = (keep, share, result)
        lo, hi = (keep, hi) if share < target else (lo, keep)
    return best


def interleaved(flatbuffers: dict[str, bytes], sample: np.ndarray, batch: int, args, block: int = 25) -> dict:
    """Median latency (ms) of each flatbuffer at ``batch``, timed in alternating blocks of ``block`` calls.

    On a shared machine the load drifts over seconds; alternating the variants gives each the
    same share of quiet and busy moments, so their ratio holds even when the absolute figures
    move. Each variant has its own interpreter, sized for ``batch`` in its warm-up.
    """
    from shrinkfleet.evaluation import TFLiteModel, batch_of

    x = batch_of(sample, batch)
    models = {label: TFLiteModel(content, args.threads) for label, content in flatbuffers.items()}
    for model in models.values():
        for _ in range(50):
            model(x)
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(-(-args.runs // block)):
        for label, model in models.items():
            for _ in range(block):
                t0 = time.perf_counter()
                model(x)
                times[label].append(time.perf_counter() - t0)
    return {label: float(np.median(t)) * 1e3 for label, t in times.items()}


def run_model(name: str, data, args) -> dict:
    from shrinkfleet.evaluation import TFLiteModel, accuracy_of, to_tflite
    from shrinkfleet.macs import count_macs

    t0 = time.perf_counter()
    model = build(name, data.input_shape)
    fit(model, data, args.epochs[name], 2e-3)
    train_s = time.perf_counter() - t0
    round_to = args.round_to or ROUND_TO[name]
    keep, share, result = channel_prune(model, args.macs_target, round_to)
    pruned = result.model
    fit(pruned, data, args.finetune_epochs[name], 1e-3)
    rep = data.train.x[:200]
    flatbuffers = {
        "float32": (to_tflite(model, "float32"), count_macs(model)),
        "int8": (to_tflite(model, "int8", representative=rep), count_macs(model)),
        "channel_pruned": (to_tflite(pruned, "float32"), count_macs(pruned)),
        "channel_pruned_int8": (to_tflite(pruned, "int8", representative=rep), count_macs(pruned)),
    }
    exact = None
    if round_to > 1:  # the control: the same cut without rounding, timed in the same blocks
        exact = channel_prune(model, args.macs_target, 1)
        fit(exact[2].model, data, args.finetune_epochs[name], 1e-3)
        flatbuffers["exact_width"] = (to_tflite(exact[2].model, "float32"), count_macs(exact[2].model))
        flatbuffers["exact_width_int8"] = (to_tflite(exact[2].model, "int8", representative=rep),
                                           count_macs(exact[2].model))
    variants = {}
    for label, (content, macs) in flatbuffers.items():
        model = TFLiteModel(content, args.threads)
        variants[label] = {"accuracy": accuracy_of(model.predict, data.test.x, data.test.y), "macs": macs,
                           "bytes": len(content), "runtime": model.runtime}
    for b in BATCHES:
        for label, ms in interleaved({k: c for k, (c, _) in flatbuffers.items()}, data.test.x, b, args).items():
            variants[label][f"batch{b}_ms"] = ms
    base = variants["float32"]
    for v in variants.values():
        for b in BATCHES:
            v[f"speedup_batch{b}"] = base[f"batch{b}_ms"] / v[f"batch{b}_ms"]
        v["drop_pts"] = (base["accuracy"] - v["accuracy"]) * 100
    doc = {
        "model": TITLES[name], "train_seconds": train_s, "channel_keep": keep, "channel_macs_share": share,
        "full_width_layers": len(result.full_width), "pruned_layers": len(result.kept), "variants": variants,
        "channel_pruned_drop_pts": variants["channel_pruned"]["drop_pts"],
        "channel_pruned_int8_drop_pts": variants["channel_pruned_int8"]["drop_pts"],
        "int8_drop_pts": variants["int8"]["drop_pts"], "round_to": round_to,
    }
    if exact is not None:
        doc.update(exact_width_keep=exact[0], exact_width_macs_share=exact[1])
        for label in ("exact_width", "exact_width_int8"):
            for b in BATCHES:
                doc[f"{label}_vs_float32_tflite_batch{b}"] = variants[label][f"speedup_batch{b}"]
    for label in GOALS:
        for b in BATCHES:
            doc[f"{label}_vs_float32_tflite_batch{b}"] = variants[label][f"speedup_batch{b}"]
    doc["meets_goals"] = all(doc[f"{k}_vs_float32_tflite_batch32"] >= g for k, g in GOALS.items()) and all(
        variants[k]["drop_pts"] <= MAX_DROP_PTS for k in GOALS)
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="LeNet-5 on 1,500 images, 1 epoch")
    ap.add_argument("--mnist", type=Path, default=Path(os.environ.get(
        "SHRINKFLEET_MNIST_DIR", ROOT.parent / "shared" / "datasets" / "mnist-t10k")))
    ap.add_argument("--models", nargs="+", choices=MODELS, default=None, help="default: both (quick: lenet5)")
    ap.add_argument("--runs", type=int, default=500, help="timed calls per variant and batch size (>= 200)")
    ap.add_argument("--threads", type=int, default=1, help="LiteRT interpreter threads")
    ap.add_argument("--macs-target", type=float, default=0.5, help="channel-pruned MACs / the model's")
    ap.add_argument("--round-to", type=int, default=None,
                    help="channel-pruned widths rounded up to a multiple of this (channels.round_to; default: "
                         "1 for LeNet-5, 8 for MobileNetV2); above 1, the same cut at exact widths is timed too")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/[quick-]latency.json)")
    args = ap.parse_args(argv)
    if args.runs < 200:
        ap.error("--runs must be at least 200 (a median of fewer calls is noise at these latencies)")
    models = args.models or (["lenet5"] if args.quick else list(MODELS))
    args.epochs = {"lenet5": 1 if args.quick else 6, "mobilenetv2": 1 if args.quick else 8}
    args.finetune_epochs = {"lenet5": 1 if args.quick else 3, "mobilenetv2": 1 if args.quick else 10}

    from shrinkfleet.config import SplitConfig
    from shrinkfleet.datasets import Prepared, Split, load_mnist, prepare
    from shrinkfleet.tfenv import reset

    reset(0)
    raw = load_mnist(args.mnist)
    data = prepare(raw, SplitConfig(test_fraction=0.2, val_fraction=0.1), seed=0,
                   **({"limit": 1500, "limit_test": 300} if args.quick else {}))
    results = {}
    for name in models:
        d = data
        if name == "mobilenetv2":
            splits = {s: Split(to_rgb32(getattr(data, s).x), getattr(data, s).y) for s in ("train", "val", "test")}
            d = Prepared(**splits, meta={**data.meta, "input_shape": [32, 32, 3]})
        print(f"\n=== {TITLES[name]}", flush=True)
        results[name] = run_model(name, d, args)
        r = results[name]
        rows = [{"variant": label, "accuracy %": f"{v['accuracy'] * 100:.2f}", "MACs": f"{v['macs']:,}",
                 "bytes": f"{v['bytes']:,}", **{f"b{b} ms": f"{v[f'batch{b}_ms']:.3f}" for b in BATCHES},
                 **{f"b{b} speed-up": f"{v[f'speedup_batch{b}']:.2f}x" for b in BATCHES}, "kernels": v["runtime"]}
                for label, v in r["variants"].items()]
        exact = (f"; exact widths: keep {r['exact_width_keep']:.3f} -> {r['exact_width_macs_share'] * 100:.0f}% MACs"
                 if "exact_width_keep" in r else "")
        print_table(rows, f"{TITLES[name]} on MNIST, {len(d.test)} test images, LiteRT {args.threads} thread(s); "
                          f"channel keep {r['channel_keep']:.3f} (round_to {r['round_to']}) -> "
                          f"{r['channel_macs_share'] * 100:.0f}% MACs{exact}")
        for label, goal in GOALS.items():
            s = r[f"{label}_vs_float32_tflite_batch32"]
            print(f"{label} vs float32 TFLite at batch 32: {s:.2f}x (goal >= {goal}x: {verdict(s >= goal)}), "
                  f"drop {r['variants'][label]['drop_pts']:.2f} pts (goal <= {MAX_DROP_PTS}: "
                  f"{verdict(r['variants'][label]['drop_pts'] <= MAX_DROP_PTS)})")
    headline = results.get("mobilenetv2") or next(iter(results.values()))
    top = {k: headline[k] for k in (*(f"{g}_vs_float32_tflite_batch{b}" for g in GOALS for b in BATCHES),
                                    "channel_pruned_drop_pts", "meets_goals")}
    path = write_results("latency", {
        "quick": args.quick, "round_to": headline["round_to"], "headline_model": headline["model"], "runs": args.runs,
        "threads": args.threads,
        "test_samples": len(data.test), "goals": {**GOALS, "max_drop_pts": MAX_DROP_PTS}, **top, "models": results,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
