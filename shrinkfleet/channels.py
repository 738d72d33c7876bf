"""Channel pruning: remove Dense units and convolution filters, giving a smaller dense model.

Magnitude pruning only zeroes weights, so the model runs no faster; this removes whole units
and filters, so every later step (magnitude pruning, clustering, QAT, int8) sees an ordinary,
smaller functional model.

Algorithm (:func:`prune_channels`):

1. A Sequential model is first rebuilt as a functional one (the input is never modified).
2. *Candidates* are Dense, Conv1D and Conv2D layers (``groups == 1``, channels last) called
   once, that are not an output of the model. From each candidate the graph is followed
   forward through layers that act per channel (BatchNormalization on the last axis,
   activations other than softmax, dropout, pooling, padding/cropping, DepthwiseConv,
   Flatten) to the layers that *consume* the channels (Dense, Conv1D/2D with ``groups == 1``,
   SeparableConv1D/2D). If every path ends at a consumer, the candidate is pruned; if one
   meets anything else — ``Concatenate``, Reshape, a softmax (as a layer or as the
   candidate's own activation), a custom or unknown layer, a nested model, a shared layer, or
   the model's output — the candidate is kept at full width and listed with the reason.
2b. *Equal-width groups*: the inputs of an element-wise merge (``Add``, ``Subtract``,
   ``Multiply``, ``Average``, ``Maximum``, ``Minimum``) must keep the same channels, so the
   layers that produce them are pruned together. Walking back from each merge input through
   layers that keep channel ``i`` as channel ``i`` (BatchNorm, activations, pooling, a
   depthwise layer with multiplier 1, ...) finds the layer that sets its channels; merges that
   feed each other join one group (a residual stage of ResNet or MobileNetV2: the projection
   convolutions of its blocks and its first block's input). A group is pruned only if every
   member is a candidate of the same width, and the paths from every member and merge end at
   consumers or at the group's own merges; otherwise every member is kept whole and listed
   with the reason (for example an identity shortcut from the model input). A group ranks
   channel ``j`` by the norm of all its members' kernel slices for ``j`` together (L1: their
   sum; L2: the root of their summed squares), over each member's *full* kernel: a member's
   inputs may depend on the group's own choice, so the restricted kernels are not known yet.
3. Walking the layers in graph order, each tensor carries the original indices of the
   channels it still has. A candidate ranks its output units by the L1 or L2 norm of its
   kernel slice (over the inputs it still receives), keeps the top ``ceil(keep * n)`` (at
   least 1) in their original order, and its bias with them. BatchNorm keeps gamma, beta,
   moving mean and variance of the kept channels; a DepthwiseConv keeps the kept channels
   (its output follows its input's width: channel ``c`` with multiplier ``m`` becomes
   ``c*m .. c*m+m-1``); Flatten maps channel ``c`` of an ``H x W x C`` map to the flat indices
   ``p*C + c`` for every position ``p``; a consumer keeps the matching input slices of its kernel.
   Ranking uses the kernel restricted to the inputs the layer still receives (after upstream
   layers were pruned), since those are the weights the smaller model computes with. Ties
   keep the earlier unit. ``keep`` as a dict names layers; layers not named keep all units;
   a group takes the largest fraction named for any of its members (all units if none is
   named), so naming one member prunes its whole group.
4. The new model is built with :func:`keras.models.clone_model` from the changed layer
   configs, and the kept weights are copied in. No fine-tuning happens here: the recipe step
   that calls this fine-tunes.

Limits: channels-first layers, grouped convolutions and Conv3D are neither pruned nor
followed; an element-wise merge fed by a reshape, a flatten, a depthwise layer with
multiplier > 1, the model input or a layer it does not know keeps its group whole (listed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from shrinkfleet.tfenv import keras

L = keras.layers

# Layers whose output has the same channels as their input, one for one, holding no weights.
_PASS = (L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.ThresholdedReLU, L.Dropout, L.SpatialDropout1D,
         L.SpatialDropout2D, L.GaussianDropout, L.GaussianNoise, L.AlphaDropout,
         L.MaxPooling1D, L.MaxPooling2D, L.AveragePooling1D, L.AveragePooling2D,
         L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalMaxPooling1D, L.GlobalMaxPooling2D,
         L.ZeroPadding1D, L.ZeroPadding2D, L.Cropping1D, L.Cropping2D, L.UpSampling1D, L.UpSampling2D)


@dataclass
class ChannelResult:
    """The pruned model and what happened to each layer.

    ``kept`` maps each pruned layer to the original indices of the units/filters it kept;
    ``total`` to its original count; ``full_width`` maps each layer kept whole to the reason.
    """

    model: keras.Model
    kept: dict[str, list[int]] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    full_width: dict[str, str] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> dict[str, tuple[int, int]]:
        """Layer name -> (kept, total) units, for the pruned layers."""
        return {name: (len(idx), self.total[name]) for name, idx in self.kept.items()}


def _fresh(layer, config=None):
    return layer.__class__.from_config(config if config is not None else layer.get_config())


def _functional(model: keras.Model) -> keras.Model:
    """A functional copy of ``model`` (same layer names and weights); a functional model is cloned."""
    if not model.built:
        raise ValueError(f"model {model.name!r} is not built: give it an input shape before pruning channels")
    if isinstance(model, keras.Sequential):
        inputs = keras.Input(batch_shape=model.input_shape, name=f"{model.name}_input")
        x = inputs
        for layer in model.layers:
            new = _fresh(layer)
            x = new(x)
            new.set_weights(layer.get_weights())
        return keras.Model(inputs, x, name=model.name)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _is_consumer(layer) -> bool:
    if isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):
        return layer.data_format == "channels_last"
    if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D, L.Conv1DTranspose, L.Conv2DTranspose)):
        return False
    if isinstance(layer, (L.Conv1D, L.Conv2D)):
        return layer.groups == 1 and layer.data_format == "channels_last"
    return isinstance(layer, L.Dense)


def _is_pass(layer) -> bool:
    if isinstance(layer, L.BatchNormalization):
        axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        rank = len(layer.input_shape)
        return [a % rank for a in axis] == [rank - 1]
    if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        return layer.data_format == "channels_last"
    if isinstance(layer, L.Flatten):
        return layer.data_format == "channels_last"
    if isinstance(layer, L.Activation):
        return layer.get_config()["activation"] not in ("softmax", "log_softmax")
    if isinstance(layer, _PASS):
        return getattr(layer, "data_format", "channels_last") == "channels_last"
    return False


def _graph(model: keras.Model):
    """(layer names in graph order, producers of each layer, consumers of each layer, output layer names)."""
    config = model.get_config()
    order = [entry["name"] for entry in config["layers"]]
    producers: dict[str, list[str]] = {}
    calls: dict[str, int] = {}
    for entry in config["layers"]:
        nodes = entry["inbound_nodes"]
        calls[entry["name"]] = len(nodes)
        names = []
        for node in nodes:
            for inbound in node if isinstance(node, list) else []:
                if isinstance(inbound, list) and inbound and isinstance(inbound[0], str):
                    names.append(inbound[0])
        producers[entry["name"]] = names
    consumers: dict[str, list[str]] = {name: [] for name in order}
    for name, ins in producers.items():
        for p in ins:
            consumers.setdefault(p, []).append(name)
    outputs = {entry[0] for entry in config["output_layers"]}
    return order, producers, consumers, calls, outputs


_MERGE = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)


def _blocker(model, start, consumers, calls, outputs, through=frozenset()) -> str | None:
    """Why ``start``'s channels cannot be removed, or None when every path ends at a consumer.

    Paths go on through the merges named in ``through`` (those of ``start``'s own group).
    """
    if start in outputs and start in through:
        return f"{start!r} is an output of the model"
    stack = [start]
    seen = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name != start and name in outputs:
            return f"its output reaches the model output through {name!r}"
        for nxt in consumers.get(name, []):
            layer = model.get_layer(nxt)
            kind = type(layer).__name__
            if calls.get(nxt, 1) > 1:
                return f"feeds the shared layer {nxt!r} ({kind})"
            if _is_consumer(layer):
                continue
            if _is_pass(layer) or nxt in through:
                stack.append(nxt)
                continue
            if isinstance(layer, _MERGE):
                return f"feeds {nxt!r} ({kind}), whose inputs must keep equal widths"
            if isinstance(layer, L.Concatenate):
                return f"feeds {nxt!r} (Concatenate), which is not followed"
            return f"feeds {nxt!r} ({kind}), which channel pruning does not follow"
    return None


def _identity(layer) -> bool:
    """Whether channel ``i`` of the layer's output is channel ``i`` of its single input."""
    if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        return _is_pass(layer) and layer.depth_multiplier == 1
    return _is_pass(layer) and not isinstance(layer, L.Flatten)


def _source(model, name: str, producers, calls) -> str:
    """The layer that sets the channels of ``name``'s output, walking back through :func:`_identity` layers."""
    while True:
        layer = model.get_layer(name)
        if isinstance(layer, _MERGE) or not _identity(layer) or len(producers[name]) != 1 or calls.get(name, 1) > 1:
            return name
        name = producers[name][0]


def _merge_groups(model, order, producers, calls) -> list[tuple[list[str], list[str]]]:
    """(members, merges) of each equal-width group, both in graph order (module docstring, 2b)."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    merges = [n for n in order if isinstance(model.get_layer(n), _MERGE)]
    for m in merges:
        for p in producers[m]:
            parent[find(_source(model, p, producers, calls))] = find(m)
    comps: dict[str, tuple[list[str], list[str]]] = {}
    for n in order:
        if n in parent:
            members, ms = comps.setdefault(find(n), ([], []))
            (ms if n in merges else members).append(n)
    return list(comps.values())


def _keep_fraction(keep, name: str) -> float:
    value = keep.get(name, 1.0) if isinstance(keep, dict) else keep
    return float(value)


def _validate(model, keep, norm) -> None:
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm: must be 'l1' or 'l2', got {norm!r}")
    values = keep.items() if isinstance(keep, dict) else [("keep", keep)]
    for name, value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"keep[{name!r}]: must be a fraction in (0, 1], got {value!r}"
                             if isinstance(keep, dict) else f"keep: must be a fraction in (0, 1], got {value!r}")
    if isinstance(keep, dict):
        names = {layer.name for layer in model.layers}
        unknown = sorted(set(keep) - names)
        if unknown:
            raise ValueError(f"keep: no layer named {', '.join(map(repr, unknown))} in model {model.name!r}")


def _score(kernel: np.ndarray, norm: str) -> np.ndarray:
    """Per output unit: the sum of |w| (l1) or of w**2 (l2, squared so group members add up)."""
    flat = kernel.reshape(-1, kernel.shape[-1])
    return np.abs(flat).sum(axis=0) if norm == "l1" else (flat.astype(np.float64) ** 2).sum(axis=0)


def _top(score: np.ndarray, n_keep: int) -> np.ndarray:
    # A stable sort keeps the earlier unit on ties, so keep=1.0 and equal norms are deterministic.
    top = np.argsort(-score, kind="stable")[:n_keep]
    return np.sort(top)


def _rank(kernel: np.ndarray, n_keep: int, norm: str) -> np.ndarray:
    return _top(_score(kernel, norm), n_keep)


def _count(fraction: float, total: int, round_to: int) -> int:
    """Units kept of ``total``: ``ceil(fraction * total)``, at least 1, rounded up to a multiple of
    ``round_to`` (never above ``total``)."""
    n = max(1, math.ceil(fraction * total))
    return min(total, -(-n // round_to) * round_to)


def prune_channels(model: keras.Model, keep: float | dict[str, float], norm: str = "l1",
                   round_to: int = 1) -> ChannelResult:
    """Remove the lowest-norm units/filters of each prunable layer; return the new model and a report.

    Args:
        model: a built Sequential or functional tf_keras model; it is not modified.
        keep: fraction of units/filters kept in every prunable layer, or a dict from layer name
            to fraction (layers not named keep all their units).
        norm: ``"l1"`` or ``"l2"``, the norm of each unit's kernel slice used to rank it.
        round_to: each layer's kept count is rounded up to a multiple of this (capped at its
            width): runtimes compute channels in SIMD tiles (XNNPACK: 4-16 floats), so 11 of
            16 filters can cost what 16 do.

    Raises:
        ValueError: ``keep`` outside (0, 1], an unknown layer name, an unknown norm,
            ``round_to`` below 1, or an unbuilt model.
    """
    _validate(model, keep, norm)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to: must be a whole number >= 1, got {round_to!r}")
    src = _functional(model)
    order, producers, consumers, calls, outputs = _graph(src)
    result = ChannelResult(model=src)

    def kind(name: str) -> str:
        return type(src.get_layer(name)).__name__

    def weighted(layer) -> bool:  # a Dense or plain convolution, the layers that can lose units
        return isinstance(layer, (L.Dense, L.Conv1D, L.Conv2D)) and not isinstance(
            layer, (L.DepthwiseConv1D, L.DepthwiseConv2D, L.SeparableConv1D, L.SeparableConv2D,
                    L.Conv1DTranspose, L.Conv2DTranspose))

    def refusal(name: str) -> str | None:  # why a weighted layer cannot lose units, paths aside
        layer = src.get_layer(name)
        if name in outputs:
            return "an output of the model (outputs are never pruned)"
        if layer.get_config().get("activation") in ("softmax", "log_softmax"):
            return "a softmax over its units (removing one changes the others)"
        if not _is_consumer(layer):
            return "grouped or channels-first convolution"
        if calls.get(name, 1) > 1:
            return "shared layer (called more than once)"
        return None

    candidates: set[str] = set()
    group_kept: dict[str, np.ndarray] = {}
    grouped: set[str] = set()
    for members, merges in _merge_groups(src, order, producers, calls):
        grouped.update(members)
        named = [_keep_fraction(keep, m) for m in members if not isinstance(keep, dict) or m in keep]
        fraction = max(named) if named else 1.0
        if fraction >= 1.0:
            continue
        reason = next((f"{m!r} is a shared layer" for m in merges if calls.get(m, 1) > 1), None)
        for m in members:
            if reason:
                break
            if not weighted(src.get_layer(m)):
                reason = f"{m!r} ({kind(m)}) sets channels that cannot be removed"
            elif (why := refusal(m)) is not None:
                reason = f"{m!r} is {why}"
        widths = {src.get_layer(m).get_weights()[0].shape[-1] for m in members if weighted(src.get_layer(m))}
        if reason is None and len(widths) > 1:
            reason = f"its members have different widths ({', '.join(map(str, sorted(widths)))})"
        for n in (*members, *merges):
            if reason is None and (why := _blocker(src, n, consumers, calls, outputs, frozenset(merges))):
                reason = f"{n!r}: {why}"
        if reason is not None:
            label = ", ".join(f"{m!r} ({kind(m)})" for m in merges)
            for m in members:
                if weighted(src.get_layer(m)):
                    result.full_width[m] = (f"feeds {label}, whose inputs keep equal widths; "
                                            f"its group is kept whole: {reason}")
            continue
        score = sum(_score(src.get_layer(m).get_weights()[0], norm) for m in members)
        kept = _top(score, _count(fraction, len(score), round_to))
        for m in members:
            group_kept[m] = kept
        candidates.update(members)
        result.groups[members[0]] = list(members)

    for name in order:
        layer = src.get_layer(name)
        if not weighted(layer) or name in grouped:
            continue
        if name in outputs:
            result.full_width[name] = refusal(name)
            continue
        if _keep_fraction(keep, name) >= 1.0:
            continue
        reason = refusal(name) or _blocker(src, name, consumers, calls, outputs)
        if reason:
            result.full_width[name] = reason
        else:
            candidates.add(name)

    # idx[name]: original indices of the channels of ``name``'s output, or None when all are there.
    idx: dict[str, np.ndarray | None] = {}
    weights: dict[str, list[np.ndarray]] = {}
    configs: dict[str, dict] = {}
    for name in order:
        layer = src.get_layer(name)
        ins = [idx.get(p) for p in producers[name]]
        merge = isinstance(layer, _MERGE)
        in_idx = ins[0] if len(ins) == 1 or merge else None
        if any(i is not None for i in ins) and not (_is_consumer(layer) or _is_pass(layer) or merge):
            raise AssertionError(f"channel pruning reached {name!r}, which it does not follow")  # _blocker guards
        if merge and any((a is None) != (in_idx is None) or (a is not None and not np.array_equal(a, in_idx))
                         for a in ins):
            raise AssertionError(f"the inputs of {name!r} kept different channels")  # the groups guard
        w = layer.get_weights()
        out_idx = in_idx if _is_pass(layer) or merge else None
        if _is_consumer(layer) and isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):
            if in_idx is not None:
                mult = layer.depth_multiplier
                rows = (in_idx[:, None] * mult + np.arange(mult)).ravel()
                w = [w[0][..., in_idx, :], w[1][..., rows, :], *w[2:]]
        elif _is_consumer(layer):
            kernel = w[0] if in_idx is None else w[0][..., in_idx, :]
            w = [kernel, *w[1:]]
            if name in candidates:
                total = kernel.shape[-1]
                kept = group_kept.get(name)
                if kept is None:
                    kept = _rank(kernel, _count(_keep_fraction(keep, name), total, round_to), norm)
                w = [kernel[..., kept], *(b[kept] for b in w[1:])]
                cfg = layer.get_config()
                cfg["units" if isinstance(layer, L.Dense) else "filters"] = len(kept)
                configs[name] = cfg
                result.kept[name] = kept.tolist()
                result.total[name] = int(total)
                out_idx = kept
        elif isinstance(layer, L.BatchNormalization) and in_idx is not None:
            w = [v[in_idx] for v in w]
        elif isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)) and in_idx is not None:
            mult = layer.depth_multiplier
            out_idx = (in_idx[:, None] * mult + np.arange(mult)).ravel()
            w = [w[0][..., in_idx, :], *(b[out_idx] for b in w[1:])]
        elif isinstance(layer, L.Flatten) and in_idx is not None:
            shape = layer.input_shape
            channels = int(shape[-1])
            positions = int(np.prod(shape[1:-1]))
            out_idx = (np.arange(positions)[:, None] * channels + in_idx[None, :]).ravel()
        idx[name] = out_idx
        weights[name] = w

    def clone(layer):
        return layer.__class__.from_config(configs.get(layer.name, layer.get_config()))

    new = keras.models.clone_model(src, clone_function=clone)
    for layer in new.layers:
        if not isinstance(layer, L.InputLayer):
            layer.set_weights(weights[layer.name])
    result.model = new
    return result


__all__ = ["ChannelResult", "prune_channels"]
