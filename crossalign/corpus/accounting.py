"""The ingest ledger: every input record ends in the tables, merged with a reason, or as a reject.

Kinds:
    image    image entries (a JSONL line, a run of table rows naming one image, a tar sample, a COCO
             image, a Flickr image named by the token file)
    caption  caption strings (list items, table cells, token-file lines, COCO annotations, .txt lines)
    record   input records that could not be read as either (a malformed line or row, a bad shard)

`records_in` is counted where records enter ingest; the outcomes are counted where rows are written
(the table writers and the rejects table), so the check catches any path that loses an item.
"""

from __future__ import annotations

from collections import Counter

KINDS = ("image", "caption", "record")
OUTCOMES = ("accepted", "merged", "rejected")


class IngestAccountingError(RuntimeError):
    """The ledger does not balance: a bug in ingest (some record was neither kept, merged nor rejected)."""


class Ledger:
    """Counts per kind of records in and of their outcomes."""

    def __init__(self) -> None:
        self.records_in: Counter[str] = Counter()
        self.outcomes: dict[str, Counter[str]] = {outcome: Counter() for outcome in OUTCOMES}

    def read(self, kind: str, count: int = 1) -> None:
        """`count` records of `kind` entered ingest."""
        self.records_in[kind] += count

    def outcome(self, outcome: str, kind: str, count: int = 1) -> None:
        """`count` records of `kind` ended as `outcome` (accepted, merged or rejected)."""
        self.outcomes[outcome][kind] += count

    def table(self) -> dict[str, dict[str, int]]:
        """{kind: {"in", "accepted", "merged", "rejected"}} for the kinds seen."""
        kinds = [k for k in KINDS if self.records_in[k] or any(self.outcomes[o][k] for o in OUTCOMES)]
        return {kind: {"in": self.records_in[kind], **{o: self.outcomes[o][kind] for o in OUTCOMES}}
                for kind in kinds}

    def check(self) -> dict[str, dict[str, int]]:
        """The table, after checking `in = accepted + merged + rejected` for every kind.

        Raises:
            IngestAccountingError: a kind does not balance.
        """
        table = self.table()
        wrong = {kind: row for kind, row in table.items()
                 if row["in"] != row["accepted"] + row["merged"] + row["rejected"]}
        if wrong:
            raise IngestAccountingError(f"ingest lost or double-counted records (a bug in crossalign): {wrong}")
        return table


def accounting_line(table: dict[str, dict[str, int]]) -> str:
    """One line for people: `image: 10 in = 8 accepted + 1 merged + 1 rejected; caption: ...`."""
    return "; ".join(f"{kind}: {row['in']} in = {row['accepted']} accepted + {row['merged']} merged + "
                     f"{row['rejected']} rejected" for kind, row in table.items())
