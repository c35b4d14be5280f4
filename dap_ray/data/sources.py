"""Where images come from: the three ways ImageNet-scale data is stored, cut into shards.

A shard is a plain dict that one Ray Data task reads: a chunk of a folder tree's file list,
one tar file, or one Parquet file. Listing shards never lists the images inside tars or
Parquet files (14M files are not listed one by one); reading a shard yields one record per
image: ``image_id`` (unique, stable across runs), ``label`` (int, -1 when unknown),
``data`` (encoded bytes), ``error`` (a reason, or "") and ``retry`` (True when the error may
be passing, a read that failed on an I/O error or a file not (yet) there: a rerun tries
such images again, and never again those with a lasting fault such as a corrupt file).

Image ids are text that survives Parquet (UTF-8) whatever the file names' bytes: a name's
bytes that are not UTF-8, and every ``%``, are written as ``%XX`` (:func:`path_to_id`;
:func:`id_to_path` reverses it). Names without either are their own ids.

No Ray here: :mod:`dap_ray.steps.mine` runs :func:`read_shard` in Ray Data tasks.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote_to_bytes

from dap_ray.data.images import IMAGE_EXTENSIONS, list_image_folder, read_class_map

__all__ = ["FORMATS", "ImageReader", "id_to_path", "list_shards", "path_to_id", "read_shard", "shard_key"]

FORMATS = ("folder", "tar", "parquet")


def path_to_id(name: str) -> str:
    """A file or member name as Python gives it (undecodable bytes as surrogates) to an image id.

    Bytes that are not UTF-8, and ``%``, become ``%XX``; anything else is kept, so
    ``n01440764/n01440764_10026.JPEG`` is its own id.
    """
    if "%" not in name:
        try:
            name.encode("utf-8")
            return name
        except UnicodeEncodeError:
            pass
    raw = name.encode("utf-8", "surrogateescape")
    out = []
    for char in raw.decode("utf-8", "surrogateescape"):
        if char == "%":
            out.append("%25")
        elif "\udc80" <= char <= "\udcff":
            out.append(f"%{ord(char) - 0xDC00:02X}")
        else:
            out.append(char)
    return "".join(out)


def id_to_path(image_id: str) -> str:
    """The inverse of :func:`path_to_id`: the name to open (undecodable bytes as surrogates)."""
    if "%" not in image_id:
        return image_id
    return unquote_to_bytes(image_id).decode("utf-8", "surrogateescape")


def shard_key(image_id: str) -> str:
    """The shard an image id belongs to, for tar and Parquet inputs (the file it came from)."""
    return image_id.split("::", 1)[0]


def list_shards(
    input_path: str | Path,
    fmt: str,
    class_map: str | Path | None = None,
    shard_size: int = 256,
    skip: frozenset[str] = frozenset(),
    image_column: str = "image",
    label_column: str = "label",
) -> tuple[list[dict], list[str], list[str]]:
    """Shards of ``input_path`` as dicts, the class names (may be empty), and problems to report.

    ``skip``: image ids already mined; folder shards leave them out, tar and Parquet shards
    carry theirs for :func:`read_shard` to pass over.
    """
    root = Path(input_path).resolve()
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}: expected one of {FORMATS}")
    if fmt == "folder":
        listing = list_image_folder(root, class_map)
        # Shards carry ids (text that any serialiser takes), not names with undecodable bytes.
        items = [(image_id, label) for image_id, label in ((path_to_id(p), l) for p, l in listing.items)
                 if image_id not in skip]
        shards = [
            {"shard_id": f"folder-{i // shard_size:07d}", "format": fmt, "path": str(root),
             "members": [p for p, _ in items[i : i + shard_size]], "labels": [l for _, l in items[i : i + shard_size]],
             "skip": [], "image_column": image_column, "label_column": label_column, "classes": listing.classes}
            for i in range(0, len(items), shard_size)
        ]
        return shards, listing.classes, listing.problems()

    suffix = ".tar" if fmt == "tar" else ".parquet"
    if root.is_file():
        files = [root]
        base = root.parent
    elif root.is_dir():
        files = sorted(p for p in root.rglob(f"*{suffix}") if p.is_file())
        base = root
    else:
        raise ValueError(f"input not found: {root}")
    if not files:
        raise ValueError(f"no {suffix} files under {root}")
    classes = read_class_map(class_map) if class_map is not None else []
    by_shard: dict[str, list[str]] = {}
    for image_id in skip:
        by_shard.setdefault(shard_key(image_id), []).append(image_id)
    shards = []
    for i, path in enumerate(files):
        name = path_to_id(path.relative_to(base).as_posix())
        shards.append({"shard_id": f"{fmt}-{i:07d}", "format": fmt, "path": str(path), "name": name,
                       "members": [], "labels": [], "skip": sorted(by_shard.get(name, [])),
                       "image_column": image_column, "label_column": label_column, "classes": classes})
    return shards, classes, []


def read_shard(shard: dict) -> Iterator[dict]:
    """Records of one shard's images (see the module docstring); bad entries carry an error."""
    fmt = shard["format"]
    skip = set(shard.get("skip") or ())
    if fmt == "folder":
        root = Path(shard["path"])
        for image_id, label in zip(shard["members"], shard["labels"]):
            try:
                data = (root / id_to_path(image_id)).read_bytes()
                yield _record(image_id, label, data)
            except OSError as exc:
                yield _record(image_id, label, b"", f"cannot read file: {exc.strerror or exc}", retry=True)
        return
    index = {name: i for i, name in enumerate(shard.get("classes") or [])}
    if fmt == "tar":
        yield from _read_tar(shard, index, skip)
    else:
        yield from _read_parquet(shard, index, skip)


