"""Where each pre-training image's bytes are, so that reading one costs one positioned read.

Step 3's sampler jumps across the whole input (21,841 synset tars, thousands of Parquet
files), so a reader that finds an image by walking a tar's member headers or decoding a
Parquet row group pays that walk on almost every image. :func:`load_locations` instead
indexes every input file once (in parallel through ``map_fn``; cached beside the pseudo
boxes' cache, :mod:`dap_ray.data.pseudo_boxes`), and :class:`LocatedImages` then reads image
``i`` with one ``os.pread``:

- ``tar`` (ImageNet-21K's tar per synset, WebDataset shards): the member's data offset and size;
- ``parquet``: the row, and each file's page table (:mod:`dap_ray.data.parquet_pages`), so a
  read is the one data page that holds the row; a path column's value is a file beside the
  Parquet file, read directly;
- ``folder``: the file named by the id (one open and read; nothing to index).

Arrays are ``.npy`` files, memory-mapped and shared by a node's processes. Plain numpy and
pyarrow; no Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dap_ray.data.sources import FORMATS, id_to_path

__all__ = ["ImageLocations", "LocatedImages", "changed_files", "load_locations", "locations_folder",
           "scan_input_file"]

LOCATIONS_VERSION = 2
# Decoded Parquet dictionary pages kept per reader (each DataLoader process has one).
DICTIONARY_CACHE_BYTES = 256 << 20
# A Parquet file whose data pages hold more images than this on average is named at indexing:
# each read decodes the whole page (pyarrow's default writer puts up to 1,024 rows in one).
ROWS_PER_PAGE_WARNING = 64
_PAGE_ARRAYS = ("first_row", "offset", "length", "dictionary", "codec")


@dataclass(frozen=True, eq=False)
class ImageLocations:
    """Per image of a :class:`dap_ray.data.pseudo_boxes.PseudoBoxes` (same order, n images):
    ``file_index`` (n,) int32 into ``files`` (-1: not in the input, see ``missing``);
    ``offset`` (n,) int64, a tar member's data offset or a Parquet row (-1: the Parquet value
    is a path, the id's key); ``size`` (n,) int64, a tar member's size. ``files``: names
    relative to ``root`` as ids write them; ``file_sizes`` and ``file_mtimes`` (f,) int64 (-1
    and 0 for a file that could not be indexed), checked when a file is opened (an index never
    reads a changed file) and by :func:`changed_files`. Parquet page tables: ``pages_*`` arrays of
    all files, file k's rows ``page_start[k]:page_start[k + 1]`` (its ``dictionary`` entries
    index ``dict_*[dict_start[k]:]``); ``num_rows`` and ``max_definition_level`` per file.
    """

    fmt: str
    root: str
    image_column: str = "image"
    files: tuple[str, ...] = ()
    file_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    file_mtimes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    file_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    offset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    size: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pages: dict = field(default_factory=dict)
    missing: int = 0
    problems: tuple[str, ...] = ()
    folder: str | None = None

    def __reduce__(self):
        if self.folder is None:
            return super().__reduce__()
        return _open_locations, (self.folder,)


def scan_input_file(fmt: str, root: str, name: str, image_column: str = "image") -> dict:
    """One input file's index: tar ``{"size", "members", "offsets", "sizes"}`` (member ids as
    :func:`dap_ray.data.sources.path_to_id` writes them), Parquet ``{"size", "num_rows",
    "max_definition_level", <page arrays>, "dict_offset", "dict_length"}``; ``{"error": reason}``
    when the file cannot be indexed. Reads headers only, never an image's bytes."""
    import pyarrow as pa

    from dap_ray.data.sources import path_to_id

    path = Path(root) / id_to_path(name)
    try:
        stat = path.stat()
        if fmt == "tar":
            members, offsets, sizes, problem = [], [], [], None
            # "r:": an uncompressed tar only, whose members' offsets are offsets in the file itself.
            with tarfile.open(path, "r:") as tar:
                try:
                    for info in tar:
                        # A member whose bytes run past the file's end (a cut tar) is not in the index.
                        if info.isfile() and info.offset_data + info.size <= stat.st_size:
                            members.append(path_to_id(info.name))
                            offsets.append(info.offset_data)
                            sizes.append(info.size)
                except (OSError, tarfile.TarError) as exc:  # the members before the fault stay, as in mining
                    problem = f"{name} is corrupt after {len(members)} members: {exc}"
            # An Arrow array travels back from a Ray task as a few buffers, not a pickled string each.
            return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "problem": problem,
                    "members": pa.array(members, pa.large_string()), "offsets": np.asarray(offsets, np.int64),
                    "sizes": np.asarray(sizes, np.int64)}
        from dap_ray.data.parquet_pages import scan_column_pages

        pages = scan_column_pages(path, image_column)
    except tarfile.CompressionError as exc:
        return {"error": f"cannot index {name}: {exc}"}
    except tarfile.ReadError as exc:
        reason = str(exc)
        if fmt == "tar" and _is_compressed(path):
            reason = "a compressed tar, whose members cannot be read in place: decompress it to pre-train from it"
        return {"error": f"cannot index {name}: {reason}"}
    except (OSError, tarfile.TarError, ValueError, IndexError) as exc:
        return {"error": f"cannot index {name}: {exc}"}
    except KeyError as exc:  # no such column
        return {"error": f"cannot index {name}: {exc.args[0] if exc.args else exc}"}
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "num_rows": pages.num_rows,
            "max_definition_level": pages.max_definition_level,
            **{f"pages_{a}": getattr(pages, a) for a in _PAGE_ARRAYS},
            "dict_offset": pages.dict_offset, "dict_length": pages.dict_length}


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(6)
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00"


