"""Take a run where people run models: GGUF for llama.cpp, an Ollama folder, LM Studio, an mlx-lm folder.

    mlxft export runs/smollm2-135m-... out/commit --to gguf --quant q8_0
    mlxft export runs/smollm2-135m-... out/commit-ollama --to ollama [--adapter-only]
    mlxft export runs/smollm2-135m-... --to lmstudio          # into ~/.lmstudio/models/mlxft/<name>
    mlxft export runs/smollm2-135m-... out/commit-mlx --to mlx  # what `mlxft fuse` writes, with a card

Everything is built in a temporary folder beside OUT, read back and compared with base +
adapter in MLX (mlxft.export.check), given a model card (mlxft.export.model_card), and only then
renamed into place: a failed check leaves nothing behind. ``--push`` checks the hub first.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import dequantize_model

from mlxft.data.encode import prompt_ids
from mlxft.export.check import (
    ExportError, apply_lora_gguf_in_place, check_conversations, check_model, load_gguf_back, make_reference,
)
from mlxft.export.gguf_vocab import tokenizer_metadata
from mlxft.export.gguf_write import LLAMA_QUANTIZE_ONLY, WRITABLE, family_of, write_lora_gguf, write_model_gguf
from mlxft.export.hub import check_hub_access, push_folder
from mlxft.export.model_card import CardFacts, base_licence, model_card, read_eval
from mlxft.export.modelfile import choose_family, modelfile_text
from mlxft.files import write_atomic
from mlxft.models.fuse import fuse_layers, fuse_run
from mlxft.models.load import BUILTIN_PREFIX, bundled_gguf_path, is_quantized, load_run_base
from mlxft.runs.run import Run

FORMATS = ("gguf", "ollama", "lmstudio", "mlx")


@dataclass
class ExportOptions:
    to: str = "gguf"
    quant: str = "f16"  # GGUF tensor type (gguf, ollama)
    adapter_only: bool = False  # the LoRA alone as a GGUF adapter (gguf, ollama)
    with_base: bool = False  # with --adapter-only: the base GGUF too (ollama always writes it)
    name: str | None = None  # default: the run folder's name
    push: str | None = None  # Hugging Face repo id to upload the finished folder to
    prompts: int = 8  # check prompts from the run's eval suites
    new_tokens: int = 16  # greedy tokens after each prompt, compared teacher-forced


@dataclass
class ExportReport:
    out: Path
    files: dict[str, int]
    checks: list[str]
    usage: list[str]
    seconds: float
    details: list[dict] = field(default_factory=list)
    pushed: str | None = None


def lmstudio_models_dir() -> Path:
    """LM Studio's models folder: $LMSTUDIO_MODELS, else ~/.lmstudio/models."""
    return Path(os.environ.get("LMSTUDIO_MODELS") or Path.home() / ".lmstudio" / "models").expanduser()


def check_options(opts: ExportOptions) -> None:
    """Refuse impossible combinations before any work, saying what to do instead."""
    if opts.to not in FORMATS:
        raise ExportError(f"--to {opts.to!r}: choose one of {', '.join(FORMATS)}")
    quant = opts.quant.lower()
    if quant in LLAMA_QUANTIZE_ONLY:
        raise ExportError(f"--quant {opts.quant} needs llama.cpp's own quantizer: export --quant f16, then run "
                          f"`llama-quantize MODEL.F16.gguf MODEL.{opts.quant.upper()}.gguf {opts.quant.upper()}`")
    if quant not in WRITABLE:
        raise ExportError(f"--quant {opts.quant}: choose one of {', '.join(WRITABLE)} "
                          f"(or {', '.join(LLAMA_QUANTIZE_ONLY[:3])}... with llama-quantize)")
    if opts.adapter_only and opts.to not in ("gguf", "ollama"):
        raise ExportError(f"--adapter-only writes a GGUF LoRA; --to {opts.to} needs the fused model")
    if opts.with_base and not opts.adapter_only:
        raise ExportError("--with-base goes with --adapter-only (a full export already holds the whole model)")


