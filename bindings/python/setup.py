"""Builds libkfac.so with SwiftPM and ships it inside the ``libkfac`` package.

pyproject.toml holds the metadata; this file adds what setuptools cannot declare:

* the version, read from ``include/kfac.h`` (the only place it is written);
* ``build_py``: runs ``swift build -c release -Xswiftc -static-stdlib --product kfac`` in the
  checkout this directory belongs to (the flags of ``make lib``, so an up-to-date ``.build`` is
  reused rather than rebuilt) and copies the library into the package as ``libkfac/libkfac.so``,
  where ``libkfac._lib`` looks first after ``KFAC_LIBRARY``. An editable install builds the
  library but copies nothing: the package then finds ``<checkout>/.build/release/libkfac.so``;
* ``bdist_wheel``: the wheel carries a native library, so it is tagged ``py3-none-<platform>``
  (any CPython 3, one OS and architecture) instead of pure.

Environment variables read at build time:

* ``KFAC_PREBUILT_LIBRARY`` — bundle this already built libkfac.so and do not run SwiftPM;
* ``KFAC_SWIFT_BUILD_PATH`` — SwiftPM's scratch directory (default ``<checkout>/.build``, the
  one ``make lib`` uses);
* ``SWIFT`` — the ``swift`` executable (default: ``swift`` on PATH, then ``/opt/swift/usr/bin/swift``).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:  # setuptools >= 70.1 has its own; older ones use the wheel package's
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # pragma: no cover
    from wheel.bdist_wheel import bdist_wheel

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
HEADER = CHECKOUT / "include" / "kfac.h"
LIBRARY_NAME = "libkfac.so"


def checkout_missing():
    return not (CHECKOUT / "Package.swift").is_file() or not HEADER.is_file()


def header_version():
    """MAJOR.MINOR.PATCH from kfac.h; outside a checkout (an sdist), the copy in _lib.py."""
    text = HEADER.read_text() if HEADER.is_file() else (HERE / "libkfac" / "_lib.py").read_text()
    parts = [re.search(r"^\s*(?:#define\s+)?KFAC_VERSION_%s\s*=?\s*(\d+)\s*$" % part, text, re.M)
             for part in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        sys.exit("libkfac: cannot read KFAC_VERSION_MAJOR/MINOR/PATCH from %s" % HEADER)
    return ".".join(match.group(1) for match in parts)


def swift_executable():
    for candidate in (os.environ.get("SWIFT"), shutil.which("swift"), "/opt/swift/usr/bin/swift"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    sys.exit("libkfac: building the wheel needs the Swift toolchain (swift 6, https://swift.org/install) "
             "on PATH or in SWIFT, and OpenBLAS and LAPACKE headers (Debian/Ubuntu: apt-get install "
             "libopenblas-dev liblapacke-dev); or set KFAC_PREBUILT_LIBRARY to a built libkfac.so.")


def build_library():
    """Path of a release libkfac.so: the prebuilt one, or SwiftPM's output."""
    prebuilt = os.environ.get("KFAC_PREBUILT_LIBRARY")
    if prebuilt:
        if not os.path.isfile(prebuilt):
            sys.exit("libkfac: KFAC_PREBUILT_LIBRARY=%s does not exist" % prebuilt)
        return Path(prebuilt)
    if checkout_missing():
        sys.exit("libkfac: %s is not inside a libkfac checkout (no Package.swift and include/kfac.h "
                 "two levels up); install from the checkout: pip install <checkout>/bindings/python"
                 % HERE)
    scratch = os.environ.get("KFAC_SWIFT_BUILD_PATH") or str(CHECKOUT / ".build")
    command = [swift_executable(), "build", "--package-path", str(CHECKOUT), "--scratch-path", scratch,
               "-c", "release", "-Xswiftc", "-static-stdlib", "--product", "kfac"]
    print("libkfac: " + " ".join(command), flush=True)
    subprocess.run(command, check=True)
    bin_path = subprocess.run(command[:-2] + ["--show-bin-path"], check=True, text=True,
                              stdout=subprocess.PIPE).stdout.strip().splitlines()[-1]
    library = Path(bin_path) / LIBRARY_NAME
    if not library.is_file():
        sys.exit("libkfac: SwiftPM did not produce %s" % library)
    return library


class BuildPyWithLibrary(build_py):
    """build_py, then the Swift library into the package (or, editable, only built)."""

    def run(self):
        super().run()
        library = build_library()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "libkfac" / LIBRARY_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(library, target)
        os.chmod(target, 0o755)
        print("libkfac: bundled %s as %s" % (library, target), flush=True)


class BinaryDistribution(Distribution):
    """The package carries a native library: not pure, installed into platlib."""

    def has_ext_modules(self):
        return True


class BdistWheelAnyPython(bdist_wheel):
    """ctypes, no extension module: any Python 3 and ABI, this platform only."""

    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(
    version=header_version(),
    distclass=BinaryDistribution,
    cmdclass={"build_py": BuildPyWithLibrary, "bdist_wheel": BdistWheelAnyPython},
)
