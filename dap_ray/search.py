"""Search ranges for the sweeps, as plain Python: a range with the hard limits it may grow to, whether
a best value sits on its edge, and the range grown past that edge for another round.

An optimum found on a range's edge has not been found: the true one may lie outside. The sweeps
(:mod:`dap_ray.steps.tune`) check their best setting with :func:`edges_hit`, and run another
round over :func:`extend`-ed ranges, or say why they did not (the range is at its hard limit,
or no rounds were left).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SearchRange", "covering_ranges", "describe_edge", "describe_rounds", "edges_hit", "extend",
           "threshold_set"]

# A best value within this share of a range's width from an edge counts as on the edge (a
# sampler rarely draws the bound itself).
EDGE_SHARE = 0.05


@dataclass(frozen=True)
class SearchRange:
    """``low`` to ``high`` for parameter ``name``, searched on a log scale when ``log``, in whole
    numbers when ``integer``; it may grow as far as ``limit_low`` and ``limit_high``."""

    name: str
    low: float
    high: float
    limit_low: float
    limit_high: float
    log: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        if not self.limit_low <= self.low <= self.high <= self.limit_high:
            raise ValueError(f"the {self.name} range [{self.low}, {self.high}] must lie within "
                             f"[{self.limit_low}, {self.limit_high}] with its low end first")
        if self.log and self.low <= 0:
            raise ValueError(f"the {self.name} range is searched on a log scale: its low end must be positive, "
                             f"got {self.low}")
        if self.integer and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"the {self.name} range holds whole numbers, got [{self.low}, {self.high}]")

    def _scaled(self, value: float) -> float:
        return math.log(value) if self.log else value

    def edge(self, value: float) -> str | None:
        """``"low"`` or ``"high"`` when ``value`` sits on that edge of the range (within
        :data:`EDGE_SHARE` of its width, on its own scale), else None. A range of one value has
        no edge to move past."""
        if self.low == self.high:
            return None
        width = self._scaled(self.high) - self._scaled(self.low)
        if self._scaled(value) - self._scaled(self.low) <= EDGE_SHARE * width:
            return "low"
        if self._scaled(self.high) - self._scaled(value) <= EDGE_SHARE * width:
            return "high"
        return None

    def grown(self, side: str) -> SearchRange:
        """The range grown past its ``side`` edge by its own width (a factor of its span on a log
        scale), stopped at the hard limit; the same range when already there."""
        import dataclasses

        if self.log:
            factor = self.high / self.low
            low, high = (max(self.limit_low, self.low / factor), self.high) if side == "low" else (
                self.low, min(self.limit_high, self.high * factor))
        else:
            width = self.high - self.low
            low, high = (max(self.limit_low, self.low - width), self.high) if side == "low" else (
                self.low, min(self.limit_high, self.high + width))
        if self.integer:
            low, high = math.floor(low), math.ceil(high)
        return dataclasses.replace(self, low=low, high=high)


def edges_hit(ranges: list[SearchRange], best: dict, rounds_left: int = 0) -> list[dict]:
    """For each range whose parameter's best value sits on an edge: ``name``, ``value``, ``side``,
    the ``range``, ``growable`` (False when that edge is the hard limit) and ``action`` (what a
    search with ``rounds_left`` further rounds does about it). Empty when the best lies inside
    every range."""
    hits = []
    for search_range in ranges:
        side = search_range.edge(best[search_range.name])
        if side is None:
            continue
        growable = search_range.grown(side) != search_range
        action = ("at its hard limit, not grown" if not growable else
                  "grown for the next round" if rounds_left else "no rounds left to grow it (--extend-rounds)")
        hits.append({"name": search_range.name, "value": best[search_range.name], "side": side,
                     "range": [search_range.low, search_range.high], "growable": growable, "action": action,
                     "limit": search_range.limit_low if side == "low" else search_range.limit_high})
    return hits


def describe_edge(hit: dict) -> str:
    """One line for an :func:`edges_hit` entry."""
    return (f"the best {hit['name']} {hit['value']:g} sits on the {hit['side']} edge of "
            f"[{hit['range'][0]:g}, {hit['range'][1]:g}]: {hit['action']}")


def describe_rounds(records: list[dict], prefix: str, best_key: str, objective: str) -> list[str]:
    """Markdown lines for a search's rounds (each ``{"round", "trials", "ranges", "edges", best_key}``):
    the ranges each searched, the best ``objective`` so far, and the edges the best sat on."""
    lines: list[str] = []
    for record in records:
        ranges = ", ".join(f"{name} [{low:g}, {high:g}]" for name, (low, high) in record["ranges"].items())
        lines += ["", f"{prefix}round {record['round']}: {record['trials']} trials over {ranges}; best {objective} so "
                  f"far {record[best_key]:.2f}."]
        lines += [f"- {describe_edge(hit)}." for hit in record["edges"]]
    if records and not records[-1]["edges"]:
        lines.append("- the best setting lies inside every range.")
    return lines


def extend(ranges: list[SearchRange], hits: list[dict]) -> list[SearchRange]:
    """``ranges`` with each growable hit's range grown past the edge it hit."""
    sides = {hit["name"]: hit["side"] for hit in hits if hit["growable"]}
    return [r.grown(sides[r.name]) if r.name in sides else r for r in ranges]


def covering_ranges(searched: list[dict[str, list[float]]], limits: list[SearchRange]) -> dict[str, list[float]]:
    """The smallest ranges covering each of ``searched`` (every one ``{name: [low, high]}``, as a
    search's round records them), held within the hard limits of ``limits`` (the ranges the
    searches started from). Two searches that must compare (the tuned loop's CLS and DAP at one
    K) are fair only over the same ranges: the one whose final ranges fall short of these is
    searched again over them. No searches: the starting ranges. Raises ValueError when the
    searches name other parameters than ``limits``."""
    names = [r.name for r in limits]
    for ranges in searched:
        if sorted(ranges) != sorted(names):
            raise ValueError(f"ranges over {sorted(ranges)} cannot be matched with ranges over {sorted(names)}")
    covering = {}
    for limit in limits:
        low = min([ranges[limit.name][0] for ranges in searched] or [limit.low])
        high = max([ranges[limit.name][1] for ranges in searched] or [limit.high])
        covering[limit.name] = [max(limit.limit_low, low), min(limit.limit_high, high)]
    return covering


def threshold_set(start: float, step: float, count: int) -> tuple[float, ...]:
    """The CAM thresholds ``start, start + step, ...``: ``count`` of them, rounded to 3 decimals,
    those at 0.99 or above dropped (a CAM normalised to [0, 1] has almost no cell there); at
    least ``start``. The paper's set is ``threshold_set(0.2, 0.1, 4)``."""
    if not 0 < start < 1 or step <= 0 or count < 1:
        raise ValueError(f"a threshold set needs 0 < start < 1, step > 0 and count >= 1, got {start}, {step}, {count}")
    values = [round(start + i * step, 3) for i in range(int(count))]
    return tuple(v for v in values if v < 0.99) or (round(start, 3),)
