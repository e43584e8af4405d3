"""The BLAS preload: mlx's matmuls must not run on the reference BLAS on Linux."""

import os
import subprocess
import sys
import warnings

import pytest

from mlxft import _blas

HAS_OPENBLAS = any(os.path.exists(p) for p in _blas._CANDIDATES)


@pytest.mark.skipif(sys.platform != "linux" or not HAS_OPENBLAS, reason="needs Linux with OpenBLAS installed")
def test_mlx_matmuls_resolve_to_openblas_in_a_fresh_process():
    code = "import mlxft, mlx.core as mx; from mlxft import _blas; mx.eval(mx.ones((8,8)) @ mx.ones((8,8))); print(_blas.serving_library())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "openblas" in out.stdout.lower()


def test_missing_blas_warns_once_with_the_fix(monkeypatch):
    monkeypatch.setattr(_blas, "status", "not found")
    monkeypatch.setattr(sys, "platform", "linux")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _blas.warn_if_slow()
    assert len(caught) == 1 and "libopenblas0-pthread" in str(caught[0].message)


def test_importing_mlx_first_is_reported():
    code = "import mlx.core, mlxft; from mlxft import _blas; print(_blas.status)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    if sys.platform == "linux":
        assert out.stdout.strip().startswith("too late")
