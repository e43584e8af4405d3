"""`mlxft doctor`: what this machine gives mlx, measured rather than assumed."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
import time

import mlxft
import mlx.core as mx

from mlxft import _blas
from mlxft.models.load import backend
from mlxft.recipes import detect_tier, usable_memory_bytes


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 n x n matmul throughput on mlx's default device."""
    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best / 1e9


def chip() -> str:
    if platform.system() == "Darwin":
        try:

            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except Exception:
            return platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def memory_bytes() -> tuple[int, int | None]:
    """(total, available) RAM in bytes; available is None where the OS does not say."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return total, int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, None


def blas_description() -> str:
    if platform.system() == "Darwin":
        return "Accelerate (macOS)"
    lib = _blas.serving_library()
    if lib is None:
        return "unknown (no cblas_sgemm in the global namespace)"
    reference = "libblas.so" in os.path.basename(lib) or "/blas/" in lib
    return f"{lib}" + ("  <- REFERENCE BLAS (slow)" if reference else "")


def collect() -> dict:
    total, avail = memory_bytes()
    info = {
        "os": f"{platform.system()} {platform.release()}",
        "chip": chip(),
        "cpu_count": os.cpu_count(),
        "mlx": md.version("mlx"),
        "mlx_lm": md.version("mlx-lm"),
        "mlxft": mlxft.__version__,
        "device": f"{backend()} ({mx.default_device()})",
        "blas": blas_description(),
        "blas_preload": f"{_blas.status}: {_blas.loaded_path}" if _blas.loaded_path else _blas.status,
        "matmul_gflops_fp32": round(matmul_gflops(2048), 1),
        "memory_total_gb": round(total / 2**30, 1),
        "memory_available_gb": round(avail / 2**30, 1) if avail else None,
        "usable_memory_gb": round(usable_memory_bytes() / 2**30, 1),
        "memory_tier": detect_tier(),
    }
    return info


def format_report(info: dict) -> str:
    rows = [
        ("OS", info["os"]),
        ("chip", f"{info['chip']} ({info['cpu_count']} cores)"),
        ("mlx", f"{info['mlx']} on {info['device']}"),
        ("BLAS serving matmuls", info["blas"]),
        ("BLAS preload", info["blas_preload"]),
        ("fp32 matmul", f"{info['matmul_gflops_fp32']} GFLOP/s (measured)"),
        ("memory", f"{info['memory_total_gb']} GiB total, {info['memory_available_gb']} GiB available"),
        ("memory tier", f"{info['memory_tier']} GB (usable {info['usable_memory_gb']} GiB; override with --tier)"),
        ("mlx-lm", info["mlx_lm"]),
        ("mlxft", info["mlxft"]),
    ]
    width = max(len(k) for k, _ in rows)
    out = [f"{k:<{width}}  {v}" for k, v in rows]
    if "REFERENCE" in info["blas"] or info["blas_preload"] == "not found":
        out.append(f"\nWARNING: mlx is using a slow BLAS. Fix: {_blas.FIX_HINT}.")
    return "\n".join(out)
