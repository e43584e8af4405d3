"""The gate every export passes: what was written, read back, must behave like base + adapter in MLX.

The reference is the run's base with its adapter, in MLX, on prompts from the run's eval
suites (built with the run's system prompt and chat template, as eval builds them), each
followed by its greedy reply (up to 16 tokens, through the end-of-turn token). A written GGUF is read back through mlxft's own
importer (``import-gguf``, dequantized to fp32); the sequences are scored teacher-forced,
and the gate compares (1) the prompt ids the file's tokenizer and chat template give with
the ids training used, (2) greedy next-token agreement at every position and (3) the largest
|logit difference| relative to the largest |logit|. The thresholds depend on the type
written: float32 differs by rounding only, 16-bit and 8/5/4-bit types round every weight.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import load

from mlxft.data.encode import eos_ids, prompt_ids, with_system_prompt
from mlxft.errors import MlxftError
from mlxft.evaluation.suites import load_suite, suite_examples
from mlxft.export.gguf_write import family_of, gguf_base_name, unpermute_rows
from mlxft.models.fuse import compare, greedy_continuation, held_out_conversations, sequence_logits
from mlxft.models.gguf_import import import_gguf
from mlxft.models.gguf import read_gguf_header
from mlxft.runs.run import Run

# --quant -> (min greedy agreement, max |logit diff| / max |logit|), on the reply positions. Measured on
# SmolLM2-135M with the default adapter (README, Export): f32 1.5e-6, f16 7e-4 (100% agreement), bf16 7e-3,
# q8_0 3e-2 (98.4%), q5_0 0.16 (98.4%); the fused q4_1 file reads 64% and is refused (4-bit rounding
# erases the adapter: export it --adapter-only). A single logit moves a lot under 4/5-bit rounding, so
# agreement is what those gates rest on; their logit bounds only catch a broken file.
THRESHOLDS = {
    "f32": (0.99, 1e-3),
    "f16": (0.98, 2e-2),
    "bf16": (0.95, 5e-2),
    "q8_0": (0.95, 1e-1),
    "q5_0": (0.90, 0.35), "q5_1": (0.90, 0.35),
    "q4_0": (0.85, 0.5), "q4_1": (0.85, 0.5),
}


class ExportError(MlxftError):
    """An export would not behave like base + adapter, or cannot be written."""


@dataclass
class Reference:
    """Base + adapter in MLX on the check prompts: the ids and logits every export must reproduce."""

    conversations: list[list[dict]]  # system turn included, as training saw it
    prompts: list[list[int]]
    sequences: list[list[int]]
    logits: list[mx.array]
    source: str


@dataclass
class Check:
    """One verified artefact: what was compared and whether it passed."""

    artefact: str
    quant: str
    prompts: int
    positions: int
    agreement: float
    max_abs_diff: float
    rel_diff: float
    min_agreement: float
    rel_bound: float
    passed: bool

    def line(self) -> str:
        return (f"{self.artefact} ({self.quant}): greedy agreement {self.agreement:.2%} (need >= "
                f"{self.min_agreement:.0%}), max |logit diff| {self.max_abs_diff:.2e} = {self.rel_diff:.2e} "
                f"relative (bound {self.rel_bound:.0e}) over {self.positions} positions of {self.prompts} prompts")

    def to_dict(self) -> dict:
        return asdict(self)


def check_conversations(run: Run, n: int) -> tuple[list[list[dict]], str]:
    """The first prompts of the run's eval suites, taken in turn from each suite; else its test split."""
    names = run.recipe.eval.suites
    per_suite = []
    for name in names:
        try:
            examples = suite_examples(load_suite(name), run.system_prompt)
        except MlxftError:
            continue  # a suite whose data is missing here: the others still give prompts
        if examples:
            per_suite.append([e.messages for e in examples])
    picked = [conv for group in zip(*per_suite) for conv in group][:n] if per_suite else []
    if picked:
        return picked, f"eval suites {', '.join(names)}"
    held_out, source = held_out_conversations(run, n)
    return [with_system_prompt(c, run.system_prompt) for c in held_out], source


def reply_tokens(model, prompt: list[int], stop: set[int], new_tokens: int) -> list[int]:
    """The greedy reply, up to and including its end-of-turn token: the positions a user's answer depends on
    (what a model says after its turn has ended is noise that a rounding of the weights may change)."""
    tokens = greedy_continuation(model, prompt, new_tokens)
    ends = [i for i, t in enumerate(tokens) if t in stop]
    return tokens[: ends[0] + 1] if ends else tokens


