"""Build the neon_ext extensions in place: ``python neon_ext/build.py``.

Produces, next to this file:

- ``_kernels<EXT_SUFFIX>``: the kernels and their NumPy-buffer binding (plain C).  Flags: -O3
  without -ffast-math (the kernels rely on IEEE semantics: NaN checks, exact rounding tricks) and
  -ffp-contract=off so that the compiler never fuses a*b+c on its own; the SIMD paths use FMA only
  where written explicitly, which keeps every path's rounding predictable.  The AVX2 code is
  selected per function with target attributes, so the extension itself is built for the
  baseline ISA.
- ``_torch<EXT_SUFFIX>``: the torch-tensor fast path (C++ against the installed torch, which it
  must match; rebuilt by this script whenever torch is importable).  It holds no kernels: it
  calls those of ``_kernels`` through a capsule.  Without torch it is skipped and neon_ext works
  through NumPy views alone.
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
HEADERS = [f"neon_ext/csrc/{p.name}" for p in sorted(CSRC.glob("*.h"))]


def build(ext: Extension, cmdclass: dict | None = None) -> None:
    # A bare Distribution: the project's setup.cfg describes the Python package, not this build.
    dist = Distribution({"name": "neon_ext", "ext_modules": [ext], "cmdclass": cmdclass or {}})
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    cmd.build_temp = "build/neon_ext"
    dist.run_command("build_ext")
    print(f"built {Path(cmd.get_ext_fullpath(ext.name)).resolve().relative_to(HERE.parent)}")


def torch_extension():
    """The _torch extension and its build command, or None when torch is not installed."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return None
    ext = CppExtension(
        "neon_ext._torch",
        sources=["neon_ext/csrc/torch_binding.cpp"],
        depends=HEADERS,
        # C++20 because torch's own headers use C++20 bit-field initialisers
        extra_compile_args=["-O2", "-std=c++20", "-Wall"],
    )
    return ext, {"build_ext": BuildExtension.with_options(use_ninja=False)}


def main() -> None:
    os.chdir(HERE.parent)  # inplace builds place the module relative to the cwd
    build(Extension(
        "neon_ext._kernels",
        sources=[f"neon_ext/csrc/{name}" for name in KERNEL_SOURCES + ["module.c"]],
        depends=HEADERS,
        extra_compile_args=CFLAGS,
        libraries=["m"],
    ))
    torch_ext = torch_extension()
    if torch_ext is None:
        print("torch is not installed: skipped neon_ext._torch (torch tensors go through NumPy views)")
    else:
        build(*torch_ext)


if __name__ == "__main__":
    sys.exit(main())
