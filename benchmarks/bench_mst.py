"""MST hot paths on one core: sync 1.1 operation inversion and the strict walk.

Prints µs per :func:`invert_ops` call for 1-, 2- and 3-op commits (a realistic mix of
creates of fresh TIDs, updates and deletes) on trees of 5k and 100k records, over the
covering proof alone: with blocks already hash-checked (as the firehose does after
``read_car``) and re-hashing them, each with the C inverter (when built) and with the
Python one; the reference (thorough) algorithm both fall back to; then the strict and lax
:func:`walk` rates over a 100k-record tree.
Usage: python benchmarks/bench_mst.py [--seconds S] [--commits N] [--big N]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from psky.atproto import cbor, mst
from psky.atproto.cbor import CID
from psky.atproto.mst import MST, Op, _invert_thorough, invert_ops, walk
from psky.atproto.syntax import make_tid

try:
    from psky.atproto import _native
except ImportError:  # built without a C compiler
    _native = None  # type: ignore[assignment]

COLLECTIONS = ("app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.graph.follow", "app.bsky.feed.repost")


def _val(i: int) -> CID:
    return cbor.cid_for_cbor(i.to_bytes(8, "big"))


def _path(rng: random.Random, micros: int) -> str:
    return f"{rng.choice(COLLECTIONS)}/{make_tid(micros, rng.randrange(1024))}"


def make_tree(n: int, rng: random.Random) -> tuple[MST, dict[str, CID]]:
    """``n`` records under TID keys of a few collections, as a real repository holds."""
    base = 1_600_000_000_000_000
    entries = {_path(rng, base + i * 1000 + rng.randrange(1000)): _val(i) for i in range(n)}
    return MST.from_entries(entries.items()), entries


Commit = tuple[dict[CID, bytes], CID, list[Op], CID]


def make_commits(
    tree: MST, entries: dict[str, CID], n_ops: int, count: int, rng: random.Random
) -> list[Commit]:
    """Random commits against ``tree``: 70% creates (new TIDs at the end), 20% deletes, 10% updates."""
    keys = list(entries)
    root_before = tree.root_cid()
    out: list[Commit] = []
    now = 1_700_000_000_000_000
    for c in range(count):
        t = tree.copy()
        ops: list[Op] = []
        used: set[str] = set()
        while len(ops) < n_ops:
            r = rng.random()
            if r < 0.7:
                path = _path(rng, now + c * 10_000 + len(ops))
                if path in used or path in entries:
                    continue
                ops.append(Op("create", path, _val(10**9 + c * 10 + len(ops))))
                t.add(path, ops[-1].cid)  # type: ignore[arg-type]
            else:
                path = rng.choice(keys)
                if path in used:
                    continue
                if r < 0.9:
                    ops.append(Op("delete", path, None, entries[path]))
                    t.delete(path)
                else:
                    ops.append(Op("update", path, _val(2 * 10**9 + c), entries[path]))
                    t.update(path, ops[-1].cid)  # type: ignore[arg-type]
            used.add(path)
        proof = t.covering_proof([op.path for op in ops])
        out.append((proof, t.root_cid(), ops, root_before))
    return out


def per_call_us(fn: Callable[[], int], seconds: float) -> float:
    """Best µs per item over repeated rounds of ``fn`` (this machine's speed drifts: the
    fastest round is the most repeatable figure)."""
    best = float("inf")
    end = time.perf_counter() + seconds
    rounds = 0
    while rounds < 3 or time.perf_counter() < end:
        start = time.perf_counter()
        done = fn()
        best = min(best, (time.perf_counter() - start) / done)
        rounds += 1
    return best * 1e6


native_built = _native is not None
native_default = mst.NATIVE_INVERSION


def bench_invert(n: int, commits: int, seconds: float, rng: random.Random) -> None:
    t0 = time.perf_counter()
    tree, entries = make_tree(n, rng)
    print(f"tree of {n:,} records (height {tree.height}, built in {time.perf_counter() - t0:.1f} s)")
    for n_ops in (1, 2, 3):
        cases = make_commits(tree, entries, n_ops, commits, rng)
        for proof, after, ops, before in cases:  # correctness first
            assert invert_ops(proof, after, ops) == before

        def run_trusted(cases: list[Commit] = cases) -> int:
            for proof, after, ops, _ in cases:
                invert_ops(proof, after, ops, verify=False)
            return len(cases)

        def run_verified(cases: list[Commit] = cases) -> int:
            for proof, after, ops, _ in cases:
                invert_ops(proof, after, ops)
            return len(cases)

        def run_thorough(cases: list[Commit] = cases) -> int:
            for proof, after, ops, _ in cases:
                _invert_thorough(proof, after, ops, True)
            return len(cases)

        nodes = sum(len(p) for p, _, _, _ in cases) / len(cases)
        print(f"  {n_ops}-op commits ({nodes:4.1f} proof nodes), µs/inversion:")
        for label, native in (("C     ", True), ("Python", False)):
            if native and not native_built:
                print("    C inverter not built")
                continue
            mst.NATIVE_INVERSION = native
            try:
                print(
                    f"    {label} {per_call_us(run_trusted, seconds):7.2f} (blocks pre-verified), "
                    f"{per_call_us(run_verified, seconds):7.2f} re-hashing"
                )
            finally:
                mst.NATIVE_INVERSION = native_default
        print(f"    reference algorithm {per_call_us(run_thorough, seconds):7.1f}")


def bench_walk(n: int, seconds: float, rng: random.Random) -> None:
    tree, _ = make_tree(n, rng)
    blocks = tree.blocks()
    root = tree.root_cid()
    assert sum(1 for _ in walk(blocks, root)) == n

    def strict() -> int:
        for _ in walk(blocks, root):
            pass
        return n

    def lax() -> int:
        for _ in walk(blocks, root, strict=False):
            pass
        return n

    us = per_call_us(strict, seconds)
    print(f"strict walk, {n:,} records: {us:.3f} µs/entry ({1e6 / us:,.0f} entries/s)")
    us = per_call_us(lax, seconds)
    print(f"lax walk,    {n:,} records: {us:.3f} µs/entry ({1e6 / us:,.0f} entries/s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    ap.add_argument("--commits", type=int, default=300, help="distinct commits per case")
    ap.add_argument("--big", type=int, default=100_000, help="records in the large tree")
    args = ap.parse_args()
    rng = random.Random(1)
    sha = f", SHA-NI {'on' if _native.SHA_NI else 'off'}" if native_built else ""
    print(f"C inverter built: {native_built}, used by default: {native_default}{sha}")
    for n in (5_000, args.big):
        bench_invert(n, args.commits, args.seconds, rng)
    bench_walk(args.big, args.seconds, rng)


if __name__ == "__main__":
    main()
