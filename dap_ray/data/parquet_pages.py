"""Random access to single values of a flat binary/string Parquet column.

pyarrow can only read whole row groups (`ParquetFile.read_row_group`), which for an
image dataset decodes 100+ MB to return one image. Parquet itself is finer grained:
a column chunk is a run of pages, each a Thrift page header followed by a
(compressed) body, and pages hold whole rows. So `scan_column_pages` walks the page
headers once (reading only the header bytes) and records where each data page starts,
and `read_value` then fetches any row's value with one `os.pread` of its data page,
plus, for dictionary-encoded pages, one read of the chunk's dictionary page that the
caller may cache.

What one read costs depends on the writer's pages. pyarrow ends a page (and falls back
from dictionary to PLAIN encoding) only between write batches (`write_batch_size`,
default 1024 rows), so with its defaults a chunk of up to 1024 rows is a single page, or
a dictionary page holding all its values; `write_batch_size=1` or
`use_content_defined_chunking=True` give pages of about `data_page_size`.

Supported: flat BYTE_ARRAY columns (binary, large_binary, string, large_string),
required or optional (max definition level <= 1); DataPage v1 and v2; dictionary
pages and PLAIN / PLAIN_DICTIONARY / RLE_DICTIONARY / DELTA_LENGTH_BYTE_ARRAY /
DELTA_BYTE_ARRAY data pages, mixed within a chunk (pyarrow's dictionary fallback);
codecs UNCOMPRESSED, SNAPPY, GZIP, BROTLI, ZSTD, LZ4_RAW and Hadoop-framed LZ4;
page CRCs (verified when present). Everything else raises `UnsupportedParquet` at
scan time or `ValueError` at read time. Formats: apache/parquet-format
(parquet.thrift, Encodings.md, Compression.md), Thrift's compact protocol spec.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# parquet.thrift enums.
_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
_PLAIN, _PLAIN_DICTIONARY, _BIT_PACKED = 0, 2, 4
_DELTA_LENGTH_BYTE_ARRAY, _DELTA_BYTE_ARRAY, _RLE_DICTIONARY = 6, 7, 8
_LZ4_HADOOP = 5
# pyarrow's ColumnChunkMetaData.compression name -> Parquet CompressionCodec. pyarrow
# names LZ4_RAW "LZ4" and has no name for the deprecated Hadoop-framed LZ4 (codec 5),
# which it maps to Arrow's LZ4_HADOOP and reports as "UNKNOWN".
_CODEC_IDS = {"UNCOMPRESSED": 0, "SNAPPY": 1, "GZIP": 2, "BROTLI": 4, "UNKNOWN": _LZ4_HADOOP, "ZSTD": 6, "LZ4": 7}
_ARROW_CODECS = {1: "snappy", 2: "gzip", 4: "brotli", 6: "zstd", 7: "lz4_raw"}
_U32 = struct.Struct("<I")


class UnsupportedParquet(ValueError):
    """A column this module cannot index (the message says why: nested/struct column,
    not BYTE_ARRAY, repeated, encrypted, unknown codec...)."""


@dataclass(frozen=True)
class ColumnPages:
    """Page table of one column of one Parquet file, enough to read any row's value with one pread."""

    num_rows: int
    first_row: np.ndarray  # (p,) int64: file-global row index of each data page's first row, increasing
    offset: np.ndarray  # (p,) int64: byte offset of the page header in the file
    length: np.ndarray  # (p,) int64: page header + compressed body, in bytes
    dictionary: np.ndarray  # (p,) int32: index into dict_offset/dict_length of the chunk's dictionary page, or -1
    codec: np.ndarray  # (p,) int8: Parquet CompressionCodec enum of the page's column chunk
    dict_offset: np.ndarray  # (d,) int64
    dict_length: np.ndarray  # (d,) int64
    max_definition_level: int  # 0 (required) or 1 (optional)


# --- Thrift compact protocol (header bytes running out raise IndexError) ----------------

