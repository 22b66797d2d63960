"""CSV / TSV captions tables read row by row, so that one malformed row is one reject, not a failed ingest.

UTF-8 with an optional byte-order mark; CRLF or LF line ends; quoted fields may span lines (up to
`MAX_ROW_LINES`). A row with more fields than the header, an unterminated quote or a field the csv
module refuses becomes a `BadRecord` naming its line, and reading goes on with the next line.
"""

from __future__ import annotations

import csv
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from crossalign.corpus.folder import TEXT_ENCODING, BadRecord

MAX_ROW_LINES = 64  # a quoted field still open after this many lines is taken for an unterminated quote


def read_delimited(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, str]] | BadRecord]:
    """(line number, {column: value}) for each data row of `path`, or a BadRecord for a malformed one.

    Rows with fewer fields than the header get "" for the missing ones (as pandas reads them); blank
    lines are skipped. Yields nothing for a file with no header row.
    """
    with path.open(newline="", **TEXT_ENCODING) as file:
        header: list[str] | None = None
        for item in _rows(file, delimiter, path.name):
            if isinstance(item, BadRecord):
                yield item
                continue
            number, fields = item
            if header is None:
                header = fields
                continue
            if len(fields) > len(header):
                yield BadRecord(number, f"{path.name}:{number}: the row has {len(fields)} fields, the header "
                                f"{len(header)}", source=f"{path.name}:{number}")
                continue
            fields += [""] * (len(header) - len(fields))
            row: dict[str, str] = {}
            for name, value in zip(header, fields):
                row.setdefault(name, value)  # a repeated column name: the first one counts
            yield number, row


def _rows(lines: Iterator[str], delimiter: str, name: str) -> Iterator[tuple[int, list[str]] | BadRecord]:
    """Parse physical lines into rows, joining lines only while a quoted field is open."""
    ahead: deque[tuple[int, str]] = deque()
    numbered = enumerate(lines, start=1)

    def fill(count: int) -> bool:
        while len(ahead) < count:
            line = next(numbered, None)
            if line is None:
                return False
            ahead.append(line)
        return True

    while fill(1):
        size, row, error, open_quote = 0, None, "", True
        while open_quote:
            size += 1
            if size > MAX_ROW_LINES:
                error = f"unterminated quote: no closing quote within {MAX_ROW_LINES} lines"
                break
            if not fill(size):
                error = "unterminated quote: the file ends inside a quoted field"
                break
            row, error, open_quote = _parse([ahead[k][1] for k in range(size)], delimiter)
        number = ahead[0][0]
        if row is None:
            ahead.popleft()  # the next try starts at the line after the bad one
            yield BadRecord(number, f"{name}:{number}: {error}", source=f"{name}:{number}")
            continue
        for _ in range(size):
            ahead.popleft()
        if row:  # a blank line is no record
            yield number, row


def _parse(lines: list[str], delimiter: str) -> tuple[list[str] | None, str, bool]:
    """(the row, "", False); (None, why, True) while a quoted field is still open; (None, why, False)."""
    try:
        rows = list(csv.reader(lines, delimiter=delimiter, strict=True))
    except csv.Error as err:
        if "unexpected end of data" in str(err):
            return None, str(err), True
        if len(lines) > 1:  # a quote that closes lines later but not cleanly: rows swallowed, not a field
            return None, "unterminated quote: the quoted field does not end cleanly on a later line", False
        try:  # lenient on stray quotes inside a field, as pandas is
            rows = list(csv.reader(lines, delimiter=delimiter))
        except csv.Error as lenient:
            return None, f"malformed row ({lenient})", False
    if len(rows) > 1:
        return None, "malformed row (line breaks outside quotes)", False
    return (rows[0] if rows else []), "", False
