"""Typed job configuration: frozen dataclasses, YAML files, command-line overrides.

A job's configuration is a frozen dataclass whose field defaults come from the paper.
:func:`add_config_arguments` turns its fields into ``--flags`` (help text from each
field's ``metadata["help"]``) plus ``--config FILE.yaml``; :func:`resolve_config` layers
defaults < YAML < flags, failing on unknown YAML keys by name; :func:`save_config` writes
the resolved result beside a job's outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["add_config_arguments", "config_to_dict", "resolve_config", "run_config_job", "save_config"]

C = TypeVar("C")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add ``--config`` and one ``--field-name`` flag per field of the dataclass ``cls``."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the options below")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind, optional = _unwrap_optional(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        if default is None and field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = field.default_factory()  # type: ignore[misc]
        help_text = field.metadata.get("help", "")
        shown = f" (default: {_show(default)})" if default not in (None, "") else ""
        kwargs: dict[str, Any] = dict(dest=field.name, default=None, help=help_text + shown)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kwargs.update(nargs="+", type=typing.get_args(kind)[0], metavar="V")
        elif typing.get_origin(kind) is typing.Literal:
            kwargs.update(choices=typing.get_args(kind))
        else:
            kwargs["type"] = kind if kind in (int, float) else str
        parser.add_argument(flag, **kwargs)
    return parser


def run_config_job(cls: type[C], run: typing.Callable[[C], Any], description: str | None,
                   defaults: typing.Callable[[C], C] | None = None) -> None:
    """A job's whole ``main``: flags from ``cls``, then ``run(defaults(config))``; bad input exits 2 with its message.

    ``defaults`` fills in what the user left out (the jobs pass the embedded default's,
    :mod:`dap_ray.steps.embedded`).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, cls)
    args = parser.parse_args()
    try:
        config = resolve_config(cls, args)
        run(defaults(config) if defaults else config)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    except RuntimeError as exc:  # a run that failed for a reason of its own (training diverged, ...)
        parser.exit(1, f"error: {exc}\n")


def resolve_config(cls: type[C], args: argparse.Namespace | None = None, **overrides: Any) -> C:
    """Defaults, then ``args.config`` (YAML), then flags given on the command line, then ``overrides``."""
    values: dict[str, Any] = {}
    names = [f.name for f in dataclasses.fields(cls)]
    if args is not None and getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of option names to values")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise ValueError(f"unknown key {key!r} in {path}: expected some of {names}")
            values[name] = value
    if args is not None:
        values.update({n: getattr(args, n) for n in names if getattr(args, n, None) is not None})
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}: expected some of {names}")
    values.update(overrides)
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        kind, _ = _unwrap_optional(hints[name])
        if typing.get_origin(kind) is tuple and isinstance(value, list):
            values[name] = tuple(value)
    return cls(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain YAML/JSON-ready values (tuples become lists, paths strings)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def save_config(config: Any, path: str | Path) -> Path:
    """Write ``config`` as YAML to ``path`` (re-usable as ``--config``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return kind, False


def _show(value: Any) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)
