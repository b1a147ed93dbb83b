"""Build shim: metadata lives in setup.cfg; this adds the compiled CPU kernels of the CRF (plain C, loaded with
ctypes by deeplab_cli/native.py)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "deeplab_cli._native",
            ["deeplab_cli/_lattice.c", "deeplab_cli/_meanfield.c"],
            extra_compile_args=["-O3", "-pthread", "-std=gnu11", "-Wno-psabi"],
            extra_link_args=["-pthread"],
        )
    ]
)