def _record(image_id: str, label: int, data: bytes, error: str = "", retry: bool = False) -> dict:
    return {"image_id": image_id, "label": int(label), "data": data, "error": error, "retry": bool(retry and error)}


def _label_from_name(text: str, index: dict[str, int]) -> tuple[int, str]:
    """A class name's label, or a label written as a number (WebDataset ``.cls``), with or without a class map."""
    text = text.strip()
    if text in index:
        return index[text], ""
    number = text.isascii() and text.isdecimal()  # "²".isdigit() is True, and int() refuses it
    if number and (not index or int(text) < len(index)):
        return int(text), ""
    if number:
        return -1, f"label {text} is outside the class map's {len(index)} classes"
    return -1, f"unknown class {text!r}"


def _read_tar(shard: dict, index: dict[str, int], skip: set[str]) -> Iterator[dict]:
    """ImageNet-21K style (one tar per synset: class = the tar's name, or a member's folder,
    or the part of its file name before '_') or WebDataset style (``key.cls`` beside ``key.jpg``)."""
    name = shard["name"]
    recorded = f"{name}::" in skip  # the shard's own error was recorded by an earlier run: not again
    try:
        tar = tarfile.open(shard["path"])
    except OSError as exc:
        if not recorded:
            yield _record(f"{name}::", -1, b"", f"cannot open tar: {exc}", retry=True)
        return
    except tarfile.TarError as exc:
        if not recorded:
            yield _record(f"{name}::", -1, b"", f"cannot open tar: {exc}")
        return
    with tar:
        images: list[tarfile.TarInfo] = []
        classes: dict[str, str] = {}
        try:
            for info in tar:
                if not info.isfile():
                    continue
                stem, ext = os.path.splitext(info.name)
                if ext.lower() == ".cls":
                    classes[stem] = tar.extractfile(info).read().decode("utf-8", "replace")
                elif ext.lower() in IMAGE_EXTENSIONS:
                    images.append(info)
        except (OSError, tarfile.TarError) as exc:
            if not recorded:  # the images read before the fault still follow, those not done
                yield _record(f"{name}::", -1, b"", f"corrupt tar after {len(images)} images: {exc}",
                              retry=isinstance(exc, OSError) and not isinstance(exc, tarfile.TarError))
        tar_class = Path(id_to_path(name)).stem
        for info in images:
            image_id = f"{name}::{path_to_id(info.name)}"
            if image_id in skip:
                continue
            stem = os.path.splitext(info.name)[0]
            # "./n01440764_1.JPEG" (tar made with `tar -C dir .`) has no folder of its own.
            member = info.name
            while member.startswith("./"):
                member = member[2:]
            if stem in classes:
                label, error = _label_from_name(classes[stem], index)
            elif "/" in member:
                label, error = _label_from_name(member.split("/")[0], index)
            elif tar_class in index:
                label, error = index[tar_class], ""
            else:
                label, error = _label_from_name(os.path.basename(stem).split("_")[0], index)
            retry = False
            try:
                data = tar.extractfile(info).read()
            except (OSError, tarfile.TarError) as exc:
                data, error = b"", f"cannot read tar member: {exc}"
                retry = not isinstance(exc, tarfile.TarError)
            yield _record(image_id, label, data, error, retry=retry)


