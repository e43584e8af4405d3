"""--show-probs: the displayed distributions are the ones mlx-lm samples from."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import mlxft  # noqa: F401
import mlx.core as mx
from mlxft.cli import main
from mlxft.inference.sampling import processed_probs

LOGITS = np.array([2.0, 1.5, 0.3, -1.0, -2.5, 0.0], dtype=np.float32)


def logprobs():
    x = mx.array(LOGITS)
    return x - mx.logsumexp(x)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_temperature_scales_logits_before_the_softmax():
    cold = np.array(processed_probs(logprobs(), temp=0.5))
    warm = np.array(processed_probs(logprobs(), temp=1.0))
    np.testing.assert_allclose(cold, softmax(LOGITS / 0.5), rtol=1e-5)  # by hand
    np.testing.assert_allclose(warm, softmax(LOGITS), rtol=1e-5)
    assert cold[0] > warm[0] and cold.argmax() == warm.argmax() == 0


def test_filters_keep_only_what_they_say_and_renormalise():
    top2 = np.array(processed_probs(logprobs(), temp=1.0, top_k=2))
    assert (top2 > 0).sum() == 2 and top2[[0, 1]].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(top2[[0, 1]], softmax(LOGITS[[0, 1]]), rtol=1e-5)
    nucleus = np.array(processed_probs(logprobs(), temp=1.0, top_p=0.6))
    assert nucleus.sum() == pytest.approx(1.0) and (nucleus > 0).sum() < len(LOGITS)
    min_p = np.array(processed_probs(logprobs(), temp=1.0, min_p=0.2))  # keeps p >= 0.2 * p_max
    raw = softmax(LOGITS)
    assert set(np.flatnonzero(min_p > 0)) == set(np.flatnonzero(raw >= 0.2 * raw.max()))
    greedy = np.array(processed_probs(logprobs(), temp=0.0))
    assert greedy[0] == 1.0 and greedy.sum() == 1.0


def test_generate_show_probs_prints_each_step(tiny_model):
    r = CliRunner().invoke(main, ["generate", str(tiny_model), "-p", "alpha x", "--show-probs", "3", "--max-tokens", "2",
                                  "--temp", "0.5", "--top-k", "2", "--seed", "0"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "after temp 0.5, top-k 2" in r.output and r.output.count("<- sampled") == r.output.count("step ")
    rows = [line.split() for line in r.output.splitlines() if line.startswith("   ") and "p(raw)" not in line]
    used = [float(row[-1]) if row[-1] != "sampled" else float(row[-3]) for row in rows]
    assert sum(u > 0 for u in used[:3]) == 2  # top-k 2: only two tokens keep probability