_FIXED_SIZE = {1: 0, 2: 0, 3: 1, 7: 8, 13: 16}  # compact type -> bytes; field bools live in the field header


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte, pos = buf[pos], pos + 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _skip(buf, pos: int, ftype: int, element: bool = False) -> int:
    """Position after one value of compact type `ftype` (a list/set/map element if `element`)."""
    if ftype in (1, 2) and element:  # element booleans take a byte
        return pos + 1
    if ftype in _FIXED_SIZE:
        return pos + _FIXED_SIZE[ftype]
    if ftype in (4, 5, 6):
        return _varint(buf, pos)[1]
    if ftype == 8:
        n, pos = _varint(buf, pos)
        return pos + n
    if ftype == 12:
        return _struct(buf, pos)[1]
    if ftype in (9, 10):  # list/set: size in the high nibble, or 15 and a varint
        n, types, pos = buf[pos] >> 4, (buf[pos] & 0x0F,), pos + 1
        if n == 15:
            n, pos = _varint(buf, pos)
    elif ftype == 11:  # map: varint size, then key/value types unless empty
        n, pos = _varint(buf, pos)
        types, pos = ((buf[pos] >> 4, buf[pos] & 0x0F), pos + 1) if n else ((), pos)
    else:
        raise ValueError(f"unknown Thrift compact type {ftype}")
    if all(t in _FIXED_SIZE for t in types):  # jump, so a corrupt huge size cannot spin here
        return pos + n * sum(_FIXED_SIZE[t] or 1 for t in types)
    for _ in range(n):
        for etype in types:
            pos = _skip(buf, pos, etype, True)
    return pos


def _struct(buf, pos: int, nested: tuple[int, ...] = ()) -> tuple[dict, int]:
    """Decode a compact-protocol struct at buf[pos] into ({field id: value}, end), keeping
    integers, booleans and the sub-structs whose ids are in `nested`; other fields are skipped."""
    fields, fid = {}, 0
    while True:
        ftype, delta, pos = buf[pos] & 0x0F, buf[pos] >> 4, pos + 1
        if ftype == 0:
            if pos > len(buf):  # a skip jumped past the end
                raise IndexError("Thrift struct runs past the buffer")
            return fields, pos
        if delta:
            fid += delta
        else:
            fid, pos = _varint(buf, pos)
            fid = _zigzag(fid)
        if ftype in (1, 2):
            fields[fid] = ftype == 1
        elif ftype in (4, 5, 6):
            fields[fid], pos = _varint(buf, pos)
            fields[fid] = _zigzag(fields[fid])
        elif ftype == 12 and fid in nested:
            fields[fid], pos = _struct(buf, pos)
        else:
            pos = _skip(buf, pos, ftype)


def _page_header(buf) -> tuple[dict, int]:
    """(PageHeader fields, header length), with the data page / dictionary / v2 headers
    (fields 5, 7, 8) as dicts. IndexError when `buf` ends inside the header."""
    header, pos = _struct(buf, 0, nested=(5, 7, 8))
    sub = {_DATA_PAGE: 5, _DICTIONARY_PAGE: 7, _DATA_PAGE_V2: 8}.get(header.get(1))
    if header.get(3, -1) < 0 or (sub is not None and sub not in header):
        raise ValueError(f"malformed page header {header}")
    return header, pos


# --- Page decoding ---------------------------------------------------------------------------


def _pread(fd: int, offset: int, length: int) -> bytes:
    buf = os.pread(fd, length, offset)
    if len(buf) != length:
        raise ValueError(f"file ends inside the page at byte {offset} ({len(buf)} of {length} bytes)")
    return buf


def _decompress(codec: int, body, size: int):
    """The `size` uncompressed bytes of a page body compressed with Parquet codec `codec`."""
    if codec == 0:
        out = body
    elif codec == _LZ4_HADOOP:
        out = _lz4_hadoop(body, size)
    elif codec in _ARROW_CODECS:
        try:
            out = pa.decompress(body, decompressed_size=size, codec=_ARROW_CODECS[codec])
            out = memoryview(out).cast("B")  # pyarrow exports signed chars ("b")
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"corrupt {_ARROW_CODECS[codec]} page: {e}") from e
    else:
        raise ValueError(f"unsupported Parquet compression codec {codec}")
    if len(out) != size:
        raise ValueError(f"page decompressed to {len(out)} bytes, header says {size}")
    return out


def _lz4_hadoop(body, size: int):
    """Hadoop's LZ4 framing: blocks of (big-endian uncompressed size, compressed size, raw LZ4)."""
    parts, pos = [], 0
    try:
        while pos + 8 <= len(body):
            usize, csize = struct.unpack_from(">II", body, pos)
            if pos + 8 + csize > len(body):
                raise ValueError("bad frame")
            parts.append(pa.decompress(body[pos + 8 : pos + 8 + csize], decompressed_size=usize, codec="lz4_raw"))
            pos += 8 + csize
        if pos == len(body) and sum(p.size for p in parts) == size:
            return b"".join(memoryview(p) for p in parts)
    except (ValueError, pa.ArrowException, OSError):
        pass
    # Old parquet-cpp wrote unframed LZ4 under this codec id; Arrow falls back likewise.
    return _decompress(7, body, size)


