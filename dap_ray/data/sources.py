"""Where images come from: the three ways ImageNet-scale data is stored, cut into shards.

A shard is a plain dict that one Ray Data task reads: a range of one class folder's sorted
listing, one tar file, or one Parquet file. Listing shards never lists the images inside
tars or Parquet files, and class folders are counted (in parallel when given a parallel
map), so the driver holds shards, not 14M paths; reading a shard yields one record per
image: ``image_id`` (unique, stable across runs), ``label`` (int, -1 when unknown),
``data`` (encoded bytes), ``error`` (a reason, or "") and ``retry`` (True when the error may
be passing, a read that failed on an I/O error or a file not (yet) there: a rerun tries
such images again, and never again those with a lasting fault such as a corrupt file),
``shard`` and ``shard_total`` (the shard's id and record count, for resuming by shard).
Images of a class outside the class map are error records naming the class: the records
are always every image in the input.

Image ids are text that survives Parquet (UTF-8) whatever the file names' bytes: a name's
bytes that are not UTF-8, and every ``%``, are written as ``%XX`` (:func:`path_to_id`;
:func:`id_to_path` reverses it). Names without either are their own ids.

No Ray here: :mod:`dap_ray.steps.mine` runs :func:`read_shard` in Ray Data tasks.
"""

from __future__ import annotations

import functools
import os
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator
from urllib.parse import unquote_to_bytes

from dap_ray.data.images import IMAGE_EXTENSIONS, class_folder_files, class_folders, read_class_map

__all__ = ["FORMATS", "ImageReader", "check_input", "id_to_path", "list_shards", "path_to_id", "read_shard",
           "shard_key"]

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


def shard_key(image_id: str, fmt: str = "tar") -> str:
    """What ties an image id to its shards: the tar or Parquet file it came from, or for a folder
    input its class folder (each of whose shards is a range of that folder's listing)."""
    return image_id.split("/", 1)[0] if fmt == "folder" else image_id.split("::", 1)[0]


def check_input(input_path: str | Path, fmt: str) -> Path:
    """``input_path`` made absolute, once it is known to exist in a form ``fmt`` reads: a cheap
    check that lets a job refuse a mistyped path before it starts Ray.

    Raises ``ValueError`` naming the path (or the format, when unknown).
    """
    root = Path(input_path).resolve()
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}: expected one of {FORMATS}")
    if fmt == "folder" and not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    if fmt != "folder" and not (root.is_file() or root.is_dir()):
        raise ValueError(f"input not found: {root}")
    return root


def list_shards(
    input_path: str | Path,
    fmt: str,
    class_map: str | Path | None = None,
    shard_size: int = 256,
    skip: Iterable[str] = (),
    image_column: str = "image",
    label_column: str = "label",
    map_fn: Callable = map,
) -> tuple[list[dict], list[str], list[str]]:
    """Shards of ``input_path`` as dicts, the class names (may be empty), and problems to report.

    A shard's ``shard_id`` is stable across runs of the same input: a tar or Parquet file's
    name, or ``FOLDER#START-STOP/COUNT`` for a range of a class folder's sorted listing; its
    ``key`` is what :func:`shard_key` gives for its images' ids. The
    driver holds shards, never a list of images: class folders are listed by ``map_fn``
    (``map``, or a parallel map such as Ray tasks; it gets a function of one folder name)
    into counts, and each folder shard lists its folder again when read.

    ``skip``: image ids already mined, handed to the shards they belong to (by
    :func:`shard_key`), which pass over them when read.
    """
    root = check_input(input_path, fmt)
    by_key: dict[str, list[str]] = {}
    for image_id in skip:
        by_key.setdefault(shard_key(image_id, fmt), []).append(image_id)
    common = {"format": fmt, "image_column": image_column, "label_column": label_column}
    if fmt == "folder":
        return _folder_shards(root, class_map, shard_size, by_key, map_fn, common)

    suffix = ".tar" if fmt == "tar" else ".parquet"
    if root.is_file():
        files = [root]
        base = root.parent
    else:
        files = sorted(p for p in root.rglob(f"*{suffix}") if p.is_file())
        base = root
    if not files:
        raise ValueError(f"no {suffix} files under {root}")
    classes = read_class_map(class_map) if class_map is not None else []
    shards = []
    for path in files:
        name = path_to_id(path.relative_to(base).as_posix())
        shards.append({**common, "shard_id": name, "key": name, "path": str(path), "name": name,
                       "skip": sorted(by_key.get(name, [])), "classes": classes})
    return shards, classes, []


