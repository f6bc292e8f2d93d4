"""Build the neon_ext C extension in place: ``python neon_ext/build.py``.

Produces neon_ext/_kernels<EXT_SUFFIX> next to this file, importable as
``import neon_ext`` from the repository root.  Flags: -O3 without -ffast-math
(the kernels rely on IEEE semantics: NaN checks, exact rounding tricks) and
-ffp-contract=off so that the compiler never fuses a*b+c on its own; the SIMD
paths use FMA only where written explicitly, which keeps every path's rounding
predictable.  The AVX2 code is selected per function with target attributes,
so the extension itself is built for the baseline ISA.
"""

import os
import sys
from pathlib import Path

from setuptools import Distribution, Extension

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
# The kernel sources only, shared with the aarch64 cross-compiled test program.
KERNEL_SOURCES = ["cpu.c", "softmax.c", "rmsnorm.c", "activations.c", "rope.c", "matmul.c", "fp8.c"]
CFLAGS = ["-O3", "-std=gnu11", "-fno-fast-math", "-ffp-contract=off", "-Wall", "-Wextra"]


def main() -> None:
    os.chdir(HERE.parent)  # inplace builds place the module relative to the cwd
    ext = Extension(
        "neon_ext._kernels",
        sources=[f"neon_ext/csrc/{name}" for name in KERNEL_SOURCES + ["module.c"]],
        depends=[f"neon_ext/csrc/{p.name}" for p in sorted(CSRC.glob("*.h"))],
        extra_compile_args=CFLAGS,
        libraries=["m"],
    )
    # A bare Distribution: the project's setup.cfg describes the Python package, not this build.
    dist = Distribution({"name": "neon_ext", "ext_modules": [ext]})
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    cmd.build_temp = "build/neon_ext"
    dist.run_command("build_ext")
    print(f"built {Path(cmd.get_ext_fullpath(ext.name)).resolve().relative_to(HERE.parent)}")


if __name__ == "__main__":
    sys.exit(main())
