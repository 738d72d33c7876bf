"""Entropy coding of a TFLite variant's weights ("signature compression", as in Deep Compression).

A ``.tflite`` flatbuffer is split into its weight buffers (the constant kernels of
FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D ops) and everything else. Each weight tensor
becomes symbols over its own codebook (its distinct values: int8 codes, or the centroids of
a clustered float layer) and is stored either

- dense: one symbol per weight, or
- sparse: the gaps between non-zero weights (relative indices, 255 = "skip 255") plus one
  symbol per non-zero weight,

whichever the empirical entropy says is smaller. The symbol streams are coded with a Huffman
code or a range coder (``constriction``), each stream with its own frequency table, and the
rest of the flatbuffer is zstd-compressed with the weight bytes zeroed. Decoding rebuilds the
original flatbuffer byte for byte, so the decoded model's outputs equal the variant's.

Blob layout: ``b"SFC1"``, u32 header length, zlib(JSON header), the coded streams, zstd(rest).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"SFC1"
GAP_ESCAPE = 255  # a gap symbol of 255 advances 255 positions without a value
WEIGHT_OPS = {"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV"}
# Weights are coded as their bit patterns, so -0.0 and +0.0 (and every NaN) stay distinct: exact.
_DTYPES = {"int8": np.int8, "uint8": np.uint8, "float32": np.uint32, "float16": np.uint16}


class CodingError(ValueError):
    """A blob is not a shrinkfleet coded model, or is corrupt."""


@dataclass(frozen=True)
class WeightSpan:
    """Where one weight tensor's bytes sit in the flatbuffer."""

    start: int
    length: int
    dtype: str
    name: str


# ----------------------------------------------------------------------------- flatbuffer


