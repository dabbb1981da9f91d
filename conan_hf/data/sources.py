"""Training data sources of the stages: the ``data:`` entries of a stage config, read and checked row by row."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from conan_hf.errors import DataError

logger = logging.getLogger(__name__)
# ---- data sources ---------------------------------------------------------------------------------------------------
# A stage config lists its sources under ``data``; each entry is one of
#   - "demo": the stage's part of the embedded demo corpus (conan_hf.demo);
#   - a path or Hub dataset name, read by conan_hf.data.readers.load_rows (JSONL/CSV/TSV, SQuAD JSON, BEIR folders);
#   - a mapping {path: ..., columns: {wanted: source}, split: train, on_error: raise|skip, limit: N, ...}; other keys
#     go to conan_hf.data.readers.read_table (header, delimiter, format).
# Every row carries where it was read (conan_hf.data.readers.Row.location: "file:line" with the 1-based line of a
# JSONL file or the physical line of a CSV/TSV file, header included; "demo row N" for the demo corpus), and every
# message about a row names that place. Rows lacking a needed column, a text that is not a string, a score that is not
# a finite number, and a source without rows raise a DataError; with on_error: skip, rows that the reader cannot read
# are left out and counted in the log, never dropped silently.


def _as_list(sources: Any) -> list[Any]:
    if sources is None:
        return []
    if isinstance(sources, (str, dict)):
        return [sources]
    return list(sources)


def row_text(row: dict[str, Any], column: str, what: str, where: str | None = None, optional: bool = False) -> str:
    """The text in ``row[column]``, refusing anything that is not a string (a number or a list is not silently turned
    into text). A missing or ``None`` value is ``""`` when ``optional``, else an error. Errors name ``where``
    (default: the row's location)."""
    from conan_hf.errors import location_of

    where = location_of(row, where)
    value = row.get(column)
    if value is None:
        if optional:
            return ""
        raise DataError(f"{what}: no {column!r} column (the row has {sorted(row)})", where=where,
                        hint=f"map a source column to it with `columns: {{{column}: <source column>}}`")
    if not isinstance(value, str):
        raise DataError(f"{what}: column {column!r} must be a text, got {type(value).__name__} {value!r}", where=where,
                        hint="write it as a string in the data file (numbers and lists are not turned into text)")
    return value


def read_sources(
    sources: Any,
    demo: Callable[[], list[dict[str, Any]]],
    required: Sequence[str],
    numeric: Sequence[str] = (),
    what: str = "data",
    text: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Rows from every source in ``sources``, each checked to have the ``required`` columns.

    Every row returned is a :class:`conan_hf.data.readers.Row` that knows where it was read (``row.location``).

    Args:
        sources: see the comment above.
        demo: returns the demo rows for ``"demo"``.
        required: columns every row must have (after the column mapping).
        numeric: columns converted to float (e.g. an STS ``score``); a value that is not a finite number (text,
            NaN, inf, a boolean) raises.
        what: used in messages (e.g. ``"stage 2 (SFT) data"``).
        text: columns holding texts; where a row has them (required ones always) they must be strings.

    Raises:
        DataError: naming the file and 1-based line (``"demo row N"`` for demo data) of the first bad row, or the
            source that has no rows.
    """
    from conan_hf.data.readers import Row
    from conan_hf.errors import finite_float, location_of

    rows: list[dict[str, Any]] = []
    entries = _as_list(sources)
    if not entries:
        raise DataError(f"{what}: no data sources given", hint="list files, folders, Hub names or 'demo' under `data:`")
    for entry in entries:
        if entry == "demo":
            name, part = "demo", [Row(r, f"demo row {index}") for index, r in enumerate(demo(), 1)]
            limit = None
        else:
            from conan_hf.data.readers import load_rows

            spec = {"path": entry} if isinstance(entry, str) else dict(entry)
            if "path" not in spec:
                raise DataError(f"{what}: a data source mapping needs a 'path' (file, folder or Hub name): {entry!r}",
                                hint="write `{path: FILE, columns: {...}}`")
            name = str(spec.pop("path"))
            limit = spec.pop("limit", None)
            part = load_rows(name, spec.pop("columns", None), **spec)
            if getattr(part, "num_skipped", 0):
                logger.warning("%s: skipped %d bad row(s) of %s (on_error=skip)", what, part.num_skipped, name)
        skipped = getattr(part, "num_skipped", 0)
        if limit is not None:
            part = part[: int(limit)]
        if not part:
            why = f"all {skipped} rows were bad and skipped" if skipped else "the source is empty"
            raise DataError(f"{what}: no rows ({why})", where=name,
                            hint="give a source with at least one row, or remove it from `data:`")
        for index, row in enumerate(part, 1):
            where = location_of(row, f"{name} row {index}")
            missing = [c for c in required if c not in row or row[c] is None]
            if missing:
                raise DataError(
                    f"{what}: no {missing} column (the row has {sorted(row)})", where=where,
                    hint=f"map the source's columns with `columns: "
                         f"{{{', '.join(f'{c}: <source column>' for c in missing)}}}`",
                )
            for column in text:
                if column in row and row[column] is not None:
                    row_text(row, column, what, where)
            for column in numeric:
                try:
                    row[column] = finite_float(row[column])
                except ValueError as error:
                    raise DataError(f"{what}: column {column!r}: {error}", where=where,
                                    hint="fix the value, or remove the row") from None
        logger.info("%s: %d rows from %s", what, len(part), name)
        rows.extend(part)
    return rows


def split_holdout(rows: list[Any], fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Deterministic (train, held-out) split; ``fraction`` of the rows are held out (at least one if > 0)."""
    import random

    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_out = max(1, round(len(rows) * fraction)) if fraction > 0 else 0
    held = set(order[:n_out])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


