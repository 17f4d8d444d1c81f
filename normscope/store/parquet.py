"""A minimal Parquet writer in numpy, so the training process never imports pyarrow or pandas.

Why: pyarrow's Python array constructors import pandas, and the two add ~80 MB to the resident
set of the process that trains (more than the whole collector on a small model). The run
directory is still standard Parquet: pyarrow (or anything else) reads it; the tests check
every column type round-trips through ``pyarrow.parquet``.

Scope: one row group, one uncompressed data page (v1, PLAIN values, RLE levels) per column;
required scalar columns (int64, int32, int8, float64, bool, UTF-8 string) and lists of
float32/int64 (3-level LIST: required group / repeated group ``list`` / required ``element``).
Metadata is Thrift compact protocol, written by hand below.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

# parquet.thrift enums
_T_BOOLEAN, _T_INT32, _T_INT64, _T_FLOAT, _T_DOUBLE, _T_BYTE_ARRAY = 0, 1, 2, 4, 5, 6
_REQUIRED, _REPEATED = 0, 2
_CT_UTF8, _CT_LIST, _CT_INT_8 = 0, 3, 15
_ENC_PLAIN, _ENC_RLE = 0, 3

# scalar column kinds: (physical type, converted type, numpy dtype)
_SCALARS = {
    "int64": (_T_INT64, None, "<i8"),
    "int32": (_T_INT32, None, "<i4"),
    "int8": (_T_INT32, _CT_INT_8, "<i4"),
    "float64": (_T_DOUBLE, None, "<f8"),
    "float32": (_T_FLOAT, None, "<f4"),
    "bool": (_T_BOOLEAN, None, None),
    "string": (_T_BYTE_ARRAY, _CT_UTF8, None),
}


# --- Thrift compact protocol ---------------------------------------------------------------
# compact types
_C_TRUE, _C_FALSE, _C_I32, _C_I64, _C_BINARY, _C_LIST, _C_STRUCT = 1, 2, 5, 6, 8, 9, 12


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


class _Struct:
    """Builds one compact-protocol struct; fields must be added in increasing id order."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.last = 0

    def _header(self, fid: int, ctype: int) -> None:
        delta = fid - self.last
        if 0 < delta <= 15:
            self.buf.append((delta << 4) | ctype)
        else:
            self.buf.append(ctype)
            self.buf += _varint(_zigzag(fid))
        self.last = fid

    def i32(self, fid: int, v: int) -> _Struct:
        self._header(fid, _C_I32)
        self.buf += _varint(_zigzag(v))
        return self

    def i64(self, fid: int, v: int) -> _Struct:
        self._header(fid, _C_I64)
        self.buf += _varint(_zigzag(v))
        return self

    def string(self, fid: int, v: str | bytes) -> _Struct:
        data = v.encode() if isinstance(v, str) else v
        self._header(fid, _C_BINARY)
        self.buf += _varint(len(data)) + data
        return self

    def struct(self, fid: int, s: _Struct) -> _Struct:
        self._header(fid, _C_STRUCT)
        self.buf += s.end()
        return self

    def lst(self, fid: int, ctype: int, items: Sequence) -> _Struct:
        self._header(fid, _C_LIST)
        n = len(items)
        self.buf += bytes([(n << 4) | ctype]) if n < 15 else bytes([0xF0 | ctype]) + _varint(n)
        for it in items:
            if ctype == _C_STRUCT:
                self.buf += it.end()
            elif ctype == _C_I32:
                self.buf += _varint(_zigzag(it))
            elif ctype == _C_BINARY:
                d = it.encode() if isinstance(it, str) else it
                self.buf += _varint(len(d)) + d
        return self

    def end(self) -> bytes:
        return bytes(self.buf) + b"\x00"


# --- encodings -----------------------------------------------------------------------------


def _rle_levels(levels: np.ndarray, bit_width: int) -> bytes:
    """RLE/bit-packed hybrid, prefixed by its 4-byte length (data page v1): 0/1 levels as one
    bit-packed run (``np.packbits``, no Python loop over runs; the padding bits of the last byte
    lie past the page's value count), other widths as RLE runs."""
    if bit_width == 1 and len(levels):
        body = _varint(((len(levels) + 7) // 8) << 1 | 1)
        body += np.packbits(np.asarray(levels, dtype=np.uint8), bitorder="little").tobytes()
        return struct.pack("<i", len(body)) + body
    out = bytearray()
    nbytes = (bit_width + 7) // 8
    if len(levels):
        change = np.flatnonzero(np.diff(levels)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(levels)]])
        for s, e in zip(starts.tolist(), ends.tolist()):
            out += _varint((e - s) << 1) + int(levels[s]).to_bytes(nbytes, "little")
    return struct.pack("<i", len(out)) + bytes(out)


def _string(v) -> bytes:
    e = str(v).encode()
    return struct.pack("<i", len(e)) + e


