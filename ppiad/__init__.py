"""ppiad: LR-IAD (mask-free industrial anomaly detection by a reasoning multimodal LLM) in PaddlePaddle."""
import os as _os

__version__ = "0.1.0"


def _prefer_fast_mkl_path_on_amd() -> None:
    """Paddle's bundled MKL picks a slow generic code path on AMD CPUs; MKL_DEBUG_CPU_TYPE=5 selects the AVX2
    path (measured 2-5x faster matmuls here, docs/performance.md). It must be set before the first matmul, so
    it lives here; a value the user set is kept."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = f.read()
    except OSError:
        return
    if "AuthenticAMD" in info and " avx2 " in info:
        _os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")


_prefer_fast_mkl_path_on_amd()


def _default_cpu_threads() -> None:
    """Paddle runs its math on one thread by default; ppiad's default is the physical cores (divided among
    launched processes), applied when Paddle is imported. See ppiad/utils/threads.py."""
    from ppiad.utils import threads

    threads.install()


_default_cpu_threads()
