"""What an import tells its caller: the report of a written file, or the refusal of a bad one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class ImportReport:
    """What an import did: ``rows`` data rows read; ``created``/``updated``/``unchanged``
    count the rows' own kind; ``organizations_created`` counts organizations created because
    a person or deal named one that did not exist."""

    kind: str
    rows: int
    created: int
    updated: int
    unchanged: int
    organizations_created: int = 0
    #: Addresses the CRM did not know before this import (new persons' and added ones):
    #: earlier mail carrying them can now be linked.
    new_addresses: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{self.kind}: {self.rows} rows, {self.created} created, {self.updated} updated, "
                f"{self.unchanged} unchanged")
        if self.organizations_created:
            text += f"; {self.organizations_created} organizations created"
        return text


class CsvImportError(Exception):
    """The file was refused and nothing was written; ``problems`` are
    ``FILE:LINE: column: message``, one per bad cell or row, in file order."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)
