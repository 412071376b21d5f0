"""Build the compiled core.

FASTFAN_ANNOTATE=1 also writes fastfan/_core.html (`cython -a`): every yellow line is a
Python interaction; none belongs inside the per-delivery loop.
FASTFAN_DEBUG=1 builds with assertions and without optimisation, for gdb.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("FASTFAN_DEBUG") == "1"

extension = Extension(
    "fastfan._core",
    ["fastfan/_core.pyx"],
    libraries=["z"],  # permessage-deflate (fastfan/_deflate.pxi)
    extra_compile_args=["-O0", "-g"] if debug else ["-O2"],
)

setup(
    ext_modules=cythonize(
        [extension],
        annotate=os.environ.get("FASTFAN_ANNOTATE") == "1",
        compiler_directives={
            "language_level": 3,
            "boundscheck": debug,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": debug,
        },
    )
)
