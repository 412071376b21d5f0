"""Build the compiled core, and the patched picows vendored in fastfan/_picows.

FASTFAN_ANNOTATE=1 also writes fastfan/_core.html (`cython -a`): every yellow line is a
Python interaction; none belongs inside the per-delivery loop.
FASTFAN_DEBUG=1 builds with assertions and without optimisation, for gdb.
"""

import os
import platform

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

debug = os.environ.get("FASTFAN_DEBUG") == "1"
PICOWS = "fastfan/_picows/"


def picows_mask_units() -> dict[str, str]:
    """picows's frame masking, one source per instruction set with the flag it needs (as in
    picows's own setup.py; mask_dispatch.c picks one at run time). POSIX compilers only:
    fastfan runs on uvloop."""
    machine = platform.machine().lower()
    if machine in {"x86_64", "amd64", "x64", "i386", "i686", "x86"}:
        return {"mask_sse2.c": "-msse2", "mask_avx2.c": "-mavx2", "mask_avx512.c": "-mavx512f"}
    if machine in {"aarch64", "arm64", "armv7l", "armv8l"}:
        return {"mask_neon.c": ""}
    return {}


class BuildExt(build_ext):
    """setuptools has compile flags per extension only: the mask sources are compiled here,
    each with its own flag, and linked into picows as extra objects."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name == "fastfan._picows.picows":
            self.mkpath(self.build_temp)
            for source, flag in picows_mask_units().items():
                ext.extra_objects += self.compiler.compile(
                    [PICOWS + source], output_dir=self.build_temp, macros=ext.define_macros,
                    include_dirs=ext.include_dirs, debug=self.debug,
                    extra_postargs=[flag] if flag else [], depends=ext.depends)
        super().build_extension(ext)


core = Extension(
    "fastfan._core",
    ["fastfan/_core.pyx"],
    libraries=["z"],  # permessage-deflate (fastfan/_deflate.pxi)
    extra_compile_args=["-O0", "-g"] if debug else ["-O2"],
)
# The Redis bus's per-message work (fastfan/bus/_resp.pyx); it cimports the core's Hub.
redis_path = Extension(
    "fastfan.bus._resp",
    ["fastfan/bus/_resp.pyx"],
    extra_compile_args=["-O0", "-g"] if debug else ["-O2"],
)
picows = Extension(
    "fastfan._picows.picows",
    [PICOWS + "picows.pyx", PICOWS + "mask_dispatch.c"],
    # (depends: also what puts these sources into an sdist, every machine's)
    depends=[PICOWS + name for name in ("compat.h", "mask_sse2.c", "mask_avx2.c",
                                        "mask_avx512.c", "mask_neon.c")],
)

setup(
    ext_modules=cythonize(
        [core, redis_path],
        annotate=os.environ.get("FASTFAN_ANNOTATE") == "1",
        compiler_directives={
            "language_level": 3,
            "boundscheck": debug,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": debug,
        },
    )
    # picows with the directives of its own setup.py
    + cythonize(
        [picows],
        compiler_directives={
            "language_level": 3,
            "freethreading_compatible": True,
            "profile": False,
            "nonecheck": False,
            "boundscheck": False,
            "wraparound": False,
            "initializedcheck": False,
            "optimize.use_switch": False,
            "cdivision": True,
        },
    ),
    cmdclass={"build_ext": BuildExt},
)