def _input_root(input_path: str | Path, fmt: str) -> Path:
    """The folder that input ids are relative to (a single tar or Parquet file's own folder)."""
    root = Path(input_path).resolve()
    return root.parent if fmt != "folder" and root.is_file() else root


def locations_folder(box_folder: str | Path | None, input_path: str | Path, fmt: str,
                     image_column: str = "image") -> Path | None:
    """Where the index of a box cache's images in ``input_path`` is kept: inside the box cache's
    folder; None for a folder input (nothing to index) or boxes held in memory."""
    if box_folder is None or fmt == "folder":
        return None
    root = _input_root(input_path, fmt)
    key = hashlib.sha1(f"v{LOCATIONS_VERSION}\0{root}\0{fmt}\0{image_column}".encode()).hexdigest()[:16]
    return Path(box_folder) / f"locations-{key}"


def load_locations(pseudo, input_path: str | Path, fmt: str, image_column: str = "image",
                   map_fn: Callable = map, check_files: bool = False) -> ImageLocations:
    """The locations of ``pseudo``'s images in ``input_path``, from the cache inside the pseudo
    boxes' cache folder, built first if missing (``map_fn``: ``map`` or a parallel map over
    the input files, given a function of one file name). In memory when ``pseudo`` is.

    ``check_files``: build the cached index again when an indexed file changed, went, or could
    not be read when it was built (:func:`changed_files`: one ``stat`` per file; the step does
    this once per run, in the driver; workers then trust it, and check each file they open).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}: expected one of {FORMATS}")
    if not Path(input_path).exists():
        raise ValueError(f"input not found: {Path(input_path).resolve()}")
    root = _input_root(input_path, fmt)
    if fmt == "folder":
        return ImageLocations(fmt, str(root), image_column)
    folder = locations_folder(pseudo.folder, input_path, fmt, image_column)
    if folder is not None and (folder / "meta.json").is_file():
        cached = _open_locations(str(folder))
        if not check_files or not changed_files(cached):
            return cached
        shutil.rmtree(folder, ignore_errors=True)
    arrays, meta = _build(pseudo, root, fmt, image_column, map_fn)
    if folder is None:
        return _assemble(meta, arrays, None)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, value in arrays.items():
            np.save(work / f"{name}.npy", value)
        (work / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(work, folder)
        except OSError:  # another process's index got there first: the same content
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _open_locations(str(folder))


def _split_ids(pseudo, chunk: int = 1 << 20):
    """(file index per image (n,) int32, -1 for an id without ``::``; file names; keys as one
    large_string array), ``chunk`` ids at a time so that no copy of all ids is made at once."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(pseudo)
    ids = pa.LargeStringArray.from_buffers(n, pa.py_buffer(np.ascontiguousarray(pseudo.id_offsets)),
                                           pa.py_buffer(np.ascontiguousarray(pseudo.id_bytes)))
    file_index = np.full(n, -1, np.int32)
    files: dict[str, int] = {}
    keys = []
    for first in range(0, n, chunk):
        # FILE::KEY, split at the first "::" (as read_shard writes ids); an id without one matches nothing.
        parts = pc.extract_regex(ids.slice(first, chunk), r"(?s)^(?P<name>.*?)::(?P<key>.*)$")
        located = parts.is_valid().to_numpy(zero_copy_only=False)
        names = parts.field("name")
        for name in pc.unique(pc.filter(names, pa.array(located))).to_pylist():
            files.setdefault(name, len(files))
        known = pa.array(list(files), pa.large_string())
        local = pc.fill_null(pc.index_in(names, known), -1).to_numpy().astype(np.int32)
        file_index[first : first + len(local)] = np.where(located, local, -1)
        keys.append(pc.if_else(pa.array(located), parts.field("key"), pa.scalar(None, pa.large_string())))
    keys = pa.chunked_array(keys, pa.large_string()).combine_chunks() if keys else pa.array([], pa.large_string())
    return file_index, list(files), keys


