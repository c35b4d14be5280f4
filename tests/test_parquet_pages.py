"""dap_ray.data.parquet_pages: single-value reads of binary/string Parquet columns against pyarrow."""

import collections
import itertools
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dap_ray.data import parquet_pages
from dap_ray.data.parquet_pages import ColumnPages, UnsupportedParquet, read_value, scan_column_pages

TYPES = [pa.binary(), pa.large_binary(), pa.string(), pa.large_string()]
CODECS = ["NONE", "SNAPPY", "GZIP", "ZSTD", "BROTLI", "LZ4"]  # pyarrow writes "LZ4" as LZ4_RAW


def make_values(rng: np.random.Generator, n: int, nullable: bool, text: bool) -> list:
    """n values: a pool of repeated short ones first (so dictionary pages get used), then unique
    ones that overflow the small dictionary limit (fallback to PLAIN in the same chunk), with
    empty values, a few larger than the data page size, and ~15% nulls when nullable."""

    def one(size):
        if text:  # includes multi-byte UTF-8
            return "".join(map(chr, rng.choice([*range(97, 123), 0xE9, 0x4E2D, 0x1F600], size)))
        return rng.bytes(size)

    pool = [one(int(s)) for s in rng.integers(0, 40, 12)] + [one(0)]
    values = [pool[int(i)] for i in rng.integers(0, len(pool), n // 2)]
    values += [one(int(s)) for s in rng.integers(0, 300, n - n // 2)]
    if nullable:
        values = [None if rng.random() < 0.15 else v for v in values]
    for i in rng.choice(n - 1, min(n, 2), replace=False) if n > 2 else []:
        # Bigger than data_page_size: pyarrow ends a page after such a value, so the second is alone in one.
        values[i : i + 2] = one(6000), one(7000)
    return values


def write(table: pa.Table, path, **options) -> None:
    """pq.write_table with small pages and row groups; write_batch_size=1 because pyarrow
    only ends pages (and falls back from the dictionary) between write batches."""
    defaults = {"row_group_size": 80, "data_page_size": 2048, "dictionary_pagesize_limit": 1024, "write_batch_size": 1}
    pq.write_table(table, path, **{**defaults, **options})


def as_bytes(values: list) -> list:
    return [v.encode() if isinstance(v, str) else v for v in values]


def read_all(path, column: str = "x") -> tuple[ColumnPages, list]:
    pages = scan_column_pages(path, column)
    fd, cache = os.open(path, os.O_RDONLY), {}
    try:
        return pages, [read_value(fd, pages, row, cache) for row in range(pages.num_rows)]
    finally:
        os.close(fd)


def page_encodings(path, pages: ColumnPages) -> set:
    """Parquet encodings of the data pages, read from their headers."""
    fd = os.open(path, os.O_RDONLY)
    try:
        headers = [parquet_pages._read_page(fd, int(o), int(n))[0] for o, n in zip(pages.offset, pages.length)]
    finally:
        os.close(fd)
    return {h[5][2] if 5 in h else h[8][4] for h in headers}


Case = collections.namedtuple("Case", "rows codec version dictionary nullable dtype page_index stats crc encoding")
CASES = [Case(0, "NONE", "1.0", True, True, pa.binary(), True, True, False, None)]  # an empty file
for i, (codec, version, dictionary, nullable, dtype) in enumerate(
    itertools.product(CODECS, ["1.0", "2.0"], [True, False], [True, False], TYPES)
):  # page index, statistics and CRCs in about 1/3, 4/7 and 1/5 of the cases, uncorrelated
    CASES.append(Case(200, codec, version, dictionary, nullable, dtype, i % 3 == 0, i % 7 < 4, i % 5 == 0, None))
for encoding, version in itertools.product(["DELTA_LENGTH_BYTE_ARRAY", "DELTA_BYTE_ARRAY"], ["1.0", "2.0"]):
    CASES.append(Case(200, "SNAPPY", version, False, True, pa.string(), False, False, True, encoding))


def case_id(c: Case) -> str:
    kind = c.encoding or ("dict" if c.dictionary else "plain")
    return f"{c.rows}rows-{c.codec}-v{c.version[0]}-{kind}-{'null' if c.nullable else 'nonull'}-{c.dtype}"


@pytest.mark.parametrize("seed,c", list(enumerate(CASES)), ids=[case_id(c) for c in CASES])
def test_read_value_matches_pyarrow(tmp_path, seed, c):
    rng = np.random.default_rng(seed)
    text = pa.types.is_string(c.dtype) or pa.types.is_large_string(c.dtype)
    table = pa.table({"x": pa.array(make_values(rng, c.rows, c.nullable, text), c.dtype), "y": np.arange(c.rows)})
    path = tmp_path / "t.parquet"
    write(
        table, path, compression=c.codec, data_page_version=c.version, use_dictionary=c.dictionary and not c.encoding,
        column_encoding={"x": c.encoding} if c.encoding else None, write_page_index=c.page_index,
        write_statistics=c.stats, write_page_checksum=c.crc,
    )  # fmt: skip

    pages, got = read_all(path)

    assert got == as_bytes(pq.read_table(path).column("x").to_pylist())
    assert pages.num_rows == c.rows and pages.max_definition_level == 1
    if c.rows:
        assert len(pages.offset) > 2 * pq.read_metadata(path).num_row_groups > 2  # several pages per chunk
        if not c.dictionary:
            assert 1 in np.diff(pages.first_row)  # a large value alone in its page
        assert pages.first_row[0] == 0 and np.all(np.diff(pages.first_row) > 0)
        assert (len(pages.dict_offset) > 0) == c.dictionary
        if c.dictionary:  # dictionary fallback: dictionary-encoded and PLAIN pages in one chunk
            assert page_encodings(path, pages) == {0, 8}  # PLAIN, RLE_DICTIONARY
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(IndexError):
            read_value(fd, pages, c.rows)
        with pytest.raises(IndexError):
            read_value(fd, pages, -1)
    finally:
        os.close(fd)


def test_required_column(tmp_path, rng):
    values = make_values(rng, 120, nullable=False, text=False)
    schema = pa.schema([pa.field("x", pa.large_binary(), nullable=False)])
    path = tmp_path / "t.parquet"
    write(pa.table({"x": values}, schema), path)

    pages, got = read_all(path)

    assert pages.max_definition_level == 0 and got == values


def test_one_pread_of_the_page_per_plain_value(tmp_path, rng, monkeypatch):
    values = make_values(rng, 300, nullable=True, text=False)
    path = tmp_path / "t.parquet"
    write(pa.table({"x": values}), path, row_group_size=150, use_dictionary=False, compression="ZSTD")
    pages = scan_column_pages(path, "x")
    group_size = pq.read_metadata(path).row_group(0).column(0).total_compressed_size
    calls = []
    real_pread = os.pread
    monkeypatch.setattr(parquet_pages.os, "pread", lambda fd, n, off: calls.append((n, off)) or real_pread(fd, n, off))
    fd = os.open(path, os.O_RDONLY)
    try:
        for row in range(0, 300, 7):
            calls.clear()
            assert read_value(fd, pages, row) == values[row]
            p = np.searchsorted(pages.first_row, row, side="right") - 1
            assert calls == [(pages.length[p], pages.offset[p])]
            assert pages.length[p] < group_size / 4
    finally:
        os.close(fd)


def test_dictionary_page_read_once_with_cache(tmp_path, monkeypatch):
    values = [b"cat", b"dog", None, b""] * 50
    path = tmp_path / "t.parquet"
    write(pa.table({"x": values}), path, data_page_size=64)
    pages = scan_column_pages(path, "x")
    calls = []
    real_pread = os.pread
    monkeypatch.setattr(parquet_pages.os, "pread", lambda fd, n, off: calls.append(off) or real_pread(fd, n, off))
    fd, cache = os.open(path, os.O_RDONLY), {}
    try:
        assert [read_value(fd, pages, r, cache) for r in range(len(values))] == values
        assert sorted(o for o in calls if o in pages.dict_offset) == sorted(pages.dict_offset)  # each once
        assert len(calls) == len(values) + len(pages.dict_offset) and len(cache) == 3  # one per row group
        calls.clear()
        assert read_value(fd, pages, 1) == b"dog" and len(calls) == 2  # without a cache: page + dictionary
    finally:
        os.close(fd)


def test_format_version_1_plain_dictionary_pages(tmp_path, rng):
    values = make_values(rng, 200, nullable=True, text=False)
    path = tmp_path / "t.parquet"
    write(pa.table({"x": values}), path, version="1.0")

    pages, got = read_all(path)

    assert got == values and page_encodings(path, pages) == {0, 2}  # PLAIN, PLAIN_DICTIONARY


def test_unsupported_columns(tmp_path):
    path = tmp_path / "t.parquet"
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face's Image feature
    image = pa.array([{"bytes": b"\x89PNG", "path": "a.png"}], image_type)
    pq.write_table(pa.table({"image": image, "label": [3], "tags": [[b"a"]]}), path)

    with pytest.raises(UnsupportedParquet, match="nested"):
        scan_column_pages(path, "image")
    with pytest.raises(UnsupportedParquet, match="INT64, not BYTE_ARRAY"):
        scan_column_pages(path, "label")
    with pytest.raises(UnsupportedParquet, match="nested"):
        scan_column_pages(path, "tags")
    with pytest.raises(UnsupportedParquet, match="repeated"):
        scan_column_pages(path, "tags.list.element")
    with pytest.raises(KeyError):
        scan_column_pages(path, "missing")


def test_corrupt_pages_raise_value_error(tmp_path):
    value = b"abc" * 100
    for crc, match in [(True, "CRC mismatch"), (False, "runs past the end")]:
        path = tmp_path / f"{crc}.parquet"
        pq.write_table(pa.table({"x": [value] * 4}), path, use_dictionary=False, compression="NONE",
                       write_page_checksum=crc, write_statistics=False)  # fmt: skip
        data = bytearray(path.read_bytes())
        start = data.index(value) - 4
        data[start : start + 4] = (1 << 30).to_bytes(4, "little")  # the first value's length prefix
        path.write_bytes(bytes(data))

        with pytest.raises(ValueError, match=match):
            read_all(path)