def _plain(kind: str, values: list) -> bytes:
    phys, _, dt = _SCALARS[kind]
    if kind == "string":  # (layer and column names repeat row after row: each distinct one encoded once)
        enc: dict = {}
        parts = []
        for v in values:
            try:
                b = enc.get(v)
            except TypeError:  # (an unhashable value: encoded as its str, uncached)
                b = _string(v)
            if b is None:
                b = enc[v] = _string(v)
            parts.append(b)
        return b"".join(parts)
    if kind == "bool":
        return np.packbits(np.asarray(values, dtype=bool), bitorder="little").tobytes()
    return np.asarray(values, dtype=dt).tobytes()


def _page(num_values: int, body: list[bytes]) -> list[bytes]:
    """A data page: its header, then the body's pieces (not joined: the file is joined once)."""
    size = sum(len(b) for b in body)
    dph = _Struct().i32(1, num_values).i32(2, _ENC_PLAIN).i32(3, _ENC_RLE).i32(4, _ENC_RLE)
    ph = _Struct().i32(1, 0).i32(2, size).i32(3, size).struct(5, dph)
    return [ph.end(), *body]


def _column_chunk(kind: str, values: list) -> tuple[list[bytes], int, int]:
    """Encoded pages of one column: (byte pieces, physical type, number of level entries)."""
    if kind.startswith("list<"):
        inner = kind[5:-1]
        dt = _SCALARS[inner][2]
        empty = np.empty(0, dtype=dt)
        # (a 1-D array is taken as it is, without a copy)
        arrays = [v.reshape(-1) if type(v) is np.ndarray else empty if v is None else np.ravel(v) for v in values]
        lens = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        per_row = np.maximum(lens, 1)  # an empty list still takes one level entry
        n_entries = int(per_row.sum())
        first = np.cumsum(per_row) - per_row
        rep = np.ones(n_entries, dtype=np.uint8)
        rep[first] = 0
        dfn = np.ones(n_entries, dtype=np.uint8)
        dfn[first[lens == 0]] = 0  # an empty list: one entry, not defined
        flat = np.concatenate(arrays).astype(dt, copy=False) if arrays else empty
        body = [_rle_levels(rep, 1), _rle_levels(dfn, 1), flat.tobytes()]
        return _page(n_entries, body), _SCALARS[inner][0], n_entries
    return _page(len(values), [_plain(kind, values)]), _SCALARS[kind][0], len(values)


def _schema_elements(columns: dict[str, str]) -> list[_Struct]:
    els = [_Struct().string(4, "schema").i32(5, len(columns))]
    for name, kind in columns.items():
        if kind.startswith("list<"):
            phys, conv, _ = _SCALARS[kind[5:-1]]
            els.append(_Struct().i32(3, _REQUIRED).string(4, name).i32(5, 1).i32(6, _CT_LIST))
            els.append(_Struct().i32(3, _REPEATED).string(4, "list").i32(5, 1))
            el = _Struct().i32(1, phys).i32(3, _REQUIRED).string(4, "element")
            els.append(el.i32(6, conv) if conv is not None else el)
        else:
            phys, conv, _ = _SCALARS[kind]
            el = _Struct().i32(1, phys).i32(3, _REQUIRED).string(4, name)
            els.append(el.i32(6, conv) if conv is not None else el)
    return els


def encode_parquet(columns: dict[str, str], data: dict[str, list]) -> bytes:
    """A whole Parquet file for ``data`` (column → values) with ``columns`` (column → kind)."""
    return b"".join(encode_parquet_pieces(columns, data))


def encode_parquet_pieces(columns: dict[str, str], data: dict[str, list]) -> list[bytes]:
    """The file of :func:`encode_parquet` as its pieces in order (written one after another, the
    file is never joined in memory)."""
    nrows = len(next(iter(data.values()))) if data else 0
    out = [b"PAR1"]
    offset = 4  # (after the magic; the columns' bytes in all: offset - 4)
    chunks = []
    for name, kind in columns.items():
        pieces, phys, n_entries = _column_chunk(kind, data[name])
        size = sum(len(b) for b in pieces)
        out += pieces
        path = [name, "list", "element"] if kind.startswith("list<") else [name]
        md = (
            _Struct().i32(1, phys).lst(2, _C_I32, [_ENC_PLAIN, _ENC_RLE]).lst(3, _C_BINARY, path).i32(4, 0)
            .i64(5, n_entries).i64(6, size).i64(7, size).i64(9, offset)
        )  # fmt: skip
        chunks.append(_Struct().i64(2, offset).struct(3, md))
        offset += size
    rg = _Struct().lst(1, _C_STRUCT, chunks).i64(2, offset - 4).i64(3, nrows)
    fmd = (
        _Struct().i32(1, 1).lst(2, _C_STRUCT, _schema_elements(columns)).i64(3, nrows)
        .lst(4, _C_STRUCT, [rg]).string(6, "normscope parquet writer")
    )  # fmt: skip
    meta = fmd.end()
    out += [meta, struct.pack("<i", len(meta)), b"PAR1"]
    return out
