"""The ordered list of psky's schema migrations.

Each migration is a module ``vNNNN_<name>.py`` holding ``VERSION``, ``NAME`` and ``SQL`` (one
script, run in a single transaction with ``search_path`` set to the target schema). They
are Python modules rather than ``.sql`` files so they ship inside the package with no
package-data configuration. Applied migrations are never edited: the runner stores each
one's checksum and refuses to run against a database whose record disagrees.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from psky.db.schema import v0001_baseline


@dataclass(frozen=True)
class Migration:
    """One versioned schema change."""

    version: str
    name: str
    sql: str
    # (kysely migration name, source file) of the TypeScript migrations whose combined
    # effect this one reproduces: a database where all of them ran is adopted, not migrated.
    kysely_equivalent: tuple[tuple[str, str], ...] = ()
    checksum: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checksum", hashlib.sha256(self.sql.encode()).hexdigest())


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        v0001_baseline.VERSION,
        v0001_baseline.NAME,
        v0001_baseline.SQL,
        kysely_equivalent=v0001_baseline.KYSELY_MIGRATIONS,
    ),
)

BASELINE = MIGRATIONS[0]