def _build(pseudo, root: Path, fmt: str, image_column: str, map_fn: Callable,
           files_per_call: int = 1024) -> tuple[dict, dict]:
    """The index's arrays and meta. Input files are scanned ``files_per_call`` at a time through
    ``map_fn`` and each batch matched to its images before the next, so memory holds one batch
    of scans, not the whole input's member lists."""
    import functools

    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(pseudo)
    file_index, files, keys = _split_ids(pseudo)
    offset = np.full(n, -1, np.int64)
    size = np.zeros(n, np.int64)
    order = np.argsort(file_index, kind="stable")
    bounds = np.searchsorted(file_index[order], np.arange(len(files) + 1))
    problems, file_sizes, file_mtimes = [], np.zeros(len(files), np.int64), np.zeros(len(files), np.int64)
    pages: dict[str, list] = {f"pages_{a}": [] for a in _PAGE_ARRAYS} | {"dict_offset": [], "dict_length": []}
    page_start, dict_start, num_rows, max_def, crowded = [0], [0], [], [], []
    scan = functools.partial(scan_input_file, fmt, str(root), image_column=image_column)
    for first in range(0, len(files), files_per_call):
        for k, found in enumerate(map_fn(scan, files[first : first + files_per_call]), first):
            rows = order[bounds[k] : bounds[k + 1]]
            if "error" in found:
                problems.append(f"{found['error']} ({len(rows)} images)")
                file_index[rows] = -1
                found = {"size": -1, "mtime_ns": 0, "members": [], "offsets": np.zeros(0, np.int64),
                         "sizes": np.zeros(0, np.int64),
                         "num_rows": 0, "max_definition_level": 0, "dict_offset": np.zeros(0, np.int64),
                         "dict_length": np.zeros(0, np.int64),
                         **{f"pages_{a}": np.zeros(0, np.int64) for a in _PAGE_ARRAYS}}
            file_sizes[k], file_mtimes[k] = found["size"], found.get("mtime_ns", 0)
            if found.get("problem"):
                problems.append(found["problem"])
            wanted = keys.take(pa.array(rows))
            if fmt == "tar":
                # The last of two members of one name is the one a reader sees (tar's rule).
                members = pa.array(found["members"], pa.large_string())[::-1]
                at = pc.fill_null(pc.index_in(wanted, members), -1).to_numpy().astype(np.int64)
                hit = at >= 0
                last = len(members) - 1 - at[hit]
                offset[rows[hit]], size[rows[hit]] = found["offsets"][last], found["sizes"][last]
                file_index[rows[~hit]] = -1
                continue
            numeric = pc.fill_null(pc.match_substring_regex(wanted, r"^[0-9]+$"), False).to_numpy(zero_copy_only=False)
            row = np.full(len(rows), -1, np.int64)
            if numeric.any():
                row[numeric] = pc.cast(pc.filter(wanted, pa.array(numeric)), pa.int64()).to_numpy()
            offset[rows] = row
            file_index[rows[numeric & (row >= found["num_rows"])]] = -1
            if found["num_rows"] > ROWS_PER_PAGE_WARNING * max(1, len(found["pages_first_row"])):
                crowded.append(files[k])
            for name in pages:
                pages[name].append(np.asarray(found[name]))
            page_start.append(page_start[-1] + len(found["pages_first_row"]))
            dict_start.append(dict_start[-1] + len(found["dict_offset"]))
            num_rows.append(found["num_rows"])
            max_def.append(found["max_definition_level"])
    arrays = {"file_sizes": file_sizes, "file_mtimes": file_mtimes, "file_index": file_index, "offset": offset,
              "size": size}
    if fmt == "parquet":
        dtypes = {"pages_dictionary": np.int32, "pages_codec": np.int8}
        arrays |= {name: (np.concatenate(v) if v else np.zeros(0)).astype(dtypes.get(name, np.int64))
                   for name, v in pages.items()}
        arrays |= {"page_start": np.asarray(page_start, np.int64), "dict_start": np.asarray(dict_start, np.int64),
                   "num_rows": np.asarray(num_rows, np.int64), "max_definition_level": np.asarray(max_def, np.int8)}
    if crowded:
        problems.append(f"{len(crowded)} Parquet file(s) such as {crowded[0]} hold over {ROWS_PER_PAGE_WARNING} "
                        "images per data page (pyarrow's default writer puts up to 1,024 rows in one page), so each "
                        "image read decodes its whole page: rewrite them with small pages (jobs/repack_parquet.py) "
                        "or pre-train from tars")
    missing = int((file_index < 0).sum())
    meta = {"version": LOCATIONS_VERSION, "format": fmt, "root": str(root), "image_column": image_column,
            "files": files, "images": n, "missing": missing, "problems": problems[:20]}
    return arrays, meta


