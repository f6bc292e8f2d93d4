"""neon_ext kernels against NumPy, torch eager and vLLM's own CPU ops, single thread, LLM shapes.

Run from the repository root (after building neon_ext): ``.venv/bin/python bench/bench_kernels.py``
(``make bench-kernels``; the Makefile unsets OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE for this command,
so OpenBLAS picks the kernel for this CPU).  Every library runs on one thread.

Timing: each figure is the fastest per-call time over repeated batches, measured in the calling
thread's CPU time, so other work on the machine does not inflate it.  Element-wise kernels are
called the way a model calls them: torch tensors in, a new tensor out.  Memory copy bandwidth is
measured in the same run (``np.copyto`` moving as many bytes as the kernel reads and writes) and the large
shapes report the kernel's traffic (bytes read + written) as a share of that copy's.

Targets on an AVX2 machine: element-wise >= 1.5x torch eager at decode shapes (1 token) and
>= 60 % of copy bandwidth at large shapes (512 tokens); matmul >= 0.8x NumPy's sgemm on 512-2048
squares and on decode shapes (M = 1..8).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy/torch load their thread pools

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import neon_ext  # noqa: E402

torch.set_num_threads(1)
HIDDEN = (576, 2048, 4096)
TOKENS = (1, 32, 512)
EPS = 1e-5


def vllm_c_ops():
    """vLLM's compiled CPU kernels (torch.ops._C), or None when this vLLM build has none."""
    try:
        import vllm._custom_ops  # noqa: F401
        from vllm.platforms import current_platform

        current_platform.import_kernels()
        return torch.ops._C if hasattr(torch.ops._C, "rms_norm") else None
    except Exception:  # noqa: BLE001 - any import problem just means "no vLLM baseline"
        return None


def best_time(fn, budget: float) -> float:
    """Fastest per-call thread CPU time (seconds) over batches of >= 2 ms, for about `budget` s."""
    fn()
    n = 1
    while True:
        t0 = time.thread_time_ns()
        for _ in range(n):
            fn()
        dt = time.thread_time_ns() - t0
        if dt >= 2e6 or n >= 1 << 16:
            break
        n *= 2
    best = dt / n
    end = time.perf_counter() + budget
    while time.perf_counter() < end:
        t0 = time.thread_time_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.thread_time_ns() - t0) / n)
    return best * 1e-9


class Table:
    def __init__(self, title: str, columns: list[str]):
        self.title, self.columns, self.rows = title, columns, []

    def add(self, *cells):
        self.rows.append([c if isinstance(c, str) else f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells])

    def print(self):
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) for i, c in enumerate(self.columns)]
        print(f"\n{self.title}")
        print("  ".join(c.rjust(w) for c, w in zip(self.columns, widths)))
        for r in self.rows:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def us(t):
    return "n/a" if t is None else f"{t * 1e6:.1f}"


def ratio(base, ours):
    return "n/a" if base is None else f"{base / ours:.2f}x"


# ---------------------------------------------------------------- element-wise cases