def export_run(run_path: str | Path, out: str | Path | None, opts: ExportOptions, log=print) -> ExportReport:
    """Export RUN as OUT (a folder), verified; nothing is left at OUT when a check fails."""
    start = time.monotonic()
    check_options(opts)
    opts = replace(opts, quant=opts.quant.lower())
    run = Run.open(run_path)
    if not (run.adapters / "adapters.safetensors").is_file():
        raise ExportError(f"run {run_path} has no adapters yet ({run.adapters}/adapters.safetensors missing)")
    name = opts.name or run.root.name
    if out is None:
        if opts.to != "lmstudio":
            raise ExportError(f"--to {opts.to} needs an OUT folder")
        out = lmstudio_models_dir() / "mlxft" / name
    out = Path(out).expanduser()
    if out.exists():
        raise ExportError(f"{out} already exists; choose a new folder")
    if opts.push:
        check_hub_access(opts.push)  # offline or no token: say so before writing anything
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if opts.to in ("mlx", "lmstudio"):
            result = _export_mlx(run, staging, opts, out, log)
        else:
            staging.mkdir()
            result = _export_gguf(run, staging, opts, name, out, log)
        files = {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}
        facts = CardFacts(name, opts.to, run.root, run.config, result["model_type"], files,
                          [c["line"] for c in result["checks"]], result["usage"],
                          _adapter_config(run), read_eval(run.root), result.get("notes", []))
        write_atomic(staging / "README.md", model_card(facts))
        write_atomic(staging / "mlxft_export.json", json.dumps(
            {"run": str(run.root.resolve()), "adapters": str(run.adapters.resolve()), "format": opts.to,
             "quant": opts.quant if opts.to in ("gguf", "ollama") else None, "adapter_only": opts.adapter_only,
             "checks": result["checks"]}, indent=2) + "\n")
        files = {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}
        os.replace(staging, out)
    except OSError as e:
        raise ExportError(f"could not write {out} ({e}); nothing was written") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report = ExportReport(out, files, [c["line"] for c in result["checks"]], result["usage"],
                          time.monotonic() - start, result["checks"])
    if opts.push:
        report.pushed = push_folder(out, opts.push, f"mlxft export of {run.root.name} ({opts.to}, {opts.quant})")
    return report


def _adapter_config(run: Run) -> dict:
    path = run.adapters / "adapter_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _export_mlx(run: Run, staging: Path, opts: ExportOptions, out: Path, log) -> dict:
    """The fused mlx-lm folder (mlxft fuse and its gate); LM Studio loads the same folder."""
    report = fuse_run(run.root, staging, log=log)
    line = (f"mlx folder: greedy agreement {report.agreement:.2%} (need >= 99%), max |logit diff| "
            f"{report.max_abs_diff:.2e} = {report.rel_diff:.2e} relative (bound {report.rel_bound:.0e}) over "
            f"{report.positions} positions of {report.prompts} prompts")
    model_type = json.loads((staging / "config.json").read_text()).get("model_type", "")
    if opts.to == "lmstudio":
        usage = [f"lms load mlxft/{out.name}    # or LM Studio > My Models > mlxft/{out.name}"]
    else:
        system = run.system_prompt
        usage = [f"mlx_lm.generate --model {out} --prompt \"...\"" + (f" --system-prompt {json.dumps(system)}"
                                                                      if system else "")]
    return {"model_type": model_type, "usage": usage,
            "checks": [{"artefact": "mlx folder", "line": line, "agreement": report.agreement,
                        "rel_diff": report.rel_diff, "passed": True}]}


def source_gguf(run: Run) -> Path | None:
    """The GGUF the run's base came from (bundled model or a .gguf file), else None."""
    source = run.base_source
    if source.startswith(BUILTIN_PREFIX):
        return bundled_gguf_path(source[len(BUILTIN_PREFIX):])
    return Path(source).expanduser() if source.endswith(".gguf") else None


def _numpy_weights(model) -> dict[str, np.ndarray]:
    """Dense float32 copies of a model's weights (dequantized first when quantized)."""
    if is_quantized(model):
        model = dequantize_model(model)
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


def _passed(check, log) -> dict:
    log(f"gate: {check.line()}")
    if not check.passed:
        hint = ""
        if check.quant.startswith(("q4", "q5")) and ".lora." not in check.artefact:
            hint = (f"; rounding merged weights to {check.quant} can erase a LoRA's small changes: try "
                    f"--adapter-only --with-base --quant {check.quant} (the adapter stays float32) or --quant q8_0")
        raise ExportError(f"refusing to write the export: {check.artefact} does not match base + adapter "
                          f"(agreement {check.agreement:.2%}, relative logit diff {check.rel_diff:.2e}); "
                          f"nothing was written{hint}")
    return {**check.to_dict(), "line": check.line()}


