"""Build hook for the optional C extension; all other metadata lives in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and psky uses its
pure-Python MST inverter (``psky.atproto.mst.NATIVE_INVERSION`` says which one runs)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "psky.atproto._mst_native",
            ["psky/atproto/_mst_native.c"],
            optional=True,
        )
    ]
)