def make_reference(model, tokenizer, conversations: list[list[dict]], source: str, new_tokens: int = 16) -> Reference:
    """Greedy replies and teacher-forced logits of base + adapter (``model``) on the prompts."""
    prompts = [prompt_ids(tokenizer, c) for c in conversations]
    sequences = [p + reply_tokens(model, p, eos_ids(tokenizer), new_tokens) for p in prompts]
    logits = [sequence_logits(model, s, len(p)) for s, p in zip(sequences, prompts)]
    return Reference(conversations, prompts, sequences, logits, source)


def check_model(reference: Reference, model, tokenizer, artefact: str, quant: str) -> Check:
    """Compare a model read back from an export with the reference; the tokenizer must give the same ids."""
    ids = [prompt_ids(tokenizer, c) for c in reference.conversations]
    if ids != reference.prompts:
        first = next(i for i, (a, b) in enumerate(zip(ids, reference.prompts)) if a != b)
        raise ExportError(f"{artefact}: its tokenizer and chat template give other prompt ids than training "
                          f"(prompt {first}: {ids[first][:12]}... vs {reference.prompts[first][:12]}...); "
                          "nothing was written")
    got = [sequence_logits(model, s, len(p)) for s, p in zip(reference.sequences, reference.prompts)]
    agreement, max_abs, rel, positions = compare(reference.logits, got)
    min_agreement, bound = THRESHOLDS[quant]
    return Check(artefact, quant, len(reference.prompts), positions, agreement, max_abs, rel, min_agreement,
                 bound, agreement >= min_agreement and rel <= bound)


def load_gguf_back(path: Path, workdir: Path):
    """(model, tokenizer) of a GGUF as mlxft's importer reads it (dense fp32), from a scratch folder."""
    folder = Path(tempfile.mkdtemp(prefix="readback-", dir=workdir))
    try:
        import_gguf(path, folder / "model", dequantize="fp32")
        return load(str(folder / "model"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # loaded into memory: the folder is not needed any more


def read_lora_gguf(path: Path) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(alpha, {GGUF tensor name: (A rank x in, B out x rank)}) of a float32 LoRA GGUF."""
    metadata, tensors = read_gguf_header(path)
    if metadata.get("general.type") != "adapter" or metadata.get("adapter.type") != "lora":
        raise ExportError(f"{path} is not a LoRA adapter GGUF")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, info in tensors.items():
        if info.type_name != "F32":
            raise ExportError(f"{path}: LoRA tensor {name} is {info.type_name}; mlxft writes and reads F32")
        data = np.fromfile(path, np.float32, count=int(np.prod(info.shape)), offset=info.offset).reshape(info.shape)
        target, _, part = name.rpartition(".")
        pairs.setdefault(target, {})[part] = data
    return float(metadata["adapter.lora.alpha"]), {k: (v["lora_a"], v["lora_b"]) for k, v in pairs.items()}


def apply_lora_gguf_in_place(model, config: dict, path: Path) -> int:
    """Add a LoRA GGUF's deltas to an MLX model's weights (as llama.cpp applies it); returns how many."""
    family = family_of(config)
    heads = {"attention.head_count": config["num_attention_heads"],
             "attention.head_count_kv": config.get("num_key_value_heads", config["num_attention_heads"])}
    by_gguf = {}
    for name, _ in tree_flatten(model.parameters()):
        module, _, param = name.rpartition(".")
        if param == "weight":
            try:
                by_gguf[f"{gguf_base_name(family, module)}.weight"] = name
            except MlxftError:
                continue
    alpha, pairs = read_lora_gguf(path)
    current = dict(tree_flatten(model.parameters()))
    updates = []
    for target, (a, b) in pairs.items():
        if target not in by_gguf:
            raise ExportError(f"{path}: LoRA tensor {target} has no weight in the model")
        delta = (alpha / a.shape[0]) * (b @ a)  # llama.cpp: scale = alpha / rank
        base = target.removesuffix(".weight")
        template = base.split(".", 2)[-1] if base.startswith("blk.") else base
        key = family.permuted.get(f"blk.{{n}}.{template}")
        if key is not None:
            delta = unpermute_rows(delta, heads[key])
        name = by_gguf[target]
        updates.append((name, current[name] + mx.array(delta.astype(np.float32)).astype(current[name].dtype)))
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())
    return len(updates)
