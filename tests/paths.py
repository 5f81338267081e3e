"""Where the tests find their data: the public atproto interop vectors (CC-0, copied from
shared/fixtures/interop) and the lexicons bundled with psky."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
INTEROP = TESTS / "fixtures" / "interop"