def locate_weights(content: bytes) -> list[WeightSpan]:
    """The byte ranges of every weight tensor of weight-bearing ops (float16 followed through DEQUANTIZE)."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(content, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    spans: dict[int, WeightSpan] = {}
    for g in range(model.SubgraphsLength()):
        sub = model.Subgraphs(g)
        producer = {}
        ops = [sub.Operators(i) for i in range(sub.OperatorsLength())]
        for op in ops:
            for out in op.OutputsAsNumpy() if op.OutputsLength() else []:
                producer[int(out)] = op

        def opname(op: Any) -> str:
            code = model.OperatorCodes(op.OpcodeIndex())
            return names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "")

        for op in ops:
            if opname(op) not in WEIGHT_OPS or op.InputsLength() < 2:
                continue
            idx = int(op.Inputs(1))
            src = producer.get(idx)
            if src is not None and opname(src) == "DEQUANTIZE":
                idx = int(src.Inputs(0))
            if idx < 0 or idx in spans:
                continue
            tensor = sub.Tensors(idx)
            buf = model.Buffers(tensor.Buffer())
            o = flatbuffers.number_types.UOffsetTFlags.py_type(buf._tab.Offset(4))
            if not o or buf.DataLength() == 0:
                continue  # not a constant stored in the flatbuffer
            dtype = type_names.get(tensor.Type(), "")
            if dtype not in _DTYPES:
                continue
            spans[idx] = WeightSpan(buf._tab.Vector(o), buf.DataLength(), dtype, tensor.Name().decode())
    return sorted(spans.values(), key=lambda s: s.start)


# ----------------------------------------------------------------------------- symbol coding


def _table(symbols: np.ndarray) -> tuple[list[int], list[int]]:
    used, counts = np.unique(symbols, return_counts=True)
    return used.tolist(), counts.tolist()


def _entropy_bits(counts: list[int]) -> float:
    c = np.asarray(counts, dtype=np.float64)
    p = c / c.sum()
    return float(-(c * np.log2(p)).sum())


def _encode_stream(symbols: np.ndarray, coder: str) -> tuple[dict[str, Any], bytes]:
    """Code one stream; returns its header entry (table) and payload."""
    used, counts = _table(symbols) if len(symbols) else ([], [])
    entry = {"n": len(symbols), "used": used, "counts": counts}
    if len(used) <= 1:
        return entry, b""
    dense = np.searchsorted(np.asarray(used), symbols).astype(np.int32)
    probs = np.asarray(counts, dtype=np.float64)
    if coder == "range":
        import constriction

        enc = constriction.stream.queue.RangeEncoder()
        enc.encode(dense, constriction.stream.model.Categorical(probs / probs.sum(), perfect=False))
        return entry, enc.get_compressed().astype("<u4").tobytes()
    import constriction

    enc = constriction.symbol.QueueEncoder()
    tree = constriction.symbol.huffman.EncoderHuffmanTree(probs)
    for s in dense.tolist():
        enc.encode_symbol(s, tree)
    words, _bits = enc.get_compressed()
    return entry, np.asarray(words, dtype="<u4").tobytes()


def _decode_stream(entry: dict[str, Any], payload: bytes, coder: str) -> np.ndarray:
    n, used, counts = entry["n"], entry["used"], entry["counts"]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if len(used) == 1:
        return np.full(n, used[0], dtype=np.int64)
    probs = np.asarray(counts, dtype=np.float64)
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    import constriction

    if coder == "range":
        dec = constriction.stream.queue.RangeDecoder(words)
        dense = dec.decode(constriction.stream.model.Categorical(probs / probs.sum(), perfect=False), n)
    else:
        dec = constriction.symbol.QueueDecoder(words)
        tree = constriction.symbol.huffman.DecoderHuffmanTree(probs)
        dense = np.fromiter((dec.decode_symbol(tree) for _ in range(n)), dtype=np.int64, count=n)
    return np.asarray(used, dtype=np.int64)[np.asarray(dense, dtype=np.int64)]


def _gaps(nonzero: np.ndarray) -> np.ndarray:
    """Relative indices of non-zero positions, with GAP_ESCAPE runs for long gaps."""
    out: list[int] = []
    prev = -1
    for pos in nonzero.tolist():
        gap = pos - prev - 1
        while gap >= GAP_ESCAPE:
            out.append(GAP_ESCAPE)
            gap -= GAP_ESCAPE
        out.append(gap)
        prev = pos
    return np.asarray(out, dtype=np.int64)


def gap_positions(gaps: np.ndarray) -> np.ndarray:
    pos, out = -1, []
    skip = 0
    for g in gaps.tolist():
        if g == GAP_ESCAPE:
            skip += GAP_ESCAPE
            continue
        pos += skip + g + 1
        skip = 0
        out.append(pos)
    return np.asarray(out, dtype=np.int64)


_TABLE_BYTES = 3  # what one used symbol's frequency entry costs in the compressed header, roughly


def _stream_cost(symbols: np.ndarray, coder: str) -> float:
    """Estimated bytes of one coded stream: entropy plus its frequency table.

    A Huffman code spends at least one bit per symbol (a range coder does not), which
    decides dense vs sparse for very sparse tensors.
    """
    if not len(symbols):
        return 0.0
    counts = np.unique(symbols, return_counts=True)[1]
    bits = _entropy_bits(counts.tolist())
    if coder == "huffman" and len(counts) > 1:
        bits = max(bits, float(len(symbols)))
    return bits / 8 + _TABLE_BYTES * len(counts)


def _tensor_streams(values: np.ndarray, coder: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """Codebook and symbol streams of one weight tensor, dense or sparse.

    Returns None when coding would not beat leaving the bytes to zstd with the rest of the
    flatbuffer (an unclustered float tensor has about as many distinct values as weights).
    """
    import zstandard

    flat = values.reshape(-1)
    book = np.unique(flat)
    if len(book) > 65536:
        return None
    idx = np.searchsorted(book, flat)
    book_bytes = len(book) * flat.dtype.itemsize
    info: dict[str, Any] = {"book": _pack(book), "count": len(flat)}
    best = ("dense", {"values": idx}, _stream_cost(idx, coder))
    if np.any(book == 0):
        nz = np.flatnonzero(flat != 0)
        streams = {"gaps": _gaps(nz), "values": idx[nz]}
        cost = sum(_stream_cost(s, coder) for s in streams.values())
        if cost < best[2]:
            best = ("sparse", streams, cost)
    raw = len(zstandard.ZstdCompressor(level=19).compress(flat.tobytes()))
    if best[2] + book_bytes >= raw:
        return None
    return info | {"mode": best[0]}, best[1]


def _pack(book: np.ndarray) -> str:
    import base64

    return base64.b64encode(np.ascontiguousarray(book).astype(book.dtype.newbyteorder("<")).tobytes()).decode()


def _unpack(text: str, dtype: str) -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(text), dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<")).astype(
        _DTYPES[dtype])


# ----------------------------------------------------------------------------- blob


def encode(content: bytes, coder: str = "range") -> bytes:
    """The coded blob of a flatbuffer (``coder``: ``range`` or ``huffman``)."""
    if coder not in ("range", "huffman"):
        raise ValueError(f"unknown coder {coder!r}; one of range, huffman")
    import zstandard

    rest = bytearray(content)
    tensors, payloads = [], []
    for span in locate_weights(content):
        values = np.frombuffer(content, dtype=_DTYPES[span.dtype], count=span.length // np.dtype(_DTYPES[span.dtype])
                               .itemsize, offset=span.start)
        streams = _tensor_streams(values, coder)
        if streams is None:
            continue
        info, symbol_streams = streams
        entry = {"start": span.start, "length": span.length, "dtype": span.dtype, **info, "streams": {}}
        for key, symbols in symbol_streams.items():
            table, payload = _encode_stream(symbols, coder)
            entry["streams"][key] = {**table, "bytes": len(payload)}
            payloads.append(payload)
        tensors.append(entry)
        rest[span.start: span.start + span.length] = bytes(span.length)
    header = {"coder": coder, "size": len(content), "tensors": tensors}
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    tail = zstandard.ZstdCompressor(level=19).compress(bytes(rest))
    return MAGIC + struct.pack("<I", len(head)) + head + b"".join(payloads) + tail


def decode(blob: bytes) -> bytes:
    """The original flatbuffer, byte for byte.

    Raises:
        CodingError: not a shrinkfleet blob, or its parts do not add up.
    """
    import zstandard

    if blob[:4] != MAGIC or len(blob) < 8:
        raise CodingError("not a shrinkfleet coded model (bad magic)")
    (head_len,) = struct.unpack("<I", blob[4:8])
    try:
        header = json.loads(zlib.decompress(blob[8: 8 + head_len]))
    except (zlib.error, ValueError) as exc:
        raise CodingError(f"corrupt header: {exc}") from None
    pos = 8 + head_len
    decoded: list[tuple[int, bytes]] = []
    for t in header["tensors"]:
        streams = {}
        for key, s in t["streams"].items():
            streams[key] = _decode_stream(s, blob[pos: pos + s["bytes"]], header["coder"])
            pos += s["bytes"]
        book = _unpack(t["book"], t["dtype"])
        if t["mode"] == "dense":
            values = book[streams["values"]]
        else:
            values = np.zeros(t["count"], dtype=book.dtype)
            values[gap_positions(streams["gaps"])] = book[streams["values"]]
        data = values.astype(_DTYPES[t["dtype"]]).tobytes()
        if len(data) != t["length"]:
            raise CodingError(f"tensor at {t['start']}: decoded {len(data)} bytes, expected {t['length']}")
        decoded.append((t["start"], data))
    rest = bytearray(zstandard.ZstdDecompressor().decompress(blob[pos:], max_output_size=header["size"]))
    if len(rest) != header["size"]:
        raise CodingError(f"decoded {len(rest)} bytes, header says {header['size']}")
    for start, data in decoded:
        rest[start: start + len(data)] = data
    return bytes(rest)


def measure(content: bytes) -> dict[str, float]:
    """Coded sizes of one flatbuffer: Huffman, range, and zlib/zstd on the same weight bytes.

    ``coded_bytes`` is the smaller entropy-coded blob; ``bits_per_nonzero`` divides its
    weight payload (streams and tables) by the non-zero weight count.
    """
    import zstandard

    spans = locate_weights(content)
    weights = b"".join(content[s.start: s.start + s.length] for s in spans)
    rest = bytearray(content)
    nonzero = total = 0
    for s in spans:
        arr = np.frombuffer(content, dtype=_DTYPES[s.dtype], count=s.length // np.dtype(_DTYPES[s.dtype]).itemsize,
                            offset=s.start)
        # Count non-zero *values*; a float's -0.0 bit pattern is still zero.
        real = arr.view({"float32": np.float32, "float16": np.float16}.get(s.dtype, arr.dtype))
        nonzero += int(np.count_nonzero(real))
        total += arr.size
        rest[s.start: s.start + s.length] = bytes(s.length)
    rest_z = len(zstandard.ZstdCompressor(level=19).compress(bytes(rest)))
    huffman = len(encode(content, "huffman"))
    range_ = len(encode(content, "range"))
    coded = min(huffman, range_)
    return {
        "coded_bytes": coded,
        "huffman_bytes": huffman,
        "range_bytes": range_,
        "zlib_bytes": rest_z + len(zlib.compress(weights, 9)) + 8,
        "zstd_bytes": rest_z + len(zstandard.ZstdCompressor(level=19).compress(weights)) + 8,
        "weights": total,
        "nonzero_weights": nonzero,
        "bits_per_nonzero": 8.0 * max(coded - rest_z, 0) / nonzero if nonzero else 0.0,
    }
