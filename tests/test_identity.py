"""DID and handle resolution against the devnet's real PLC directory and PDS on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from psky.devnet.pds import Pds
from psky.devnet.plc import PlcDirectory
from psky.identity import IdentityResolver, ResolutionError, parse_handle_map


@pytest.fixture
async def net() -> AsyncIterator[tuple[PlcDirectory, Pds]]:
    plc = PlcDirectory()
    await plc.start()
    pds = Pds(plc.url, hostname="pds1.test")
    await pds.start()
    try:
        yield plc, pds
    finally:
        await pds.stop()
        await plc.stop()


async def test_resolve_did_and_handle(net: tuple[PlcDirectory, Pds]) -> None:
    plc, pds = net
    acct = await pds.create_account("alice")
    async with IdentityResolver(plc.url, handle_map=pds.handle_resolver_entry()) as res:
        doc = await res.resolve(acct.did)
        assert doc.handle == "alice.pds1.test"
        assert doc.pds_endpoint == pds.url
        assert await res.signing_key(acct.did) == acct.signing_key.did_key()
        assert await res.resolve_handle("Alice.PDS1.test") == acct.did
        assert await res.resolve_handle("nobody.pds1.test") is None
        # unmapped handles go to https://<handle>, which does not exist here
        assert await res.resolve_handle("alice.unmapped.invalid") is None


async def test_cache_and_invalidate(net: tuple[PlcDirectory, Pds]) -> None:
    plc, pds = net
    acct = await pds.create_account("bob")
    async with IdentityResolver(plc.url) as res:
        first = await res.resolve(acct.did)
        await pds.update_handle(acct.did, "robert")
        assert (await res.resolve(acct.did)) is first  # cached
        res.invalidate(acct.did)
        assert (await res.resolve(acct.did)).handle == "robert.pds1.test"


async def test_unknown_did_and_bad_method(net: tuple[PlcDirectory, Pds]) -> None:
    plc, _pds = net
    async with IdentityResolver(plc.url) as res:
        with pytest.raises(ResolutionError, match="not found"):
            await res.resolve("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
        with pytest.raises(ResolutionError, match="unsupported DID method"):
            await res.resolve("did:example:123")
    async with IdentityResolver("http://127.0.0.1:1") as res:
        with pytest.raises(ResolutionError, match="cannot fetch"):
            await res.resolve("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")


@pytest.mark.parametrize("text", ["foo", "*.a=ftp://x", "a*.b=http://x", "=http://x"])
def test_handle_map_errors(text: str) -> None:
    with pytest.raises(ValueError, match="PSKY_HANDLE_RESOLVER_MAP"):
        parse_handle_map(text)


def test_handle_map_parses() -> None:
    assert parse_handle_map(" *.A.test=http://127.0.0.1:5/ , b.test=https://h ") == [
        ("*.a.test", "http://127.0.0.1:5"), ("b.test", "https://h")]
