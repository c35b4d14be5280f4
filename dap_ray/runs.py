"""Output folders shared by a run and its reruns: one writer at a time, and no mixing of settings.

Plain Python; every step (mining, classifier and detector training, fine-tuning) opens its
output through :func:`open_run`:

- a lock file (``OUTPUT/.dap_ray.lock``, naming host, process id, start time and command)
  keeps a second run out while the first is alive; a lock left by a dead process on this
  host is taken over with a warning. Stopping the log tail of ``ray job submit`` with
  Ctrl-C leaves the job running, so a second submission into the same folder is easy;
- a rerun into a folder that already holds results must have the same settings in every
  key that changes them (weights, scales, thresholds, learning rate, ...); otherwise it
  stops with the differing keys named, instead of resuming one run under another's
  settings. Keys that only change how the work is spread (workers, threads, batch of the
  mining model, logging) may differ.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

__all__ = ["LOCK_NAME", "OutputInUseError", "check_same_settings", "open_run", "settings_differ"]

LOCK_NAME = ".dap_ray.lock"


class OutputInUseError(ValueError):
    """Another live run holds the output folder."""


def settings_differ(saved: dict[str, Any], current: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """The ``keys`` whose values differ between two resolved configurations (YAML-plain dicts).

    Lists and tuples compare equal element-wise; a key missing on one side counts as None.
    """
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return [key for key in keys if plain(saved.get(key)) != plain(current.get(key))]


def check_same_settings(output: Path, current: dict[str, Any], what: str, *, keys: Iterable[str] | None = None,
                        except_keys: Iterable[str] = ()) -> None:
    """Raise ValueError naming the differing settings if ``output/config.yaml`` (an earlier run's)
    disagrees with ``current`` in ``keys`` (default: every key of either, less ``except_keys``);
    do nothing when there is no earlier configuration."""
    saved_path = Path(output) / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    if keys is None:
        keys = sorted((set(saved) | set(current)) - set(except_keys))
    differing = settings_differ(saved, current, keys)
    if differing:
        details = "; ".join(f"{k}: {saved.get(k)!r} then, {current.get(k)!r} now" for k in differing)
        raise ValueError(
            f"{output} already holds {what} made with other settings ({details}): resuming would mix two runs. "
            f"Give another --output, or rerun with the same settings to resume")


@contextlib.contextmanager
def open_run(output: str | Path) -> Iterator[Path]:
    """Create ``output`` and hold its lock for the duration of the ``with`` block.

    The lock is an advisory ``flock`` on ``OUTPUT/.dap_ray.lock``, which the kernel releases
    when its holder exits however it exits, so a killed run leaves no stale lock; the file
    names the holder for the message. Raises :class:`OutputInUseError` (a ValueError) naming
    the holder when another live process holds it. A process that already holds it (a step
    calling a step on the same folder) may enter again.
    """
    import fcntl

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    lock = output / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)}
    previous = _read_holder(lock)
    if previous.get("pid") == me["pid"] and previous.get("host") == me["host"] and _held(lock):
        yield output
        return
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        other = _read_holder(lock)
        raise OutputInUseError(
            f"{output} is in use by another run (process {other.get('pid')} on {other.get('host')}, since "
            f"{other.get('started')}: {other.get('command')}); wait for it to finish or give another --output") from None
    if previous.get("pid") not in (None, me["pid"]):
        print(f"note: {output} was last held by process {previous.get('pid')} ({previous.get('started')}), which "
              "has ended; this run takes it over", flush=True)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(me).encode())
    _HELD.add(str(lock.resolve()))
    try:
        yield output
    finally:
        _HELD.discard(str(lock.resolve()))
        os.close(fd)  # releases the flock


# Locks this process holds (by path): entering one again is a step calling a step, not a second run.
_HELD: set[str] = set()


def _held(lock: Path) -> bool:
    return str(lock.resolve()) in _HELD


def _read_holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}
