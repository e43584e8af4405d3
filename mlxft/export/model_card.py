"""README.md for every export: what the model is, its licence, how it was trained, evaluated and verified.

The card is a Hugging Face model card (YAML front matter + Markdown), so ``--push`` shows it on
the hub as is. Everything in it comes from the run folder (config.json, eval.json) and from the
export's own verification; nothing is typed in by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlxft.models.load import BUILTIN, BUILTIN_PREFIX, GEMMA_TERMS

# The hub ids the bundled GGUFs were converted from (for the card's base_model, which the hub links).
BUILTIN_ORIGINS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}
GEMMA_NOTICE = ("Gemma is provided under and subject to the Gemma Terms of Use found at "
                "ai.google.dev/gemma/terms.")  # the notice the Gemma Terms ask every redistribution to carry


@dataclass
class CardFacts:
    """Everything the card says, gathered by the export."""

    name: str
    format: str  # gguf | ollama | lmstudio | mlx
    run: Path
    config: dict  # the run's config.json
    model_type: str
    files: dict[str, int]  # file name -> bytes
    checks: list[str]  # one line per verified artefact
    usage: list[str]  # the commands a user types
    adapter_config: dict = field(default_factory=dict)
    eval_result: dict | None = None
    notes: list[str] = field(default_factory=list)


def base_licence(source: str, model_type: str) -> tuple[str, str | None]:
    """(licence name, notice to carry) of the run's base model (`source` as the recipe names it)."""
    name = source[len(BUILTIN_PREFIX):] if source.startswith(BUILTIN_PREFIX) else None
    if name in BUILTIN:
        licence = BUILTIN[name].licence
    elif model_type.startswith("gemma"):
        licence = GEMMA_TERMS.name
    else:
        licence = "see the base model's own card"
    return licence, GEMMA_NOTICE if licence == GEMMA_TERMS.name else None


def _front_matter(facts: CardFacts, licence: str) -> str:
    source = (facts.config.get("recipe") or {}).get("model", {}).get("source", "")
    source = BUILTIN_ORIGINS.get(source.removeprefix(BUILTIN_PREFIX), source)
    lines = ["---"]
    if source.count("/") == 1 and not source.startswith((".", "/", "~")) and not source.endswith(".gguf"):
        lines.append(f"base_model: {source}")
    if licence == "Apache-2.0":
        lines.append("license: apache-2.0")
    elif licence == GEMMA_TERMS.name:
        lines += ["license: gemma", f"license_link: {GEMMA_TERMS.url}"]
    else:
        lines.append("license: other")
    library = "mlx" if facts.format in ("mlx", "lmstudio") else "gguf"
    lines += [f"library_name: {library}", "tags:", "  - mlxft", "  - lora", f"  - {library}", "---", ""]
    return "\n".join(lines)


def _eval_table(result: dict | None) -> list[str]:
    if not result or not result.get("suites"):
        return ["No evaluation recorded for this run (run `mlxft eval RUN` before exporting)."]
    rows = ["| suite | scorer | base | adapter | gate |", "|---|---|---|---|---|"]
    for suite, entry in result["suites"].items():
        for scorer in entry.get("scorers", []):
            values = scorer.get("values", {})
            shown = [_value(values.get(k), scorer.get("unit")) for k in ("base", "adapter")]
            gate = scorer.get("gate") or {}
            verdict = {True: "PASS", False: "FAIL"}.get(gate.get("passed"), "")
            rows.append(f"| {suite} ({entry.get('n', '?')} rows) | {scorer['name']} | {shown[0]} | {shown[1]} | "
                        f"{(gate.get('rule', '') + ' ' + verdict).strip()} |")
    return rows


def _value(value, unit) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if unit == "fraction" else f"{value:.4g}"


def _recipe_rows(config: dict, adapter_config: dict) -> list[str]:
    recipe = config.get("recipe") or {}
    train, lora = recipe.get("train") or {}, recipe.get("lora") or {}
    params = adapter_config.get("lora_parameters") or {}
    rows = [("recipe", recipe.get("name")), ("method", f"{train.get('method', 'sft')}, "
                                                      f"{adapter_config.get('fine_tune_type', 'lora')}"),
            ("LoRA", f"rank {params.get('rank', lora.get('rank'))}, scale {params.get('scale')}, last "
                     f"{adapter_config.get('num_layers', lora.get('num_layers'))} blocks, targets "
                     f"{', '.join(params.get('keys') or lora.get('targets') or [])}"),
            ("steps", config.get("steps", train.get("iters"))),
            ("batch x accumulation", train.get("batch_size") and f"{train['batch_size']} x {train.get('grad_accumulation', 1)}"),
            ("learning rate", train.get("learning_rate") and f"{train['learning_rate']} ({train.get('lr_schedule')})"),
            ("max sequence length", train.get("max_seq_length")),
            ("trainable parameters", config.get("trainable_parameters"))]
    return ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v not in (None, "")]


def _data_rows(config: dict) -> list[str]:
    data = config.get("data") or {}
    if not data.get("path"):
        return ["- data: not recorded in the run"]
    rows = [f"- data: `{data.get('path')}`"]
    for split, digest in (data.get("sha256") or {}).items():
        rows.append(f"- {split}: {(data.get('rows') or {}).get(split, '?')} rows, sha256 `{digest}`")
    return rows


def model_card(facts: CardFacts) -> str:
    """The README.md text of one export."""
    config = facts.config
    licence, notice = base_licence((config.get("recipe") or {}).get("model", {}).get("source", ""), facts.model_type)
    base = (config.get("base_model") or {}).get("source") or (config.get("recipe") or {}).get("model", {}).get("source")
    system = config.get("system_prompt")
    out = [_front_matter(facts, licence), f"# {facts.name}", "",
           f"A LoRA fine-tune of `{base}` made with mlxft (run `{facts.run.name}`), exported as {facts.format}.", ""]
    precision = (config.get("base_model") or {}).get("precision")
    out += ["## Base model and licence", "", f"- base model: `{base}`" + (f" ({precision} during training)" if precision
                                                                          else ""), f"- licence of the base: {licence}"]
    if notice:
        out += ["", f"**Notice:** {notice} The weights here are a modification of Gemma (a LoRA fine-tune); "
                "use of them is subject to the same terms."]
    out += ["", "## Files", "", "| file | size |", "|---|---|"]
    out += [f"| `{name}` | {size / 1e6:.1f} MB |" for name, size in sorted(facts.files.items())]
    out += ["", "## How to run it", "", "```bash", *facts.usage, "```", "",
            "## Prompt format and sampling", "",
            "The chat template is the one the adapter was trained with (it is in the files). "
            "Use this system prompt, as training did:" if system else "Training used no system prompt.", ""]
    if system:
        out += ["```text", system, "```", ""]
    out += ["Sampling: greedy (temperature 0), as the evaluation below was scored; for open-ended replies "
            "temperature 0.7 with top-p 0.9 keeps variety.", "", "## Training", "",
            *_recipe_rows(config, facts.adapter_config), "", *_data_rows(config), "",
            "## Evaluation: base vs adapter (greedy, held-out data)", "", *_eval_table(facts.eval_result), "",
            "## Export verification", "", "Read back after writing and compared with base + adapter in MLX "
            "(teacher-forced on the run's eval prompts):", ""]
    out += [f"- {line}" for line in facts.checks]
    out += [f"- note: {n}" for n in facts.notes]
    return "\n".join(out).rstrip() + "\n"


def read_eval(run_root: Path) -> dict | None:
    """RUN/eval.json when the run was evaluated."""
    path = run_root / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else None
