"""The README and the manual under docs/: every relative link and image resolves in the checkout
(a fresh clone has only what was committed, so an ignored or forgotten file fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML = re.compile(r"<(?:img|a)\s[^>]*?(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)
_FENCE = re.compile(r"^(```|~~~)")


def relative_targets(text: str) -> list[str]:
    """The relative link and image targets of markdown ``text``, outside fenced code and inline code,
    without their ``#fragment``; web addresses and in-page anchors are not targets."""
    targets, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if fenced:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        for found in [*_LINK.findall(line), *_HTML.findall(line)]:
            if re.match(r"^[a-z][a-z0-9+.-]*:", found, re.IGNORECASE) or found.startswith("#"):
                continue
            targets.append(found.split("#", 1)[0])
    return targets


@pytest.mark.parametrize("text, expected", [
    ("", []),
    ("no links here", []),
    ("see [the manual](docs/index.md) and ![a plot](docs/a.png)", ["docs/index.md", "docs/a.png"]),
    ("[up](../README.md#install) [web](https://ray.io) [anchor](#install) [mail](mailto:a@b.c)", ["../README.md"]),
    ('[titled](docs/x.md "the title") <img src="docs/y.png" width="300">', ["docs/x.md", "docs/y.png"]),
    ("```\n[in code](missing.md)\n```\n`[inline](missing.md)` [after](docs/z.md)", ["docs/z.md"]),
])
def test_relative_targets(text, expected):
    assert relative_targets(text) == expected


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("document", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(document):
    missing = [target for target in relative_targets(document.read_text(encoding="utf-8"))
               if not (document.parent / target).exists()]
    assert not missing, f"{document.relative_to(ROOT)} links to files that are not in the checkout: {missing}"
