"""The hand-written Parquet writer round-trips every column kind through pyarrow."""

import io
import math

import numpy as np
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from normscope.store.parquet import encode_parquet

KINDS = {
    "i64": "int64", "i32": "int32", "i8": "int8", "f64": "float64", "b": "bool", "s": "string",
    "lf": "list<float32>", "li": "list<int64>",
}  # fmt: skip


def read(data: bytes):
    return pq.read_table(io.BytesIO(data)).to_pydict()


def test_all_kinds_round_trip():
    rows = {
        "i64": [0, -1, 2**40, -(2**62)],
        "i32": [1, -2, 2**30, 0],
        "i8": [1, -1, 127, -128],
        "f64": [0.5, math.nan, -math.inf, 1e300],
        "b": [True, False, True, True],
        "s": ["", "layer1.0.conv1", "<script>alert(1)</script>", "ünïcödé ✓"],
        "lf": [[], [1.5], list(np.arange(40, dtype=np.float32)), [math.nan, -0.0]],
        "li": [[3, 4], [], [2**50], list(range(20))],
    }
    got = read(encode_parquet(KINDS, rows))
    for k in ("i64", "i32", "i8", "b", "s", "li"):
        assert got[k] == rows[k], k
    assert got["f64"][0] == 0.5 and math.isnan(got["f64"][1]) and got["f64"][2] == -math.inf
    assert got["lf"][0] == [] and got["lf"][1] == [1.5] and got["lf"][2] == list(range(40))
    assert math.isnan(got["lf"][3][0]) and got["lf"][3][1] == 0.0
    schema = pq.read_schema(io.BytesIO(encode_parquet(KINDS, rows)))
    assert str(schema.field("i8").type) == "int8" and str(schema.field("s").type) == "string"


def test_zero_rows():
    got = read(encode_parquet({"a": "int64", "l": "list<float32>"}, {"a": [], "l": []}))
    assert got == {"a": [], "l": []}


@settings(max_examples=40, deadline=None)
@given(
    ints=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=300),
    data=st.data(),
)
def test_random_columns(ints, data):
    n = len(ints)
    lists = data.draw(st.lists(st.lists(st.integers(-(2**40), 2**40), max_size=30), min_size=n, max_size=n))
    floats = data.draw(st.lists(st.floats(allow_nan=False, width=64), min_size=n, max_size=n))
    texts = data.draw(st.lists(st.text(max_size=20), min_size=n, max_size=n))
    got = read(encode_parquet(
        {"i": "int64", "l": "list<int64>", "f": "float64", "t": "string"},
        {"i": ints, "l": lists, "f": floats, "t": texts},
    ))  # fmt: skip
    assert got["i"] == ints and got["l"] == lists and got["f"] == floats and got["t"] == texts


def test_list_values_of_any_array_kind_and_the_pieces_join_to_the_file():
    """Rows as the collector hands them (float32/float64/int arrays, 2-D arrays, None, lists; the
    same string over and over) round-trip, and the pieces the writer streams are the file."""
    from normscope.store.parquet import encode_parquet_pieces

    kinds = {"s": "string", "lf": "list<float32>", "li": "list<int64>"}
    rows = {
        "s": ["conv1", "conv1", None, "conv1", "bn"],
        "lf": [np.arange(3, dtype=np.float32), np.array([[0.5, 1.5]], dtype=np.float64), None, [2.0], np.zeros(0)],
        "li": [np.array([1, 2], dtype=np.int32), None, np.arange(4).reshape(2, 2), [7], np.array(9)],
    }
    data = encode_parquet(kinds, rows)
    assert b"".join(encode_parquet_pieces(kinds, rows)) == data
    got = read(data)
    assert got["s"] == ["conv1", "conv1", "None", "conv1", "bn"]
    assert got["lf"] == [[0.0, 1.0, 2.0], [0.5, 1.5], [], [2.0], []]
    assert got["li"] == [[1, 2], [], [0, 1, 2, 3], [7], [9]]