def changed_files(locations: ImageLocations) -> list[str]:
    """The indexed files that changed (size or modification time), are gone, or could not be
    indexed when the index was built: an index with any is built again."""
    changed = []
    for k, name in enumerate(locations.files):
        try:
            stat = (Path(locations.root) / id_to_path(name)).stat()
        except OSError:
            changed.append(name)
            continue
        if (stat.st_size, stat.st_mtime_ns) != (locations.file_sizes[k], locations.file_mtimes[k]):
            changed.append(name)
    return changed


def _open_locations(folder: str) -> ImageLocations:
    from dap_ray.data.pseudo_boxes import _map

    meta = json.loads((Path(folder) / "meta.json").read_text())
    arrays = {p.stem: _map(p) for p in Path(folder).glob("*.npy")}
    return _assemble(meta, arrays, folder)


def _assemble(meta: dict, arrays: dict, folder: str | None) -> ImageLocations:
    core = ("file_sizes", "file_mtimes", "file_index", "offset", "size")
    return ImageLocations(meta["format"], meta["root"], meta["image_column"], tuple(meta["files"]),
                          **{name: arrays[name] for name in core},
                          pages={k: v for k, v in arrays.items() if k not in core}, missing=meta["missing"],
                          problems=tuple(meta["problems"]), folder=folder)


