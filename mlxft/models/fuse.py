"""Merge a run's LoRA adapter into its base and write a stand-alone mlx-lm / HF model folder.

    mlxft fuse runs/smollm2-135m-20250101-120000 fused/commit-type [--dequantize]

Uses mlx-lm's own LoRALinear.fuse() (as mlx_lm.fuse does), then refuses to keep the
result unless it behaves like base + adapter: the written folder is loaded back with
stock mlx_lm.load and compared, teacher-forced, on held-out prompts from the run's test
(else valid) split. Nothing is written when the gate fails.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import dequantize_model, load, load_config, save_config, save_model

from mlxft.data.encode import prompt_ids, read_chat_jsonl
from mlxft.errors import MlxftError
from mlxft.files import write_atomic
from mlxft.models.load import is_quantized, load_run_base
from mlxft.runs.run import Run

MIN_AGREEMENT = 0.99  # greedy next-token agreement, fused vs base + adapter
# Max |logit difference| relative to the largest |logit|. fp32 merges differ by rounding
# only (~1e-6); 16-bit and re-quantized weights round the merged matrix, hence the looser bound.
REL_BOUND = {"float32": 1e-3}
REL_BOUND_LOW_PRECISION = 5e-2
FALLBACK_PROMPTS = ["Hello!", "What can you do?", "Summarise this: the cat sat on the mat.", "Write one word."]


class FuseError(MlxftError):
    """The fused model would not behave like base + adapter, or cannot be written."""


@dataclass
class FuseReport:
    out: str
    prompts: int
    positions: int
    agreement: float
    max_abs_diff: float
    rel_diff: float
    rel_bound: float
    prompts_from: str


def fuse_layers(model: nn.Module, dequantize: bool = False) -> None:
    """Replace every LoRA/DoRA layer by its fused linear, in place (as stock mlx_lm.fuse)."""
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if not fused:
        raise FuseError("the model has no adapter layers to fuse")
    model.update_modules(tree_unflatten(fused))


def held_out_conversations(run: Run, n: int) -> tuple[list[list[dict]], str]:
    """The first n conversations of the run's test split (else valid), cut before their last assistant turn."""
    data = run.data_path
    for split in ("test", "valid"):
        path = data / f"{split}.jsonl" if data else None
        if path and path.is_file():
            convs = []
            for row in read_chat_jsonl(path)[:n]:
                msgs = row["messages"]
                last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
                convs.append(msgs[:last])
            return convs, str(path)
    return [[{"role": "user", "content": p}] for p in FALLBACK_PROMPTS], "built-in prompts (no test/valid split found)"


def greedy_continuation(model, prompt: list[int], n: int) -> list[int]:
    return [int(tok) for tok, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def sequence_logits(model, ids: list[int], start: int) -> mx.array:
    """float32 logits at positions start-1 .. end: each predicts the next token of the sequence."""
    logits = model(mx.array(ids)[None])[0, start - 1:].astype(mx.float32)
    mx.eval(logits)
    return logits


def compare(reference: list[mx.array], fused: list[mx.array]) -> tuple[float, float, float, int]:
    agree = total = 0
    max_abs = max_ref = 0.0
    for r, f in zip(reference, fused):
        agree += int((r.argmax(-1) == f.argmax(-1)).sum().item())
        total += r.shape[0]
        max_abs = max(max_abs, mx.abs(r - f).max().item())
        max_ref = max(max_ref, mx.abs(r).max().item())
    return agree / max(total, 1), max_abs, max_abs / max(max_ref, 1e-12), total


def write_model_folder(out: Path, model, tokenizer, base_path: Path, chat_template: str, record: dict) -> None:
    """An mlx-lm / HF folder: weights, config, tokenizer with the training chat template, mlxft_fuse.json."""
    out.mkdir(parents=True)
    save_model(out, model, donate_model=False)
    config = load_config(base_path)
    if not is_quantized(model):  # CPU bases are dequantized on load; the written weights are dense
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    save_config(config, config_path=out / "config.json")
    tokenizer.save_pretrained(str(out))
    if (base_path / "generation_config.json").is_file():
        shutil.copy(base_path / "generation_config.json", out)
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    tok_cfg["chat_template"] = chat_template  # the template the adapter was trained with
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    if (out / "chat_template.jinja").is_file():  # newer transformers read this file first; keep both equal
        (out / "chat_template.jinja").write_text(chat_template)
    write_atomic(out / "mlxft_fuse.json", json.dumps(record, indent=2) + "\n")


def fuse_run(run_path: str | Path, out: str | Path, dequantize: bool = False, n_prompts: int = 8,
             new_tokens: int = 16, log=print) -> FuseReport:
    """Fuse, write to a temp folder, verify the written folder against base + adapter, then rename into place."""
    out = Path(out)
    if out.exists():
        raise FuseError(f"{out} already exists; choose a new folder")
    run = Run.open(run_path)
    adapters = run.adapters
    if not (adapters / "adapters.safetensors").is_file():
        raise FuseError(f"run {run_path} has no adapters yet ({adapters}/adapters.safetensors missing)")
    base = load_run_base(run, with_adapters=True)  # with the training chat template
    template = base.tokenizer.chat_template
    system = run.system_prompt

    conversations, source = held_out_conversations(run, n_prompts)
    prompts = [prompt_ids(base.tokenizer, c, system) for c in conversations]  # the ids training used
    sequences = [p + greedy_continuation(base.model, p, new_tokens) for p in prompts]
    reference = [sequence_logits(base.model, s, len(p)) for s, p in zip(sequences, prompts)]
    log(f"reference: base + {adapters} on {len(prompts)} prompts from {source}")

    fuse_layers(base.model, dequantize)
    model = base.model
    if dequantize:
        model = dequantize_model(model)
    dtype = str(next(v.dtype for _, v in _leaves(model))).replace("mlx.core.", "")
    record = {"run": str(run.root.resolve()), "adapters": str(adapters.resolve()), "base_model": str(base.path),
              "system_prompt": system, "chat_template": template, "dequantize": dequantize}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_model_folder(tmp, model, base.tokenizer, Path(base.path), template, record)
        fused, fused_tok = load(str(tmp))  # verify what was written, as stock mlx-lm reads it
        if [prompt_ids(fused_tok, c, system) for c in conversations] != prompts:
            raise FuseError("the fused folder's tokenizer/template gives other prompt ids than training")
        got = [sequence_logits(fused, s, len(p)) for s, p in zip(sequences, prompts)]
        agreement, max_abs, rel, positions = compare(reference, got)
        bound = REL_BOUND.get(dtype, REL_BOUND_LOW_PRECISION)
        report = FuseReport(str(out), len(prompts), positions, agreement, max_abs, rel, bound, source)
        log(f"gate: greedy agreement {agreement:.2%} (need >= {MIN_AGREEMENT:.0%}), "
            f"max |logit diff| {max_abs:.2e} = {rel:.2e} relative (bound {bound:.0e}, {dtype})")
        if agreement < MIN_AGREEMENT or rel > bound:
            raise FuseError(
                f"refusing to write {out}: the fused model does not match base + adapter "
                f"(agreement {agreement:.2%}, relative logit diff {rel:.2e}); nothing was written"
            )
        write_atomic(tmp / "mlxft_fuse.json", json.dumps({**record, "gate": asdict(report)}, indent=2) + "\n")
        os.replace(tmp, out)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _leaves(model):
    return tree_flatten(model.parameters())
