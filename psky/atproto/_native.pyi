"""Type stub of the optional C extension built from _native.c (_mst_native.c, _commit_native.c)."""

from collections.abc import Mapping, Sequence

from cbrrr import CID

SHA_NI: int

def invert(
    blocks: Mapping[CID, bytes], root_after: CID, ops: Sequence[tuple[object, ...]], verify: bool, /
) -> bytes | None: ...
def commit_fast(
    frame: bytes, verify: bool, /
) -> (
    tuple[
        int, str, str, str, bytes, bytes | None, bytes | None, bytes | None, bytes | None,
        list[tuple[str, str, bytes]],
    ]
    | None
): ...
def sha256(data: bytes, portable: bool = False, /) -> bytes: ...
def key_height(key: bytes, /) -> int: ...
def key_heights(key1: bytes, key2: bytes, /) -> tuple[int, int]: ...
def use_sha_ni(enable: bool, /) -> bool: ...