def _hybrid(data, pos: int, bit_width: int, count: int) -> np.ndarray:
    """The first `count` values, (count,) int64, of the RLE/bit-packed hybrid stream of
    `bit_width`-bit ints at data[pos] (definition levels, dictionary indices)."""
    runs, have = [], 0
    while have < count:
        header, pos = _varint(data, pos)
        if header & 1:  # (header >> 1) groups of 8 values, packed LSB first
            n, nbytes = (header >> 1) * 8, (header >> 1) * bit_width
            bits = np.unpackbits(np.frombuffer(data, np.uint8, nbytes, pos), bitorder="little")
            runs.append(bits.reshape(n, bit_width) @ (1 << np.arange(bit_width, dtype=np.int64)))
            pos += nbytes
        else:  # (header >> 1) repeats of one value stored in whole bytes
            n, width = header >> 1, (bit_width + 7) // 8
            runs.append(np.full(min(n, count - have), int.from_bytes(data[pos : pos + width], "little")))
            pos += width
        have += n
    return np.concatenate(runs)[:count] if runs else np.zeros(0, np.int64)


def _bytes(data, start: int, n: int) -> bytes:
    if start + n > len(data):
        raise ValueError("value runs past the end of the page")
    return bytes(data[start : start + n])


def _plain_at(data, pos: int, k: int) -> bytes:
    """Value k of PLAIN BYTE_ARRAY values (4-byte little-endian length + bytes) at data[pos]."""
    for _ in range(k):  # lengths are inline, so the walk is sequential
        pos += 4 + _U32.unpack_from(data, pos)[0]
    return _bytes(data, pos + 4, _U32.unpack_from(data, pos)[0])


