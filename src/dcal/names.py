"""Names (classes, files) fitted into a picture title or a table cell without losing what tells them apart.

One home for shortening names: the attention pictures (``dcal visualize``, ``dcal demo``) and ``dcal predict``'s
table use it. A name is never cut at its end (``013.Red_faced_`` / two columns both ``Spotted_Catbird_00``):
it is wrapped over a few lines, and only a name longer than all of them loses its middle (``Spotted_Ca…0001.jpg``:
the start and the distinguishing end stay). Names shown side by side that would still read the same lose their
common prefix instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from dcal.data.images import printable

ELLIPSIS = "…"
_BREAK_AFTER = re.compile(r"[_\-. /]")  # a line may end after these: words of class and file names


def shorten(name: str | os.PathLike, width: int) -> str:
    """``name`` (made :func:`printable`) in at most ``width`` characters: whole when it fits, else its start and its
    end around an ellipsis (the end of a file or class name is what usually tells it apart)."""
    text = printable(name)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if len(text) <= width:
        return text
    if width < 3:
        return text[:width]
    tail = (width - 1) // 2
    return text[: width - 1 - tail] + ELLIPSIS + text[len(text) - tail:]


def wrap(name: str | os.PathLike, width: int = 18, lines: int = 2) -> str:
    """``name`` on at most ``lines`` lines of at most ``width`` characters, broken after ``_ - . /`` or a space
    when one is near the end of a line (else mid-word); a name longer than all lines is :func:`shorten` ed
    first."""
    text = shorten(name, width * lines)
    out = []
    while len(text) > width:
        cut = max((m.end() for m in _BREAK_AFTER.finditer(text, 0, width) if m.end() >= width // 2), default=width)
        out.append(text[:cut].rstrip(" "))
        text = text[cut:]
    return "\n".join([*out, text])


def _common_prefix(names: Sequence[str]) -> str:
    prefix = os.path.commonprefix(list(names))
    # whole words only: "Spotted_Catbird_0001" and "_0002" share "Spotted_Catbird_000", keep "Spotted_Catbird_"
    cut = max((m.end() for m in _BREAK_AFTER.finditer(prefix)), default=0)
    return prefix[:cut]


def wrap_all(names: Sequence[str | os.PathLike], width: int = 18, lines: int = 2) -> list[str]:
    """:func:`wrap` for names shown together: when two different names would read the same, their common prefix
    (whole words) is replaced by an ellipsis so that the parts that differ fit."""
    texts = [printable(n) for n in names]
    out = [wrap(t, width, lines) for t in texts]
    if len(set(out)) == len(set(texts)):
        return out
    prefix = _common_prefix(texts)
    if not prefix:
        return out
    return [wrap(ELLIPSIS + t[len(prefix):], width, lines) for t in texts]
