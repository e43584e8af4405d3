"""mlxft: fine-tune open LLMs on your laptop with MLX.

Importing mlxft loads an optimized BLAS first (Linux only), so every later
``import mlx.core`` uses it; see ``mlxft._blas``.
"""

from mlxft import _blas

_blas.load()
_blas.warn_if_slow()

__version__ = "0.1.0"
