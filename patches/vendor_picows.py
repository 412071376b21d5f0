#!/usr/bin/env python3
"""Re-derive fastfan/_picows/ from the picows sdist and the patches beside this script.

    python patches/vendor_picows.py           write fastfan/_picows/ afresh
    python patches/vendor_picows.py --check   exit 1 if fastfan/_picows/ differs from it

fastfan/_picows/ is the picows 2.3.1 sdist's `picows/` package with PATCHES applied (in that
order), its version stamped PATCHED_VERSION, and only the files fastfan builds and imports
(FILES); LICENSE comes from the sdist's root. Nothing else in it may differ from upstream:
change a patch and run this, never edit the vendored copy by hand. See README.md here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

UPSTREAM = "2.3.1"
# Bump the number after `fastfan.` with every change to a patch: `fastfan run` logs it.
PATCHED_VERSION = f"{UPSTREAM}+fastfan.4"
PATCHES = ["picows-2.3.1-idle-memory.patch", "picows-2.3.1-close-ends-parsing.patch",
           "picows-2.3.1-listener-factory-may-answer-later.patch"]
# picows/websockets (a websockets-compatible API) and the examples are left out: unused.
FILES = ["__init__.py", "api.py", "common.py", "url.py", "proxy.py", "version.py", "py.typed",
         "picows.pyx", "picows.pxd", "picows.pyi", "compat.h", "mask_dispatch.c",
         "mask_sse2.c", "mask_avx2.c", "mask_avx512.c", "mask_neon.c"]

HERE = Path(__file__).resolve().parent
VENDORED = HERE.parent / "fastfan" / "_picows"


def derive(work: Path) -> dict[str, bytes]:
    """The vendored files by name, from the sdist downloaded into `work`."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--no-binary", "picows", f"picows=={UPSTREAM}", "-d", str(work)],
                   check=True)
    with tarfile.open(work / f"picows-{UPSTREAM}.tar.gz") as sdist:
        sdist.extractall(work, filter="data")
    root = work / f"picows-{UPSTREAM}"
    for patch in PATCHES:
        # git apply, not patch(1): a fresh Debian that cloned this has git, not always patch.
        subprocess.run(["git", "apply", str(HERE / patch)], cwd=root, check=True)
    version = root / "picows" / "version.py"
    version.write_text(version.read_text().replace(f'__version__ = "{UPSTREAM}"',
                                                   f'__version__ = "{PATCHED_VERSION}"'))
    files = {name: (root / "picows" / name).read_bytes() for name in FILES}
    files["LICENSE"] = (root / "LICENSE").read_bytes()
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with fastfan/_picows/ instead of writing it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        files = derive(Path(work))
    if args.check:
        # Besides these, only what a build leaves there (ignored by git) may be in it.
        present = {path.name for path in VENDORED.iterdir() if path.is_file()
                   and path.name not in {"picows.c", "picows.html"} and path.suffix != ".so"}
        differing = sorted(name for name in files.keys() | present
                           if name not in files or name not in present
                           or (VENDORED / name).read_bytes() != files[name])
        for name in differing:
            print(f"fastfan/_picows/{name} differs from picows {UPSTREAM} + patches",
                  file=sys.stderr)
        return 1 if differing else 0
    VENDORED.mkdir(exist_ok=True)
    for name, content in files.items():
        (VENDORED / name).write_bytes(content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
