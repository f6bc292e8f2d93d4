"""The NEON path, checked on any machine: the kernel sources are cross-compiled with Debian's
aarch64-linux-gnu-gcc together with tests/neon_qemu/neon_test.c (which carries its own
double-precision references and the tolerances of test_kernels.py) and run under qemu-aarch64.
On an aarch64 host the same program is built and run natively."""
from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from neon_ext.build import CFLAGS, KERNEL_SOURCES

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "neon_ext" / "csrc"
TEST_C = REPO / "tests" / "neon_qemu" / "neon_test.c"
SYSROOT = "/usr/aarch64-linux-gnu"


def toolchain() -> tuple[str, list[str]]:
    """(compiler, command prefix to run an aarch64 binary)."""
    if platform.machine() in ("aarch64", "arm64"):
        return shutil.which("gcc") or shutil.which("cc"), []
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not (cc and qemu):
        pytest.skip("aarch64 cross tools absent: apt-get install gcc-aarch64-linux-gnu qemu-user "
                    "(the Makefile's neon-cross-tools target does this)")
    return cc, [qemu, "-L", SYSROOT]


def test_neon_kernels_under_qemu(tmp_path):
    cc, run = toolchain()
    exe = tmp_path / "neon_test"
    build = subprocess.run([cc, *CFLAGS, f"-I{CSRC}", *(str(CSRC / s) for s in KERNEL_SOURCES), str(TEST_C),
                            "-lm", "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    result = subprocess.run([*run, str(exe)], capture_output=True, text=True, timeout=600)
    lines = result.stdout.splitlines()
    failures = [line for line in lines if line.startswith("FAIL")]
    assert result.returncode == 0 and not failures, "\n".join(failures) or result.stderr
    summary = lines[-1]
    assert summary.endswith(" passed, 0 failed"), summary
    assert int(summary.split()[0]) > 200  # every family ran on both the neon and the scalar path
    assert any(line.startswith("ok   [neon] matmul") for line in lines)
    assert any(line.startswith("ok   [neon] fp8 e5m2 round trip") for line in lines)
