"""llama.cpp (llama-cpp-python, built from source) reads what mlxft export writes: an independent reader.

Slow, and skipped unless the optional extra is installed (`make llamacpp`). Tiny llama, qwen2 and
gemma3 runs: llama.cpp's logits on the training prompt equal the fused MLX model's, its tokenizer and
chat template give the training prompt ids, and base GGUF + `--lora` adapter GGUF gives the fused logits.
The 160-prompt comparison on the real default run is `make bench-export` (bench/export_bench.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from export_fixtures import fused_reference, logits, tiny_run

from mlxft.export import llamacpp
from mlxft.data.encode import prompt_ids
from mlxft.export.run import ExportOptions, export_run

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not llamacpp.available(), reason=llamacpp.INSTALL)]
CHAT = [{"role": "system", "content": "Label the message."}, {"role": "user", "content": "gamma w x y"}]
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module", params=["llama", "llama3", "qwen2", "gemma3"])
def run(request, tiny_data, tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp(f"cpp-{request.param}"), request.param, tiny_data)


def relative_diff(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_llama_cpp_runs_the_fused_gguf_like_mlx(run, tmp_path):
    report = export_run(run, tmp_path / "out", ExportOptions(quant="f32"), **QUIET)
    (path,) = report.out.glob("*.gguf")
    ref_model, ref_tok = fused_reference(run)
    ids = prompt_ids(ref_tok, CHAT)
    llm = llamacpp.load(path, logits_all=True, f32_cache=True)
    assert llamacpp.chat_prompt_ids(llm, CHAT) == ids  # llama.cpp's tokenizer + the GGUF's trained template
    want = logits(ref_model, ids)
    assert relative_diff(llamacpp.logits(llm, ids), want) <= 1e-3
    assert (llamacpp.logits(llm, ids).argmax(-1) == want.argmax(-1)).mean() >= 0.95  # random weights: near ties


def test_llama_cpp_applies_the_lora_gguf_to_the_base_gguf(run, tmp_path):
    report = export_run(run, tmp_path / "out", ExportOptions(adapter_only=True, with_base=True, quant="f32"), **QUIET)
    base, adapter = next(report.out.glob("base.*.gguf")), next(report.out.glob("*.lora.gguf"))
    ref_model, ref_tok = fused_reference(run)
    ids = prompt_ids(ref_tok, CHAT)
    with_lora = llamacpp.logits(llamacpp.load(base, lora=adapter, logits_all=True, f32_cache=True), ids)
    assert relative_diff(with_lora, logits(ref_model, ids)) <= 1e-3
    without = llamacpp.logits(llamacpp.load(base, logits_all=True, f32_cache=True), ids)
    assert relative_diff(without, logits(ref_model, ids)) > 1e-2  # the adapter really changes the model


def test_llama_cpp_answers_like_mlxft_on_the_real_smollm2(tmp_path):
    """A short real fine-tune, exported f16: llama.cpp's greedy replies on commit-type prompts equal mlxft's."""

    from mlxft.inference.batch import generate_batch
    from mlxft.models.load import load_run_base
    from mlxft.recipes import load_recipe
    from mlxft.runs.run import Run
    from mlxft.evaluation.suites import load_suite, suite_examples
    from mlxft.training.setup import train

    recipe = load_recipe("smollm2-135m", overrides=["train.iters=16", "train.batch_size=4", "train.val_every=16",
                                                    "train.val_batches=1", "train.warmup_steps=2"])
    run = train(recipe, runs_root=tmp_path / "runs", log=lambda *_: None).run
    report = export_run(run.root, tmp_path / "out", ExportOptions(quant="f16"), **QUIET)
    trained = Run.open(run.root)
    examples = suite_examples(load_suite("commit-type"), trained.system_prompt)[:16]
    base = load_run_base(trained, with_adapters=True)  # with the training chat template
    mine = generate_batch(base.model, base.tokenizer, [prompt_ids(base.tokenizer, e.messages) for e in examples], 8)
    llm = llamacpp.load(next(report.out.glob("*.gguf")))
    theirs = [llamacpp.chat_reply(llm, e.messages, 8) for e in examples]
    assert sum(a.strip() == b.strip() for a, b in zip(mine, theirs)) >= 15, list(zip(mine, theirs))