def _export_gguf(run: Run, staging: Path, opts: ExportOptions, name: str, out: Path, log) -> dict:
    """Fused GGUF, or LoRA GGUF (+ base GGUF), each read back and checked; Ollama adds a Modelfile."""
    base = load_run_base(run)  # with the chat template the run trained with
    base_config = json.loads((Path(base.path) / "config.json").read_text())
    family_of(base_config)  # an unsupported family fails here, before any work
    template = base.tokenizer.chat_template
    tok_meta = tokenizer_metadata(Path(base.path), source_gguf(run), template)
    tok_meta.setdefault("tokenizer.chat_template", template)
    licence, _ = base_licence(run.base_source, base_config.get("model_type", ""))
    general = {"general.name": name, "general.finetune": "mlxft-lora"}
    if licence in ("Apache-2.0", "Gemma Terms of Use"):
        general["general.license"] = licence
    want_base = opts.adapter_only and (opts.with_base or opts.to == "ollama")

    load_adapters(base.model, str(run.adapters))
    base.model.eval()
    conversations, source = check_conversations(run, opts.prompts)
    reference = make_reference(base.model, base.tokenizer, conversations, source, opts.new_tokens)
    log(f"reference: base + {run.adapters} on {len(conversations)} prompts from {source}")
    quant_tag = WRITABLE[opts.quant][0]
    checks, files, tokenizer = [], {}, base.tokenizer

    if not opts.adapter_only:
        fuse_layers(base.model)
        files["model"] = f"{name}.{quant_tag}.gguf"
        counts = write_model_gguf(staging / files["model"], _numpy_weights(base.model), base_config, tok_meta,
                                  opts.quant, general)
        log(f"wrote {files['model']} ({_size(staging / files['model'])}; tensor types {counts})")
        model, tokenizer = load_gguf_back(staging / files["model"], staging)
        checks.append(_passed(check_model(reference, model, tokenizer, files["model"], opts.quant), log))
        del model
    else:
        adapter_cfg = _adapter_config(run)
        params = adapter_cfg.get("lora_parameters") or {}
        adapter = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(run.adapters / "adapters.safetensors")).items()}
        files["adapter"] = f"{name}.lora.gguf"
        write_lora_gguf(staging / files["adapter"], adapter, base_config, float(params.get("scale", 1.0)),
                        int(params.get("rank", 8)), general)
        log(f"wrote {files['adapter']} ({_size(staging / files['adapter'])})")
        plain = load_run_base(run)  # the base without mlx-lm's adapter layers: the LoRA GGUF goes on it
        if is_quantized(plain.model):  # a QLoRA base (Metal): add the deltas to dense weights
            plain.model = dequantize_model(plain.model)
        base_weights = _numpy_weights(plain.model) if want_base else None
        apply_lora_gguf_in_place(plain.model, base_config, staging / files["adapter"])
        checks.append(_passed(check_model(reference, plain.model, base.tokenizer, files["adapter"] + " on the run's base", "f32"), log))
        del plain
        if want_base:
            files["base"] = f"base.{quant_tag}.gguf"
            write_model_gguf(staging / files["base"], base_weights, base_config, tok_meta, opts.quant,
                             {**general, "general.name": f"{name} base"})
            log(f"wrote {files['base']} ({_size(staging / files['base'])})")
            model, tokenizer = load_gguf_back(staging / files["base"], staging)
            apply_lora_gguf_in_place(model, base_config, staging / files["adapter"])
            checks.append(_passed(check_model(reference, model, tokenizer, f"{files['base']} + {files['adapter']}",
                                              opts.quant), log))
            del model
    usage, notes = _gguf_usage(files, out, run.system_prompt, opts.to, name), []
    if opts.to == "ollama":
        bos = tok_meta.get("tokenizer.ggml.bos_token_id") if tok_meta.get("tokenizer.ggml.add_bos_token") else None
        system = run.system_prompt
        asked = [c[1:] if system and c and c[0] == {"role": "system", "content": system} else c
                 for c in reference.conversations]  # as a user asks: the Modelfile's SYSTEM fills in the rest
        # Ollama sends SYSTEM with every chat that has no system message: training's format with the run's prompt.
        expected = [prompt_ids(tokenizer, c, system) for c in reference.conversations]
        family = choose_family(tokenizer, asked, expected, system, bos)
        log(f"ollama: the {family.name} TEMPLATE gives the training prompt ids on all {len(reference.prompts)} "
            "check prompts and a multi-turn probe")
        header = f"mlxft export of {run.root.name} ({opts.quant}); ollama create {name} -f Modelfile"
        text = modelfile_text(family, files.get("model") or files["base"], run.system_prompt,
                              files.get("adapter"), header)
        write_atomic(staging / "Modelfile", text)
        checks.append({"artefact": "Modelfile", "line": f"Modelfile TEMPLATE ({family.name}): Ollama's prompt ids "
                       f"equal training's on {len(reference.prompts)} prompts + 1 multi-turn probe", "passed": True})
    return {"model_type": base_config.get("model_type", ""), "checks": checks, "usage": usage, "notes": notes}


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def _gguf_usage(files: dict[str, str], out: Path, system: str | None, to: str, name: str) -> list[str]:
    """The commands that run this export in Ollama or llama.cpp."""
    if to == "ollama":
        return [f"ollama create {name} -f {out}/Modelfile", f"ollama run {name}"]
    sys_flag = f" -sys {json.dumps(system)}" if system else ""
    if "model" in files:
        return [f"llama-cli -m {out}/{files['model']}{sys_flag}", f"llama-server -m {out}/{files['model']}"]
    base = f"{out}/{files['base']}" if "base" in files else "BASE.gguf  # the base the run was trained on, as GGUF"
    return [f"llama-cli -m {base} --lora {out}/{files['adapter']}{sys_flag}"]
