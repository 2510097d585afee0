"""Writing result files so that no reader ever sees half of one (no torch needed).

Every file this repository's experiments write (run results, metrics, checkpoints, summaries,
benchmark tables) goes through :func:`write_atomically`: it is written beside its final name and
renamed into place, so a crash, a kill or a full disk leaves the previous file whole, and a
notebook polling a run's results reads either the old file or the new one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_atomically", "write_json_atomically", "write_text_atomically"]


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(partial)`` on a file beside `path` (``<path>.partial``), then rename it to `path`.

    Raises
    ------
    Whatever `write` raises, after removing the partial file; `path` is then unchanged.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # no half-written file left beside the whole one
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    """`text` (UTF-8) in `path` with :func:`write_atomically`."""
    write_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))


def write_json_atomically(path: str | Path, value: Any, **dumps_options: Any) -> None:
    """`value` as JSON in `path` with :func:`write_atomically` (`dumps_options` go to ``json.dumps``).

    Non-finite floats (an interval over one seed is NaN) are written as null: JSON has no NaN,
    and strict parsers refuse Python's ``NaN``.
    """
    write_text_atomically(path, json.dumps(_finite_or_null(value), allow_nan=False, **dumps_options))


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value
