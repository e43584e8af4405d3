"""model_card: the README.md every export carries."""

from pathlib import Path

from mlxft.export.model_card import GEMMA_NOTICE, CardFacts, base_licence, model_card

CONFIG = {"recipe": {"name": "smollm2-135m", "model": {"source": "builtin:smollm2-135m-instruct"},
                     "train": {"batch_size": 8, "learning_rate": 2e-4, "lr_schedule": "cosine", "max_seq_length": 256},
                     "lora": {"rank": 8, "num_layers": 16}},
          "base_model": {"source": "builtin:smollm2-135m-instruct", "precision": "float32"},
          "data": {"path": "/d", "sha256": {"train": "ab12", "valid": "cd34"}, "rows": {"train": 10, "valid": 2}},
          "system_prompt": "Classify the commit.", "steps": 120, "trainable_parameters": 1300000}
EVAL = {"suites": {"commit-type": {"n": 160, "scorers": [
    {"name": "exact_match", "unit": "fraction", "values": {"base": 0.0, "adapter": 0.656},
     "gate": {"rule": "adapter - base >= 30 points", "passed": True}}]}}}


def facts(**kw) -> CardFacts:
    base = dict(name="commit", format="gguf", run=Path("runs/smollm2-135m-1"), config=CONFIG, model_type="llama",
                files={"commit.F16.gguf": 270_900_000}, checks=["commit.F16.gguf (f16): greedy agreement 100.00%"],
                usage=["llama-cli -m out/commit.F16.gguf"], adapter_config={"lora_parameters": {"rank": 8, "scale": 2.0}},
                eval_result=EVAL)
    return CardFacts(**{**base, **kw})


def test_card_has_licence_recipe_data_eval_prompt_and_verification():
    card = model_card(facts())
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlicense: apache-2.0\nlibrary_name: gguf\n")
    assert "licence of the base: Apache-2.0" in card and GEMMA_NOTICE not in card
    assert "| commit-type (160 rows) | exact_match | 0.0% | 65.6% | adapter - base >= 30 points PASS |" in card
    assert "```text\nClassify the commit.\n```" in card and "temperature 0" in card
    assert "sha256 `ab12`" in card and "| steps | 120 |" in card and "| `commit.F16.gguf` | 270.9 MB |" in card
    assert "- commit.F16.gguf (f16): greedy agreement 100.00%" in card and "llama-cli -m out/commit.F16.gguf" in card


def test_gemma_exports_carry_the_gemma_terms_notice():
    gemma = {**CONFIG, "recipe": {**CONFIG["recipe"], "model": {"source": "builtin:gemma3-270m"}}}
    assert base_licence("builtin:gemma3-270m", "gemma3_text") == ("Gemma Terms of Use", GEMMA_NOTICE)
    card = model_card(facts(config=gemma, model_type="gemma3_text", eval_result=None))
    assert "license: gemma\nlicense_link: https://ai.google.dev/gemma/terms" in card
    assert f"**Notice:** {GEMMA_NOTICE}" in card and "No evaluation recorded" in card
    assert base_licence("/local/folder", "llama")[0] == "see the base model's own card"