def _read_parquet(shard: dict, index: dict[str, int], skip: set[str]) -> Iterator[dict]:
    """A table with an image column (bytes, or a path relative to the file) and a label column
    (an int, or a class name looked up in the class map)."""
    import pyarrow.parquet as pq

    name, path = shard["name"], Path(shard["path"])
    image_column, label_column = shard["image_column"], shard["label_column"]
    recorded = f"{name}::" in skip  # the shard's own error was recorded by an earlier run: not again
    try:
        parquet = pq.ParquetFile(path)
    except OSError as exc:
        if not recorded:
            yield _record(f"{name}::", -1, b"", f"cannot open parquet: {exc}", retry=True)
        return
    except Exception as exc:  # pyarrow raises several types for a bad file
        if not recorded:
            yield _record(f"{name}::", -1, b"", f"cannot open parquet: {exc}")
        return
    missing = [c for c in (image_column, label_column) if c not in parquet.schema_arrow.names]
    if missing:
        if not recorded:
            yield _record(f"{name}::", -1, b"", f"missing column(s) {missing}; has {parquet.schema_arrow.names}")
        return
    row = 0
    for batch in parquet.iter_batches(batch_size=256, columns=[image_column, label_column]):
        for value, label_value in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            image_id = f"{name}::{path_to_id(value)}" if isinstance(value, str) else f"{name}::{row}"
            row += 1
            if image_id in skip:
                continue
            if isinstance(label_value, str):
                label, error = _label_from_name(label_value, index)
            elif label_value is None:
                label, error = -1, "missing label"
            else:
                label, error = int(label_value), ""
            retry = False
            if isinstance(value, (bytes, bytearray)):
                data = bytes(value)
            elif isinstance(value, str):
                try:
                    data = (path.parent / value).read_bytes()
                except OSError as exc:
                    data, error, retry = b"", f"cannot read file: {exc.strerror or exc}", True
            else:
                data, error = b"", "image column holds neither bytes nor a path"
            yield _record(image_id, label, data, error, retry=retry)


class ImageReader:
    """Encoded bytes of one image by its ``image_id``, for random access during training.

    The ids are those :func:`read_shard` gives: a folder image's path relative to the root,
    ``TAR::MEMBER`` (TAR relative to the input folder, or the tar's own name when the input
    is one file), ``FILE::ROW`` (bytes column) or ``FILE::PATH`` (path column, relative to
    the Parquet file). Open tar files (with their member index) and the last Parquet row
    group read are kept per process, so readers belong in DataLoader workers, one each.

    Raises ``KeyError`` naming the id when it is not in the input, ``OSError`` when the
    file cannot be read.
    """

    def __init__(self, input_path: str | Path, fmt: str, image_column: str = "image", max_open: int = 16):
        if fmt not in FORMATS:
            raise ValueError(f"unknown input format {fmt!r}: expected one of {FORMATS}")
        root = Path(input_path).resolve()
        if not root.exists():
            raise ValueError(f"input not found: {root}")
        self.fmt, self.image_column, self.max_open = fmt, image_column, max_open
        self.root = root if root.is_dir() or fmt == "folder" else root.parent
        self._tars: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}
        self._row_group: tuple[str, int, list] | None = None
        self._parquet: dict[str, object] = {}

    def __getstate__(self) -> dict:  # open files stay behind when a reader is sent to a worker
        return {**self.__dict__, "_tars": {}, "_row_group": None, "_parquet": {}}

    def read(self, image_id: str) -> bytes:
        if self.fmt == "folder":
            return (self.root / id_to_path(image_id)).read_bytes()
        name, sep, key = image_id.partition("::")
        if not sep:
            raise KeyError(f"image id {image_id!r} is not of the form FILE::KEY ({self.fmt} input)")
        name, key = id_to_path(name), id_to_path(key)
        if self.fmt == "tar":
            tar, members = self._open_tar(name)
            if key not in members:
                raise KeyError(f"{key!r} not found in {name}")
            return tar.extractfile(members[key]).read()
        return self._read_parquet(name, key)

    def _open_tar(self, name: str):
        if name not in self._tars:
            if len(self._tars) >= self.max_open:
                oldest = next(iter(self._tars))
                self._tars.pop(oldest)[0].close()
            tar = tarfile.open(self.root / name)
            self._tars[name] = (tar, {info.name: info for info in tar.getmembers() if info.isfile()})
        return self._tars[name]

    def _read_parquet(self, name: str, key: str) -> bytes:
        import pyarrow.parquet as pq

        path = self.root / name
        if name not in self._parquet:
            self._parquet = {name: pq.ParquetFile(path)}  # one open file: ids come grouped by file often enough
        parquet = self._parquet[name]
        if not key.isdigit():
            return (path.parent / key).read_bytes()
        row = int(key)
        metadata = parquet.metadata
        start = 0
        for group in range(metadata.num_row_groups):
            count = metadata.row_group(group).num_rows
            if row < start + count:
                if self._row_group is None or self._row_group[:2] != (name, group):
                    values = parquet.read_row_group(group, columns=[self.image_column]).column(0).to_pylist()
                    self._row_group = (name, group, values)
                value = self._row_group[2][row - start]
                if isinstance(value, str):
                    return (path.parent / value).read_bytes()
                return bytes(value)
            start += count
        raise KeyError(f"row {row} not found in {name} ({start} rows)")
