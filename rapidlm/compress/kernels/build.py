"""Building rapidlm's C++ CPU kernels: one place for the compiler flags and the per-CPU cache name."""

from __future__ import annotations

import hashlib
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import torch


def _openmp_backend() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def extension_name(prefix: str) -> str:
    """One build per CPU feature set: the code is compiled with -march=native, and a cache directory shared by
    machines with different CPUs must not hand an AVX512 binary to an AVX2 machine."""
    tag = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            tag += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        tag += platform.processor()
    return f"{prefix}_" + hashlib.sha1(tag.encode()).hexdigest()[:10]


def build_and_load(prefix: str, source: Path, verbose: bool = False) -> None:
    """Compile `source` (first time on this machine; torch caches the build) and load its TORCH_LIBRARY ops.
    Raises whatever the compiler or loader raises; callers fall back on failure."""
    from torch.utils.cpp_extension import load

    cflags = ["-O3", "-march=native"]
    # torch rebuilds when the source or the flags change; headers beside it (included by the source) go into the
    # flags as a digest, so editing one rebuilds too.
    headers = sorted(source.parent.glob("*.h"))
    if headers:
        cflags.append("-DRAPIDLM_HEADERS_SHA1=" + hashlib.sha1(b"".join(h.read_bytes() for h in headers)).hexdigest())
    if _openmp_backend():
        # at::parallel_for is inline OpenMP when ATen's backend is OpenMP. Only compile with -fopenmp: the GOMP
        # symbols then resolve to the runtime torch has loaded, never a second one.
        cflags.append("-fopenmp")
    load(
        name=extension_name(prefix), sources=[str(source)], extra_cflags=cflags, is_python_module=False, verbose=verbose
    )


def try_build(
    prefix: str, source: Path, register_fakes: Callable[[], None], fallback: str, verbose: bool = False
) -> bool:
    """build_and_load, then register the ops' fake kernels; on any failure warn once and return False."""
    try:
        build_and_load(prefix, source, verbose)
        try:
            register_fakes()
        except RuntimeError:  # registered already: the kernel module was re-imported (importlib.reload)
            pass
        return True
    except Exception as e:  # noqa: BLE001 - any build/load failure means: use the fallback
        warnings.warn(
            f"rapidlm: {prefix.removeprefix('rapidlm_')} CPU kernel unavailable "
            f"({type(e).__name__}: {str(e)[:300]}); using {fallback} instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
