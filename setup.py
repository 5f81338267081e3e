"""Build hook for the optional C extension; all other metadata lives in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and psky runs its
pure-Python paths (``psky.atproto.mst.NATIVE_INVERSION`` and
``psky.atproto.firehose.NATIVE_COMMITS`` say which ones run)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "psky.atproto._native",
            ["psky/atproto/_native.c"],
            depends=["psky/atproto/_mst_native.c", "psky/atproto/_commit_native.c", "psky/atproto/_k256_native.c"],
            optional=True,
        )
    ]
)