def rope_case(t, h):
    head = 64 if h < 4096 else 128
    nq, nkv = h // head, max(1, h // head // 3 if h == 576 else h // head // 4)
    max_pos = 4096
    inv = 1.0 / (10000.0 ** (torch.arange(0, head, 2, dtype=torch.float) / head))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float), inv)
    cache = torch.cat((freqs.cos(), freqs.sin()), -1)
    pos = torch.randint(0, max_pos, (t,))
    q, k = torch.randn(t, nq * head), torch.randn(t, nkv * head)
    cache_np, pos_np, q_np, k_np = cache.numpy(), pos.numpy(), q.numpy().copy(), k.numpy().copy()

    def torch_rope():  # vLLM's RotaryEmbedding.forward_static (NeoX), returning new tensors
        cos, sin = cache.index_select(0, pos).chunk(2, -1)
        out = []
        for x in (q, k):
            x = x.view(t, -1, head)
            x1, x2 = x.chunk(2, -1)
            c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
            out.append(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1).reshape(t, -1))
        return out

    def numpy_rope():
        cs = cache_np[pos_np]
        cos, sin = cs[:, None, : head // 2], cs[:, None, head // 2:]
        out = []
        for x in (q_np, k_np):
            x = x.reshape(t, -1, head)
            x1, x2 = x[..., : head // 2], x[..., head // 2:]
            out.append(np.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1))
        return out

    return {
        "ours": lambda: neon_ext.rope(pos, q, k, head_size=head, cos_sin_cache=cache),
        "ours_out": lambda: neon_ext.rope(pos, q, k, head_size=head, cos_sin_cache=cache),
        "numpy": numpy_rope,
        "torch": torch_rope,
        "vllm": (lambda C: C.rotary_embedding(pos, q, k, head, cache, True)),
        "bytes": 2 * (q.numel() + k.numel()) * 4,
    }


def cases(t, h):
    """name -> dict(ours, ours_out (output preallocated), numpy, torch, vllm(C) or None, bytes moved)."""
    x, r, w = torch.randn(t, h), torch.randn(t, h), torch.randn(h)
    xn, wn = x.numpy(), w.numpy()
    g = torch.randn(t, 2 * h)
    gn = g.numpy()
    out_h = torch.empty(t, h)
    on, o8 = out_h.numpy(), np.empty((t, h), np.uint8)
    scale = float(x.abs().max()) / 448.0
    q8 = neon_ext.fp8_quantize(x, scale=scale)
    xa, ra = x.clone(), r.clone()  # the in-place variants keep updating these; values stay bounded

    def np_silu():
        a, b = gn[:, :h], gn[:, h:]
        return a / (1.0 + np.exp(-a)) * b

    def np_gelu():
        a, b = gn[:, :h], gn[:, h:]
        return 0.5 * a * (1.0 + np.tanh(0.7978845608 * (a + 0.044715 * a ** 3))) * b

    def np_softmax():
        e = np.exp(xn - xn.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    return {
        "rmsnorm": {
            "ours": lambda: neon_ext.rmsnorm(x, w, EPS),
            "ours_out": lambda: neon_ext.rmsnorm(xn, wn, EPS, out=on),
            "numpy": lambda: xn / np.sqrt((xn * xn).mean(-1, keepdims=True) + EPS) * wn,
            "torch": lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w,
            "vllm": lambda C: C.rms_norm(out_h, x, w, EPS),
            "bytes": 2 * x.numel() * 4,
        },
        "fused_add_rmsnorm": {
            "ours": lambda: neon_ext.fused_add_rmsnorm(xa, ra, w, EPS, out=xa),
            "ours_out": lambda: neon_ext.fused_add_rmsnorm(xa, ra, w, EPS, out=xa),
            "numpy": None,
            "torch": lambda: (lambda s: (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * w, s))(x + r),
            "vllm": lambda C: C.fused_add_rms_norm(xa, ra, w, EPS),
            "bytes": 4 * x.numel() * 4,
        },
        "silu_and_mul": {
            "ours": lambda: neon_ext.silu_and_mul(g),
            "ours_out": lambda: neon_ext.silu_and_mul(gn, out=on),
            "numpy": np_silu,
            "torch": lambda: F.silu(g[:, :h]) * g[:, h:],
            "vllm": lambda C: C.silu_and_mul(out_h, g),
            "bytes": 3 * x.numel() * 4,
        },
        "gelu_tanh_and_mul": {
            "ours": lambda: neon_ext.gelu_and_mul(g),
            "ours_out": lambda: neon_ext.gelu_and_mul(gn, out=on),
            "numpy": np_gelu,
            "torch": lambda: F.gelu(g[:, :h], approximate="tanh") * g[:, h:],
            "vllm": lambda C: C.gelu_tanh_and_mul(out_h, g),
            "bytes": 3 * x.numel() * 4,
        },
        "softmax": {
            "ours": lambda: neon_ext.softmax(x),
            "ours_out": lambda: neon_ext.softmax(xn, out=on),
            "numpy": np_softmax,
            "torch": lambda: torch.softmax(x, -1),
            "vllm": None,
            "bytes": 2 * x.numel() * 4,
        },
        "rope": rope_case(t, h),
        "fp8_quantize": {
            "ours": lambda: neon_ext.fp8_quantize(x, scale=scale),
            "ours_out": lambda: neon_ext.fp8_quantize(xn, scale=scale, out=o8),
            "numpy": None,
            "torch": lambda: (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn),
            "vllm": None,
            "bytes": 5 * x.numel(),
        },
        "fp8_dequantize": {
            "ours": lambda: neon_ext.fp8_dequantize(q8, scale=scale),
            "ours_out": lambda: neon_ext.fp8_dequantize(q8, scale=scale, out=on),
            "numpy": None,
            "torch": lambda: q8.to(torch.float32) * scale,
            "vllm": None,
            "bytes": 5 * x.numel(),
        },
    }


def bench_elementwise(budget, C, copy_bw, verdicts):
    names = list(cases(1, 576))
    for name in names:
        table = Table(f"{name}  (us per call, torch tensors in, new tensor out; speed-up of neon_ext over each; "
                      f"GB/s: bytes read + written per s, output preallocated at {TOKENS[-1]} tokens)",
                      ["hidden", "tokens", "neon_ext", "numpy", "torch", "vllm _C", "vs numpy", "vs torch",
                       "vs vllm", "GB/s", "% copy"])
        for h in HIDDEN:
            for t in TOKENS:
                c = cases(t, h)[name]
                ours = best_time(c["ours"], budget)
                base = {k: (None if c[k] is None else best_time(c[k], budget)) for k in ("numpy", "torch")}
                base["vllm"] = None if (c["vllm"] is None or C is None) else best_time(lambda: c["vllm"](C), budget)
                # bandwidth of the kernel itself: output preallocated (a fresh multi-MiB result
                # costs page faults that a copy into an existing buffer does not)
                kernel = ours if t < TOKENS[-1] else min(ours, best_time(c["ours_out"], budget))
                gbs = c["bytes"] / kernel / 1e9
                share = gbs / copy_bw(c["bytes"] // 2)  # a copy moving the same traffic
                table.add(h, t, us(ours), us(base["numpy"]), us(base["torch"]), us(base["vllm"]),
                          ratio(base["numpy"], ours), ratio(base["torch"], ours), ratio(base["vllm"], ours),
                          f"{gbs:.1f}", f"{100 * share:.0f}%")
                if t == 1:
                    verdicts.append((f"{name} h={h} decode vs torch eager", base["torch"] / ours, 1.5, "x"))
                if t == TOKENS[-1]:
                    verdicts.append((f"{name} h={h} t={t} share of copy bandwidth", share, 0.6, "%"))
        table.print()


def make_copy_bw(budget):
    """GB/s (read + write) of np.copyto for a buffer of the given size, cached per size."""
    memo = {}

    def bw(nbytes: int) -> float:
        n = max(nbytes // 4, 1024)
        if n not in memo:
            src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
            memo[n] = 2 * n * 4 / best_time(lambda: np.copyto(dst, src), budget) / 1e9
        return memo[n]

    return bw


# ---------------------------------------------------------------- matmul


def bench_matmul(budget, verdicts):
    rng = np.random.default_rng(0)
    table = Table("matmul squares C = A @ B (GFLOP/s; speed-up of neon_ext)",
                  ["n", "neon_ext", "neon_ext B^T", "numpy", "torch", "vs numpy", "B^T vs numpy", "vs torch"])
    for n in (512, 1024, 2048):
        a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
        bt = np.ascontiguousarray(b.T)
        out = np.empty((n, n), np.float32)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        ours = best_time(lambda: neon_ext.matmul(a, b, out=out), budget)
        ours_t = best_time(lambda: neon_ext.matmul(a, bt, trans_b=True, out=out), budget)
        t_np = best_time(lambda: np.matmul(a, b, out=out), budget)
        t_torch = best_time(lambda: torch.matmul(ta, tb), budget)
        fl = 2 * n ** 3 / 1e9
        table.add(n, f"{fl / ours:.1f}", f"{fl / ours_t:.1f}", f"{fl / t_np:.1f}", f"{fl / t_torch:.1f}",
                  ratio(t_np, ours), ratio(t_np, ours_t), ratio(t_torch, ours))
        verdicts.append((f"matmul {n}^3 vs numpy", t_np / ours, 0.8, "x"))
        verdicts.append((f"matmul {n}^3 (B^T) vs numpy", t_np / ours_t, 0.8, "x"))
    table.print()

    table = Table("matmul decode/prefill y = x @ W^T, W [N, K] as stored by linear layers (us; speed-up)",
                  ["K", "N", "M", "neon_ext", "numpy", "torch", "vs numpy", "vs torch", "nn vs numpy"])
    for k, n in ((576, 1536), (2048, 2048), (4096, 4096)):
        w = rng.standard_normal((n, k), dtype=np.float32)
        wt = np.ascontiguousarray(w.T)  # the same weight stored [K, N]
        tw = torch.from_numpy(w)
        for m in (1, 2, 4, 8, 64):
            x = rng.standard_normal((m, k), dtype=np.float32)
            out = np.empty((m, n), np.float32)
            tx = torch.from_numpy(x)
            ours = best_time(lambda: neon_ext.matmul(x, w, trans_b=True, out=out), budget)
            t_np = best_time(lambda: np.matmul(x, w.T, out=out), budget)
            t_torch = best_time(lambda: F.linear(tx, tw), budget)
            ours_nn = best_time(lambda: neon_ext.matmul(x, wt, out=out), budget)
            t_np_nn = best_time(lambda: np.matmul(x, wt, out=out), budget)
            table.add(k, n, m, us(ours), us(t_np), us(t_torch), ratio(t_np, ours), ratio(t_torch, ours),
                      ratio(t_np_nn, ours_nn))
            if m <= 8:
                verdicts.append((f"matmul M={m} K={k} N={n} (W^T) vs numpy", t_np / ours, 0.8, "x"))
                verdicts.append((f"matmul M={m} K={k} N={n} (W [K,N]) vs numpy", t_np_nn / ours_nn, 0.8, "x"))
    table.print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=0.08, help="seconds of repeats per measurement")
    args = parser.parse_args()
    started = time.perf_counter()
    info = neon_ext.info()
    C = vllm_c_ops()
    print(f"neon_ext path: {info['path']} (supported: {', '.join(info['supported_paths'])}); threads: 1; "
          f"vLLM CPU ops: {'yes' if C is not None else 'not available'}; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    copy_bw = make_copy_bw(args.budget)
    table = Table("memory copy bandwidth (np.copyto, GB/s read + write)", ["buffer", "GB/s"])
    for nbytes in (576 * 4, 2048 * 32 * 4, 4096 * 512 * 4, 4096 * 512 * 8):
        table.add(f"{nbytes / 1024:.0f} KiB", f"{copy_bw(nbytes):.1f}")
    table.print()

    verdicts: list[tuple[str, float, float, str]] = []
    bench_elementwise(args.budget, C, copy_bw, verdicts)
    bench_matmul(args.budget, verdicts)

    print("\ntargets")
    met = 0
    for label, value, target, unit in verdicts:
        ok = value >= target
        met += ok
        shown = f"{100 * value:.0f}% (>= {100 * target:.0f}%)" if unit == "%" else f"{value:.2f}x (>= {target}x)"
        print(f"  {'met ' if ok else 'MISS'}  {label}: {shown}")
    print(f"{met} of {len(verdicts)} targets met; {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