def _delta_binary_packed(data, pos: int) -> tuple[np.ndarray, int]:
    """Decode a DELTA_BINARY_PACKED stream at data[pos]: ((n,) int64 values, position after it)."""
    block, pos = _varint(data, pos)
    minis, pos = _varint(data, pos)
    count, pos = _varint(data, pos)
    first, pos = _varint(data, pos)
    per_mini, mask = block // max(minis, 1), (1 << 64) - 1
    # Deltas may overflow and wrap (Encodings.md), so the arithmetic is done in uint64.
    deltas, remaining = [np.array([_zigzag(first) & mask], np.uint64)], count - 1
    while remaining > 0:
        min_delta, pos = _varint(data, pos)
        widths, pos = data[pos : pos + minis], pos + minis
        for width in widths:
            if remaining <= 0:  # trailing miniblocks of the last block have no body
                break
            if width > 64:
                raise ValueError(f"DELTA_BINARY_PACKED bit width {width} > 64")
            raw = np.frombuffer(data, np.uint8, per_mini * width // 8, pos)
            bits = np.unpackbits(raw, bitorder="little").reshape(per_mini, width).astype(np.uint64)
            powers = np.uint64(1) << np.arange(width, dtype=np.uint64)
            deltas.append(bits @ powers + np.uint64(_zigzag(min_delta) & mask))
            pos, remaining = pos + per_mini * width // 8, remaining - per_mini
    return np.cumsum(np.concatenate(deltas), dtype=np.uint64).view(np.int64)[:count], pos


def _plain_all(data, count: int) -> list[bytes]:
    """All `count` PLAIN BYTE_ARRAY values (a dictionary page's body)."""
    values, pos = [], 0
    for _ in range(count):
        values.append(_bytes(data, pos + 4, _U32.unpack_from(data, pos)[0]))
        pos += 4 + len(values[-1])
    return values


def _read_page(fd: int, offset: int, length: int) -> tuple[dict, memoryview]:
    """(page header, on-disk body) of the page at `offset`, CRC-checked when it has one."""
    buf = memoryview(_pread(fd, offset, length))
    try:
        header, pos = _page_header(buf)
    except IndexError:
        raise ValueError(f"page header at byte {offset} runs past the page") from None
    body = buf[pos:]
    if len(body) != header[3]:
        raise ValueError(f"page at byte {offset} is {len(body)} bytes, its header says {header[3]}")
    if 4 in header and zlib.crc32(body) != header[4] & 0xFFFFFFFF:
        raise ValueError(f"CRC mismatch in the page at byte {offset}")
    return header, body


def _dictionary(fd: int, pages: ColumnPages, d: int, codec: int, cache: dict | None) -> list[bytes]:
    if cache is not None and d in cache:
        return cache[d]
    header, body = _read_page(fd, int(pages.dict_offset[d]), int(pages.dict_length[d]))
    if header[1] != _DICTIONARY_PAGE or header[7].get(2, _PLAIN) not in (_PLAIN, _PLAIN_DICTIONARY):
        raise ValueError(f"not a PLAIN dictionary page at byte {pages.dict_offset[d]}")
    values = _plain_all(_decompress(codec, body, header[2]), header[7][1])
    if cache is not None:
        cache[d] = values
    return values


def read_value(fd: int, pages: ColumnPages, row: int, dictionary_cache: dict | None = None) -> bytes | None:
    """The value of `row` (bytes; UTF-8 bytes for strings), or None when it is null.

    One os.pread of the row's data page; dictionary-encoded pages also need their
    chunk's dictionary page, kept in `dictionary_cache` (keyed by dictionary index,
    so use one cache per ColumnPages) when given. Raises IndexError for a row outside
    [0, num_rows) and ValueError for a page that is corrupt or in an unsupported encoding.
    """
    if not 0 <= row < pages.num_rows:
        raise IndexError(f"row {row} outside [0, {pages.num_rows})")
    p = int(np.searchsorted(pages.first_row, row, side="right")) - 1
    k, codec = row - int(pages.first_row[p]), int(pages.codec[p])
    header, body = _read_page(fd, int(pages.offset[p]), int(pages.length[p]))
    try:
        if header[1] == _DATA_PAGE:
            info = header[5]
            encoding, data, levels, pos = info[2], _decompress(codec, body, header[2]), None, 0
            if pages.max_definition_level and info[3] == _BIT_PACKED:  # deprecated, MSB first
                pos = (info[1] + 7) // 8
                levels = np.unpackbits(np.frombuffer(data, np.uint8, pos), bitorder="big")[: k + 1]
            elif pages.max_definition_level:  # v1 RLE levels carry a 4-byte length prefix
                pos = 4 + _U32.unpack_from(data, 0)[0]
                levels = _hybrid(data[4:pos], 0, 1, k + 1)
        elif header[1] == _DATA_PAGE_V2:
            info = header[8]
            encoding, rep, dfn, pos = info[4], info[6], info[5], 0
            if pages.max_definition_level:  # v2 levels are never compressed and have no prefix
                levels = _hybrid(body[rep : rep + dfn], 0, 1, k + 1)
            data = body[rep + dfn :]
            if info.get(7, True):
                data = _decompress(codec, data, header[2] - rep - dfn)
        else:
            raise ValueError(f"page at byte {pages.offset[p]} is not a data page (type {header[1]})")
        if pages.max_definition_level:
            if not levels[k]:
                return None
            k = int(np.count_nonzero(levels[:k]))  # values are stored for non-nulls only
        if encoding == _PLAIN:
            return _plain_at(data, pos, k)
        if encoding in (_PLAIN_DICTIONARY, _RLE_DICTIONARY):
            if pages.dictionary[p] < 0:
                raise ValueError("dictionary-encoded page in a column chunk without a dictionary page")
            if data[pos] > 32:
                raise ValueError(f"dictionary index bit width {data[pos]} > 32")
            index = int(_hybrid(data, pos + 1, data[pos], k + 1)[k])
            values = _dictionary(fd, pages, int(pages.dictionary[p]), codec, dictionary_cache)
            if index >= len(values):
                raise ValueError(f"dictionary index {index} out of range ({len(values)} entries)")
            return values[index]
        if encoding == _DELTA_LENGTH_BYTE_ARRAY:
            lengths, pos = _delta_binary_packed(data, pos)
            return _bytes(data, pos + int(lengths[:k].sum()), int(lengths[k]))
        if encoding == _DELTA_BYTE_ARRAY:
            prefixes, pos = _delta_binary_packed(data, pos)
            suffixes, pos = _delta_binary_packed(data, pos)
            value = b""
            for prefix, suffix in zip(prefixes[: k + 1].tolist(), suffixes[: k + 1].tolist()):
                value, pos = value[:prefix] + _bytes(data, pos, suffix), pos + suffix
            return value
        raise ValueError(f"unsupported data page encoding {encoding}")
    except (KeyError, IndexError, ValueError, struct.error) as e:
        raise ValueError(f"cannot decode the data page at byte {pages.offset[p]} (row {row}): {e}") from e


# --- Scanning ------------------------------------------------------------------------------


def _footer_is_encrypted(fd: int, size: int) -> bool:
    """Whether the file uses Parquet modular encryption. pyarrow aborts the process
    (not an exception) when asked for an encrypted column's metadata without keys, so
    this is checked first: "PARE" magic, or a plaintext footer with encryption_algorithm."""
    tail = os.pread(fd, 8, max(size - 8, 0))
    n = _U32.unpack_from(tail, 0)[0] if len(tail) == 8 else size
    if tail[4:] == b"PARE":
        return True
    if tail[4:] != b"PAR1" or n > size - 8:
        return False  # not Parquet: left to pyarrow to report
    return 8 in _struct(memoryview(_pread(fd, size - 8 - n, n)), 0, nested=(8,))[0]


def _scan_header(fd: int, pos: int, end: int) -> tuple[dict, int]:
    """Page header at `pos`, read in growing preads (statistics can make headers long)."""
    if pos >= end:
        raise ValueError("the column chunk ends before all its values")
    size = min(256, end - pos)
    while True:
        try:
            return _page_header(memoryview(_pread(fd, pos, size)))
        except IndexError:
            if size >= end - pos:
                raise ValueError("page header runs past the column chunk") from None
            size = min(size * 8, end - pos)


def scan_column_pages(path, column: str) -> ColumnPages:
    """Page table of the flat BYTE_ARRAY `column` of the Parquet file at `path`.

    Reads pyarrow's footer metadata, then walks each row group's column chunk reading
    only the page headers. Raises KeyError for a missing column and UnsupportedParquet
    for a column this module cannot read (see the module docstring).
    """
    with open(path, "rb") as f:  # before pyarrow touches the column metadata
        if _footer_is_encrypted(f.fileno(), os.fstat(f.fileno()).st_size):
            raise UnsupportedParquet(f"{path} is encrypted")
    meta = pq.read_metadata(path)
    leaves = [j for j in range(meta.num_columns) if meta.schema.column(j).path == column]
    if not leaves:
        arrow = meta.schema.to_arrow_schema()
        if column in arrow.names:
            raise UnsupportedParquet(f"column {column!r} is nested ({arrow.field(column).type}), not a flat column")
        raise KeyError(f"no column {column!r} in {path}")
    leaf = meta.schema.column(leaves[0])
    if leaf.physical_type != "BYTE_ARRAY":
        raise UnsupportedParquet(f"column {column!r} has physical type {leaf.physical_type}, not BYTE_ARRAY")
    if leaf.max_repetition_level > 0:
        raise UnsupportedParquet(f"column {column!r} is repeated (max repetition level {leaf.max_repetition_level})")
    if leaf.max_definition_level > 1:
        raise UnsupportedParquet(f"column {column!r} is nested (max definition level {leaf.max_definition_level})")
    page_rows, dict_pages = [], []  # (first row, offset, length, dictionary, codec), (offset, length)
    with open(path, "rb") as f:
        fd, total = f.fileno(), 0
        for g in range(meta.num_row_groups):
            chunk = meta.row_group(g).column(leaves[0])
            codec = _CODEC_IDS.get(chunk.compression)
            if codec is None:
                raise UnsupportedParquet(f"column {column!r} uses unsupported codec {chunk.compression}")
            # Some writers store dictionary_page_offset 0 for "none"; page types come from the headers.
            pos = chunk.data_page_offset
            if chunk.has_dictionary_page and 0 < (chunk.dictionary_page_offset or 0) < pos:
                pos = chunk.dictionary_page_offset
            end, chunk_dict, values, rows = pos + chunk.total_compressed_size, -1, 0, 0
            while values < chunk.num_values:
                try:
                    header, header_len = _scan_header(fd, pos, end)
                    kind, size = header[1], header_len + header[3]
                    if kind in (_DATA_PAGE, _DATA_PAGE_V2):  # v1 num_values counts nulls: rows of a flat column
                        n, n_values = (header[5][1],) * 2 if kind == _DATA_PAGE else (header[8][3], header[8][1])
                except (ValueError, KeyError) as e:
                    raise UnsupportedParquet(f"unreadable page header at byte {pos} of column {column!r} "
                                             f"(encrypted or corrupt): {e!r}") from e  # fmt: skip
                if kind == _DICTIONARY_PAGE:
                    chunk_dict = len(dict_pages)
                    dict_pages.append((pos, size))
                elif kind in (_DATA_PAGE, _DATA_PAGE_V2) and n > 0:
                    page_rows.append((total + rows, pos, size, chunk_dict, codec))
                    rows, values = rows + n, values + n_values
                pos += size
            if rows != (rows_meta := meta.row_group(g).num_rows):
                raise UnsupportedParquet(f"row group {g}: pages hold {rows} rows, metadata {rows_meta}")
            total += rows
    table = np.array(page_rows, np.int64).reshape(-1, 5).T
    dicts = np.array(dict_pages, np.int64).reshape(-1, 2).T
    return ColumnPages(total, table[0], table[1], table[2], table[3].astype(np.int32), table[4].astype(np.int8),
                       dicts[0], dicts[1], leaf.max_definition_level)  # fmt: skip


def rewrite_with_small_pages(source, target, column: str, page_bytes: int = 1 << 20) -> dict:
    """Copy the Parquet file ``source`` to ``target`` with the same rows, in the same order and row
    groups, in data pages of about ``page_bytes`` (and one value where a value is larger), not
    dictionary-encoded, so that :func:`read_value` reads one small page per value of
    ``column``. Image ids (``FILE::ROW``) stay valid: pass the folder of rewritten files as the input.

    Returns ``{"rows", "row_groups", "pages_before", "pages_after"}`` (``column``'s data pages).
    """
    reader = pq.ParquetFile(source)
    metadata = reader.metadata
    before = scan_column_pages(source, column)
    # pyarrow closes a page only between write batches: batches of one row let pages end at page_bytes.
    with pq.ParquetWriter(target, reader.schema_arrow, use_dictionary=False, data_page_size=page_bytes,
                          write_batch_size=1, write_page_index=True) as writer:
        for group in range(metadata.num_row_groups):
            writer.write_table(reader.read_row_group(group), row_group_size=max(1, metadata.row_group(group).num_rows))
    after = scan_column_pages(target, column)
    return {"rows": after.num_rows, "row_groups": pq.ParquetFile(target).metadata.num_row_groups,
            "pages_before": len(before.first_row), "pages_after": len(after.first_row)}


def rewrite_folder_with_small_pages(source, target, column: str, page_bytes: int = 1 << 20, map_fn=map,
                                    progress=print) -> dict:
    """:func:`rewrite_with_small_pages` for ``source`` (a Parquet file, or a folder searched for
    ``*.parquet``) into the folder ``target`` at the same relative paths. A target file that
    exists with the source's row count is kept (a rerun finishes an interrupted one); each file
    appears whole (written under a temporary name, then renamed). ``map_fn`` may be a parallel
    map. Returns ``{"files", "rows", "pages_before", "pages_after", "kept"}``.
    """
    from pathlib import Path

    source, target = Path(source).resolve(), Path(target).resolve()
    if not source.exists():
        raise ValueError(f"input not found: {source}")
    if target == source or source in target.parents or (source.is_dir() and target in source.parents):
        raise ValueError(f"--output {target} must be a folder outside --input {source}")
    base = source.parent if source.is_file() else source
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*.parquet") if p.is_file())
    if not files:
        raise ValueError(f"no .parquet files under {source}")
    jobs = [(str(p), str(target / p.relative_to(base)), column, page_bytes) for p in files]
    totals = {"files": len(files), "rows": 0, "pages_before": 0, "pages_after": 0, "kept": 0}
    for done, result in enumerate(map_fn(_rewrite_one, jobs), 1):
        for key in ("rows", "pages_before", "pages_after", "kept"):
            totals[key] += result[key]
        if progress is not None and (done % 50 == 0 or done == len(jobs)):
            progress(f"{done}/{len(jobs)} files: {totals['rows']} rows, {column!r} pages "
                     f"{totals['pages_before']} -> {totals['pages_after']}")
    return totals


def _rewrite_one(job: tuple) -> dict:
    from pathlib import Path

    source, target, column, page_bytes = job
    target = Path(target)
    if target.is_file() and pq.ParquetFile(target).metadata.num_rows == pq.ParquetFile(source).metadata.num_rows:
        pages = len(scan_column_pages(target, column).first_row)
        return {"rows": 0, "pages_before": 0, "pages_after": pages, "kept": 1}
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    result = rewrite_with_small_pages(source, partial, column, page_bytes)
    os.replace(partial, target)
    return {**result, "kept": 0}