class LocatedImages:
    """Encoded bytes of image ``i`` of a :class:`PseudoBoxes` with one positioned read
    (:meth:`read`). Open files are kept per process (at most ``max_open``, least recently used
    closed first), so an instance belongs in one DataLoader process; pickling drops them.

    Raises ``KeyError`` for an image the index did not find in the input, ``OSError`` for a
    file that cannot be read or changed size since it was indexed.
    """

    def __init__(self, pseudo, locations: ImageLocations, max_open: int = 128):
        self.pseudo, self.locations, self.max_open = pseudo, locations, max_open
        self._open: OrderedDict[int, int] = OrderedDict()
        self._pages: dict[int, object] = {}
        self._dictionaries: OrderedDict[int, tuple[dict, int]] = OrderedDict()  # file -> (pages, bytes)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict(), "_pages": {}, "_dictionaries": OrderedDict()}

    def __del__(self) -> None:
        for fd in getattr(self, "_open", {}).values():
            os.close(fd)

    def read(self, index: int) -> bytes:
        where = self.locations
        if where.fmt == "folder":
            return (Path(where.root) / id_to_path(self.pseudo.image_id(index))).read_bytes()
        k = int(where.file_index[index])
        if k < 0:
            raise KeyError(f"{self.pseudo.image_id(index)!r} was not found in {where.root} when it was indexed")
        if where.fmt == "tar":
            size = int(where.size[index])
            data = os.pread(self._fd(k), size, int(where.offset[index]))
            if len(data) != size:
                raise OSError(f"{where.files[k]} ends inside {self.pseudo.image_id(index)!r}")
            return data
        row = int(where.offset[index])
        if row < 0:  # a path column: the image is a file beside the Parquet file
            key = self.pseudo.image_id(index).partition("::")[2]
            return (Path(where.root) / id_to_path(where.files[k])).parent.joinpath(id_to_path(key)).read_bytes()
        from dap_ray.data.parquet_pages import read_value

        pages = self._column_pages(k)
        dictionaries, _ = self._dictionaries.pop(k, ({}, 0))
        try:
            value = read_value(self._fd(k), pages, row, dictionaries)
        except (ValueError, IndexError) as exc:  # a corrupt page: this image is unreadable, not the run
            raise OSError(f"cannot read {self.pseudo.image_id(index)!r}: {exc}") from None
        self._keep_dictionaries(k, dictionaries, pages)
        if value is None:
            raise KeyError(f"{self.pseudo.image_id(index)!r} has no value in column {where.image_column!r}")
        return value

    def _keep_dictionaries(self, k: int, dictionaries: dict, pages) -> None:
        """Keep file ``k``'s decoded dictionary pages, the least recently used files' dropped past
        :data:`DICTIONARY_CACHE_BYTES` (a writer that put whole row groups of images in dictionary
        pages then costs a page decode per image, not memory without bound)."""
        if not dictionaries:
            return
        size = sum(int(pages.dict_length[d]) for d in dictionaries)
        if size > DICTIONARY_CACHE_BYTES:
            return
        self._dictionaries[k] = (dictionaries, size)
        while sum(kept for _, kept in self._dictionaries.values()) > DICTIONARY_CACHE_BYTES:
            self._dictionaries.popitem(last=False)

    def _fd(self, k: int) -> int:
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        path = Path(self.locations.root) / id_to_path(self.locations.files[k])
        fd = os.open(path, os.O_RDONLY)
        stat = os.fstat(fd)
        if (stat.st_size, stat.st_mtime_ns) != (self.locations.file_sizes[k], self.locations.file_mtimes[k]):
            os.close(fd)
            raise OSError(f"{path} changed since it was indexed ({self.locations.file_sizes[k]} bytes then): "
                          "pre-training indexes it again when it starts")
        if len(self._open) >= self.max_open:
            _, oldest = self._open.popitem(last=False)
            os.close(oldest)
        self._open[k] = fd
        return fd

    def _column_pages(self, k: int):
        if k not in self._pages:
            from dap_ray.data.parquet_pages import ColumnPages

            p = self.locations.pages
            a, b = int(p["page_start"][k]), int(p["page_start"][k + 1])
            c, d = int(p["dict_start"][k]), int(p["dict_start"][k + 1])
            self._pages[k] = ColumnPages(
                num_rows=int(p["num_rows"][k]), **{name: np.asarray(p[f"pages_{name}"][a:b]) for name in _PAGE_ARRAYS},
                dict_offset=np.asarray(p["dict_offset"][c:d]), dict_length=np.asarray(p["dict_length"][c:d]),
                max_definition_level=int(p["max_definition_level"][k]))
        return self._pages[k]