def _folder_shards(root: Path, class_map, shard_size: int, by_key: dict, map_fn: Callable,
                   common: dict) -> tuple[list[dict], list[str], list[str]]:
    folders, stray, classes = class_folders(root, class_map)
    index = {name: i for i, name in enumerate(classes)}
    shards, unknown, others, unknown_images = [], [], list(stray), 0
    for name, (count, other_examples) in zip(folders, map_fn(functools.partial(_count_folder, str(root)), folders)):
        folder_id = path_to_id(name)
        label = index.get(name, -1)
        if label < 0:
            unknown.append(name)
            unknown_images += count
        others.extend(other_examples[: max(0, 10 - len(others))])
        for start in range(0, count, shard_size):
            stop = min(count, start + shard_size)
            shards.append({**common, "shard_id": f"{folder_id}#{start}-{stop}/{count}", "key": folder_id,
                           "path": str(root), "folder": name, "start": start, "stop": stop, "count": count, "label": label,
                           "skip": sorted(by_key.get(folder_id, []))})
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} folder(s) not in the class map ({unknown_images} images, each recorded as "
                        "an error): " + ", ".join(unknown[:10]))
    if others:
        problems.append("non-image or unfiled file(s) were skipped, such as: " + ", ".join(others[:10]))
    if not shards:
        raise ValueError(f"no images found under {root} for the {len(classes)} classes")
    return shards, list(classes), problems


def _count_folder(root: str, name: str) -> tuple[int, list[str]]:
    """(images, up to 10 of the other files) of one class folder."""
    images, others = class_folder_files(root, name)
    return len(images), others[:10]


def read_shard(shard: dict) -> Iterator[dict]:
    """Records of one shard's images (see the module docstring); bad entries carry an error.

    Each record also names its ``shard`` and the number of records the whole shard holds
    (``shard_total``, counting those skipped), so that the writer can record which shards
    are complete and a rerun can plan from that alone.
    """
    fmt = shard["format"]
    skip = set(shard.get("skip") or ())
    if fmt == "folder":
        records = _read_folder(shard, skip)
    else:
        index = {name: i for i, name in enumerate(shard.get("classes") or [])}
        records = _read_tar(shard, index, skip) if fmt == "tar" else _read_parquet(shard, index, skip)
    shard_id, total = shard["shard_id"], None
    for record in records:
        if total is None:
            total = record.pop("total")
        else:
            record.pop("total", None)
        yield {**record, "shard": shard_id, "shard_total": total}


def _read_folder(shard: dict, skip: set[str]) -> Iterator[dict]:
    root, start, stop = Path(shard["path"]), shard["start"], shard["stop"]
    images, _ = class_folder_files(root, shard["folder"])
    if len(images) != shard["count"]:  # the folder changed since it was listed: its ranges no longer hold
        raise RuntimeError(f"{root / shard['folder']} holds {len(images)} images where {shard['count']} were listed: "
                           "the input must not change while it is mined")
    label, total = shard["label"], stop - start
    for path in images[start:stop]:
        image_id = path_to_id(path)
        if image_id in skip:
            continue
        if label < 0:
            folder = image_id.split("/")[0]  # the id's escaped form: any text writer takes it
            yield _record(image_id, label, b"", f"unknown class {folder!r}: its folder is not in the class map",
                          total=total)
            continue
        try:
            data = (root / path).read_bytes()
            yield _record(image_id, label, data, total=total)
        except OSError as exc:
            yield _record(image_id, label, b"", f"cannot read file: {exc.strerror or exc}", retry=True, total=total)


def _record(image_id: str, label: int, data: bytes, error: str = "", retry: bool = False, total: int = 0) -> dict:
    """One record; ``total``, the shard's record count, is read from the shard's first record only."""
    return {"image_id": image_id, "label": int(label), "data": data, "error": error, "retry": bool(retry and error),
            "total": total}


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
            yield _record(f"{name}::", -1, b"", f"cannot open tar: {exc}", retry=True, total=1)
        return
    except tarfile.TarError as exc:
        if not recorded:
            yield _record(f"{name}::", -1, b"", f"cannot open tar: {exc}", total=1)
        return
    with tar:
        images: list[tarfile.TarInfo] = []
        classes: dict[str, str] = {}
        fault = None
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
            fault = exc
        total = len(images) + (fault is not None)
        if fault is not None and not recorded:  # the images read before the fault still follow, those not done
            yield _record(f"{name}::", -1, b"", f"corrupt tar after {len(images)} images: {fault}",
                          retry=isinstance(fault, OSError) and not isinstance(fault, tarfile.TarError), total=total)
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
            yield _record(image_id, label, data, error, retry=retry, total=total)


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
            yield _record(f"{name}::", -1, b"", f"cannot open parquet: {exc}", retry=True, total=1)
        return
    except Exception as exc:  # pyarrow raises several types for a bad file
        if not recorded:
            yield _record(f"{name}::", -1, b"", f"cannot open parquet: {exc}", total=1)
        return
    missing = [c for c in (image_column, label_column) if c not in parquet.schema_arrow.names]
    if missing:
        if not recorded:
            yield _record(f"{name}::", -1, b"", f"missing column(s) {missing}; has {parquet.schema_arrow.names}",
                          total=1)
        return
    row, total = 0, parquet.metadata.num_rows
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
                if label < 0:
                    label, error = -1, f"label {label_value} is negative"
                elif index and label >= len(index):
                    label, error = -1, f"label {label_value} is outside the class map's {len(index)} classes"
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
            yield _record(image_id, label, data, error, retry=retry, total=total)


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
