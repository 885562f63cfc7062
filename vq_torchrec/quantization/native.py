"""Builds and loads the C++ CPU kernels (``csrc/``) on first use.

* ``certified_search.cpp``: an exact nearest-code search (see :func:`certified_search`): a bf16
  GEMM (oneDNN's brgemm on AMX through ``at::native::cpublas``, else MKL's bf16 GEMM from
  ``libtorch_cpu``) proposes candidates, a rounding-error bound proves the best code is among
  them, an fp32 re-score picks it;
* ``commit_grad.cpp``: the one-pass backward of the grouped straight-through + commitment node
  (see :func:`commit_grad`).

They are compiled once per machine and CPU type with ``torch.utils.cpp_extension`` (g++ and
ninja, ~20 s; torch caches the build under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and checked once against the torch formulas on small random
data. Where they cannot be built (no compiler, a torch without MKL/oneDNN, a non-x86 CPU),
fail that check, or ``VQ_TORCHREC_NATIVE=0`` is set, :func:`available` is False and callers
run pure-torch code with the same results.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from vq_torchrec.quantization.recycle import recycled

_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("certified_search.cpp", "commit_grad.cpp")]
# Rows per block: at most BLOCK_ROWS (brgemm's sweet spot, measured 32-512 at K 256 / 1024),
# fewer when the (rows, K) fp32 scores of a block would not stay in the L2 cache.
BLOCK_ROWS = 128
BLOCK_SCORES = 1 << 18
# Rows with more candidates than this are scored against every code in fp32 instead.
MAX_CANDIDATES = 64
ENV_SWITCH = "VQ_TORCHREC_NATIVE"


@functools.lru_cache(maxsize=1)
def _load() -> bool:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if hasattr(torch.ops, "vq_torchrec") and hasattr(torch.ops.vq_torchrec, "commit_grad"):
        return _self_test()
    try:
        from torch.utils.cpp_extension import load

        _ninja_on_path()
        load(
            name=f"vq_torchrec_kernels_{_cpu_fingerprint()}",
            sources=[str(path) for path in _SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-mprefer-vector-width=512"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch code
        warnings.warn(
            f"vq_torchrec: the C++ CPU kernels could not be built ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); using the pure-torch code "
            f"(same results, slower on CPU). Set {ENV_SWITCH}=0 to skip the build.",
            stacklevel=3,
        )
        return False
    return _self_test()


def _self_test() -> bool:
    """Run both kernels once on small random data against the torch formulas. A kernel that
    loads but fails at run time (e.g. a oneDNN ukernel this CPU cannot create) or disagrees is
    switched off here, with a warning, instead of failing in the middle of training."""
    g = torch.Generator().manual_seed(0)
    x, book = torch.randn(300, 32, generator=g), torch.randn(100, 32, generator=g)
    try:
        codes, _, _ = torch.ops.vq_torchrec.certified_search(x, book, None, True, 64, MAX_CANDIDATES)
        ref = (2 * x.double() @ book.double().t() - book.double().pow(2).sum(1)).argmax(1)
        dq, z, q = (torch.randn(4, 3, 32, generator=g) for _ in range(3))
        coef = torch.randn(3, generator=g)
        out = torch.empty_like(dq)
        torch.ops.vq_torchrec.commit_grad(dq, z, q, coef, out)
        ok = torch.equal(codes, ref) and torch.allclose(out, dq + coef.view(1, 3, 1) * (z - q), atol=1e-5)
        problem = "" if ok else "results differ from the torch formulas"
    except RuntimeError as exc:
        ok, problem = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not ok:
        warnings.warn(
            f"vq_torchrec: the C++ kernels built but failed their self-test ({problem}); using the "
            "pure-torch code (same results, slower on CPU).",
            stacklevel=4,
        )
    return ok


_switched_off = threading.local()


def _cpu_fingerprint() -> str:
    """Short hash of the CPU's feature flags: the build uses ``-march=native``, so a cache
    shared by different CPUs (a network home) must not hand one CPU another's build."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha1(f"{platform.processor()} {flags}".encode()).hexdigest()[:10]


def _ninja_on_path() -> None:
    """torch builds with the ``ninja`` executable from ``PATH``; a venv run without activation
    has the pip package's binary but not on ``PATH``."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def available() -> bool:
    """Whether :func:`certified_search` can run (builds the kernel on the first call); False
    inside :func:`disabled`."""
    if getattr(_switched_off, "depth", 0):
        return False
    return _load()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """In this block (this thread), searches use the pure-torch code: for tests and comparisons."""
    _switched_off.depth = getattr(_switched_off, "depth", 0) + 1
    try:
        yield
    finally:
        _switched_off.depth -= 1


def certified_search(
    x: torch.Tensor, codebook: torch.Tensor, distance: str, chunk_size: int, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact nearest code of every row, on CPU: bf16 candidates with a proven error bound,
    fp32 re-score.

    Args:
        x: ``(M, dim)`` fp32 CPU rows (last dim contiguous; unit rows for cosine).
        codebook: ``(K, dim)`` fp32 CPU codes.
        distance: ``"l2"`` or ``"cosine"``.
        chunk_size: at most this many rows scored at once.
        rows: optional ``(M',)`` long indices: search only ``x[rows]`` (read in place, no
            gathered copy); the results then have ``M'`` entries.
    Returns:
        ``codes`` ``(M,)`` long, ``best`` ``(M,)`` fp32 winning scores (``2 x.c - ||c||^2`` for
        l2, ``x.c`` for cosine, as :func:`~.distances.nearest_codes`), and ``stats`` ``(2,)``
        long: candidates re-scored in total, rows scanned in full fp32.
    """
    if not _load():
        raise RuntimeError(f"vq_torchrec: the C++ nearest-code search is not available (see {__name__})")
    if x.stride(-1) != 1:
        x = x.contiguous()
    k = codebook.shape[0]
    block = max(1, min(chunk_size, BLOCK_ROWS, BLOCK_SCORES // max(k, 1)))
    return torch.ops.vq_torchrec.certified_search(x, codebook, rows, distance == "l2", block, MAX_CANDIDATES)


def commit_grad(dq: torch.Tensor, z: torch.Tensor, q: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``dq + coef[s] * (z - q)`` for ``(B, S, d)`` fp32 CPU tensors and ``(S,)`` ``coef``, in one
    pass, into a recycled contiguous buffer (see :mod:`.recycle`)."""
    if not _load():
        raise RuntimeError(f"vq_torchrec: the C++ kernels are not available (see {__name__})")
    out = recycled("commit_grad", tuple(dq.shape), torch.float32, dq.device)
    torch.ops.vq_torchrec.commit_grad(dq, z, q, coef, out)
    return out
