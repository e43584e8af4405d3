"""export: every file written reads back (through import-gguf) with the logits of the model it came from.

Tolerances, relative to the largest |logit|: float32 files 1e-4 (rounding only), float16 files 1e-2
(the tiny random models have logits of ~3; SmolLM2 reads 7e-4, README).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlxft  # noqa: F401
import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from export_fixtures import fused_reference, logits, tiny_run

from mlxft.cli import main
from mlxft.data.encode import prompt_ids
from mlxft.export.run import ExportOptions, export_run
from mlxft.export.check import ExportError
from mlxft.models.gguf_import import import_gguf
from mlxft.models.gguf import read_gguf_header

QUIET = dict(log=lambda *_: None)
CHAT = [{"role": "system", "content": "Label the message."}, {"role": "user", "content": "beta x y z"}]
TOLERANCE = {"f32": 1e-4, "f16": 1e-2}


@pytest.fixture(scope="module", params=["llama", "llama3", "qwen2", "gemma3"])
def run(request, tiny_data, tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp(request.param), request.param, tiny_data)


def read_back(path: Path, tmp: Path):
    from mlx_lm.utils import load

    return load(str(import_gguf(path, tmp / "readback", dequantize="fp32")))


def only_gguf(folder: Path, pattern: str = "*.gguf") -> Path:
    (found,) = sorted(folder.glob(pattern))
    return found


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_fused_gguf_reads_back_with_the_mlx_models_logits(run, quant, tmp_path):
    report = export_run(run, tmp_path / "out", ExportOptions(quant=quant), **QUIET)
    path = only_gguf(report.out)
    model, tok = read_back(path, tmp_path)
    ref_model, ref_tok = fused_reference(run)
    ids = prompt_ids(ref_tok, CHAT)
    assert prompt_ids(tok, CHAT) == ids  # vocabulary, specials and the TRAINED chat template came along
    want, got = logits(ref_model, ids), logits(model, ids)
    assert np.abs(got - want).max() <= TOLERANCE[quant] * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
    metadata, tensors = read_gguf_header(path)
    assert metadata["tokenizer.chat_template"] == json.loads((run / "config.json").read_text())["chat_template"]
    assert {t.type_name for t in tensors.values()} == ({"F32"} if quant == "f32" else {"F32", "F16"})
    assert sorted(p.name for p in report.out.iterdir()) == sorted([path.name, "README.md", "mlxft_export.json"])
    assert report.details[0]["passed"] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def merged_with_lora(base: Path, adapter: Path, out: Path) -> Path:
    """base GGUF + LoRA GGUF merged as llama.cpp applies an adapter (W + alpha/rank * B A), in GGUF layout,
    with llama.cpp's own reader and writer: independent of mlxft's LoRA reader."""
    lora = gguf.GGUFReader(str(adapter))
    alpha = float(lora.get_field("adapter.lora.alpha").contents())
    parts = {t.name: np.array(t.data, dtype=np.float32) for t in lora.tensors}
    reader = gguf.GGUFReader(str(base))
    writer = gguf.GGUFWriter(str(out), reader.get_field("general.architecture").contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        data = np.array(t.data, dtype=np.float32)
        if f"{t.name}.lora_a" in parts:
            a, b = parts[f"{t.name}.lora_a"], parts[f"{t.name}.lora_b"]
            data = data + (alpha / a.shape[0]) * (b @ a)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_adapter_only_gguf_on_the_base_gguf_gives_the_fused_logits(run, tmp_path):
    report = export_run(run, tmp_path / "out", ExportOptions(adapter_only=True, with_base=True, quant="f32"), **QUIET)
    adapter, base = only_gguf(report.out, "*.lora.gguf"), only_gguf(report.out, "base.*.gguf")
    assert read_gguf_header(adapter)[0]["general.type"] == "adapter" and adapter.stat().st_size < base.stat().st_size
    model, tok = read_back(merged_with_lora(base, adapter, tmp_path / "merged.gguf"), tmp_path)
    ref_model, ref_tok = fused_reference(run)
    ids = prompt_ids(ref_tok, CHAT)
    want = logits(ref_model, ids)
    assert np.abs(logits(model, ids) - want).max() <= 1e-4 * np.abs(want).max()
    assert [d["artefact"] for d in report.details] == [f"{adapter.name} on the run's base",
                                                        f"{base.name} + {adapter.name}"]


def test_ollama_folder_has_the_model_a_modelfile_and_a_card(run, tmp_path):
    report = export_run(run, tmp_path / "out", ExportOptions(to="ollama", adapter_only=True), **QUIET)
    modelfile = (report.out / "Modelfile").read_text()
    family = next(f for key, f in (("gemma3", "gemma"), ("llama3", "llama3"), ("", "chatml")) if key in run.parent.name)
    assert "FROM ./base.F16.gguf" in modelfile and "ADAPTER ./run.lora.gguf" in modelfile
    assert 'SYSTEM """Label the message."""' in modelfile
    assert {"gemma": "<start_of_turn>", "llama3": "<|eot_id|>", "chatml": "<|im_start|>"}[family] in modelfile
    assert any(f"Modelfile TEMPLATE ({family})" in line for line in report.checks)
    assert report.usage[0] == f"ollama create run -f {report.out}/Modelfile"


def test_a_sabotaged_export_is_refused_and_nothing_is_written(run, tmp_path, monkeypatch):
    import mlxft.export.gguf_write as gguf_write

    monkeypatch.setattr(gguf_write, "model_tensors", _shuffled(gguf_write.model_tensors))
    with pytest.raises(ExportError, match="does not match base \\+ adapter"):
        export_run(run, tmp_path / "out", ExportOptions(quant="f32"), **QUIET)
    assert list(tmp_path.iterdir()) == []


def _shuffled(model_tensors):
    def sabotage(weights, family, metadata):  # swap two blocks' attention outputs: a plausible mapping bug
        out = model_tensors(weights, family, metadata)
        out["blk.0.attn_output.weight"], out["blk.1.attn_output.weight"] = (out["blk.1.attn_output.weight"],
                                                                            out["blk.0.attn_output.weight"])
        return out
    return sabotage


def test_an_export_that_drops_the_adapter_is_refused(tiny_data, tmp_path, monkeypatch):
    import mlxft.export.run as export

    run = tiny_run(tmp_path / "r", "llama", tiny_data)
    monkeypatch.setattr(export, "fuse_layers", lambda model: model.update_modules(
        __import__("mlx.utils").utils.tree_unflatten([(n, m.linear) for n, m in model.named_modules()
                                                      if hasattr(m, "fuse")])))
    with pytest.raises(ExportError, match="nothing was written"):
        export_run(run, tmp_path / "out", ExportOptions(to="ollama"), **QUIET)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_mlx_and_lmstudio_exports_are_fused_folders_with_a_card(tiny_data, tmp_path, monkeypatch):
    run = tiny_run(tmp_path / "r", "llama", tiny_data)
    monkeypatch.setenv("LMSTUDIO_MODELS", str(tmp_path / "lms"))
    report = export_run(run, None, ExportOptions(to="lmstudio", name="commit-labels"), **QUIET)
    assert report.out == tmp_path / "lms" / "mlxft" / "commit-labels"
    assert {"config.json", "model.safetensors", "README.md", "mlxft_fuse.json"} <= {p.name for p in report.out.iterdir()}
    assert report.usage[0].startswith("lms load mlxft/commit-labels")
    mlx = export_run(run, tmp_path / "mlx", ExportOptions(to="mlx"), **QUIET)
    assert "mlx folder: greedy agreement 100.00%" in (mlx.out / "README.md").read_text()


def test_cli_refuses_k_quants_and_push_offline_without_writing(run, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = CliRunner().invoke(main, ["export", str(run), str(tmp_path / "out"), "--quant", "q4_k_m"])
    assert r.exit_code == 1 and "llama-quantize" in r.output
    r = CliRunner().invoke(main, ["export", str(run), str(tmp_path / "out"), "--push", "me/commit-labels"])
    assert r.exit_code == 1 and "needs a Hugging Face token" in r.output and "nothing was written" in r.output
    r = CliRunner().invoke(main, ["export", str(run), "--to", "gguf"])
    assert r.exit_code == 1 and "needs an OUT folder" in r.output
    assert [p.name for p in tmp_path.iterdir()] == ["hf"] or list(tmp_path.iterdir()) == []


def test_cli_export_prints_the_files_and_the_commands_to_run_them(tiny_data, tmp_path):
    run = tiny_run(tmp_path / "r", "llama", tiny_data)
    r = CliRunner().invoke(main, ["export", str(run), str(tmp_path / "o"), "--to", "ollama", "--name", "labels"])
    assert r.exit_code == 0, r.output
    assert "labels.F16.gguf" in r.output and f"ollama create labels -f {tmp_path / 'o'}/Modelfile" in r.output
    assert "gate: labels.F16.gguf (f16): greedy agreement 100.00%" in r.output


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    from mlxft.recipes import load_recipe
    from mlxft.training.setup import train

    recipe = load_recipe("smollm2-135m", overrides=["train.iters=16", "train.batch_size=4", "train.val_every=16",
                                                    "train.val_batches=1", "train.warmup_steps=2"])
    return train(recipe, runs_root=tmp_path_factory.mktemp("runs"), log=lambda *_: None).run.root


@pytest.mark.slow
def test_smollm2_fused_f16_and_lossless_q4_1_adapter_pass_their_gates(smollm2_run, tmp_path):
    fused = export_run(smollm2_run, tmp_path / "f16", ExportOptions(to="ollama"), **QUIET)
    assert fused.details[0]["agreement"] == 1.0 and fused.details[0]["rel_diff"] < 5e-3
    assert 'SYSTEM """Classify the git commit message.' in (fused.out / "Modelfile").read_text()
    lora = export_run(smollm2_run, tmp_path / "q4", ExportOptions(adapter_only=True, with_base=True, quant="q4_1"),
                      **QUIET)
    # The bundled SmolLM2 is Q4_1 (embedding Q8_0): its weights re-quantize to themselves, so base + LoRA is exact.
    assert lora.details[-1]["rel_diff"] < 1e-4 and lora.files["base.Q4_1.gguf"] < 110e6
    assert "Apache-2.0" in (lora.out / "README.md").read_text()
