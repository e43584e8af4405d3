"""fuse: the merged folder loads in stock mlx-lm and answers like base + adapter; a broken merge is refused."""

from __future__ import annotations

import json

import pytest
from lora_fixtures import make_adapter_run

import mlxft  # noqa: F401
from conftest import SYSTEM
from mlxft.models.fuse import FuseError, fuse_run, greedy_continuation


@pytest.fixture(scope="module")
def run(tiny_model, tiny_data, tmp_path_factory):
    return make_adapter_run(tmp_path_factory.mktemp("fuse") / "run", tiny_model, seed=3, system_prompt=SYSTEM,
                            data_dir=tiny_data)


def test_fused_folder_loads_in_stock_mlx_lm_and_answers_like_the_adapter(run, tmp_path):
    from mlx_lm.utils import load

    from mlxft.data.encode import prompt_ids
    from mlxft.inference.generate import load_target

    report = fuse_run(run, tmp_path / "fused", log=lambda *_: None)
    assert report.agreement >= 0.99 and report.rel_diff <= report.rel_bound and report.positions == 8 * 17  # 8 prompts x (16 new tokens + 1)
    out = tmp_path / "fused"
    record = json.loads((out / "mlxft_fuse.json").read_text())
    assert record["system_prompt"] == SYSTEM and record["gate"]["agreement"] == report.agreement
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == record["chat_template"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left

    fused, tok = load(str(out))
    reference = load_target(str(run))
    msgs = [{"role": "user", "content": "beta x y"}]
    ids = prompt_ids(tok, msgs, SYSTEM)
    assert ids == prompt_ids(reference.tokenizer, msgs, SYSTEM)
    assert greedy_continuation(fused, ids, 12) == greedy_continuation(reference.model, ids, 12)


def test_a_fuse_that_drops_the_adapter_is_refused(run, tmp_path, monkeypatch):
    from mlx.utils import tree_unflatten

    import mlxft.models.fuse as fuse

    def drop_adapter(model, dequantize=False):  # sabotage: keep the base linear, lose the LoRA delta
        model.update_modules(tree_unflatten([(n, m.linear) for n, m in model.named_modules() if hasattr(m, "fuse")]))

    monkeypatch.setattr(fuse, "fuse_layers", drop_adapter)
    with pytest.raises(FuseError, match="does not match base \\+ adapter"):
        fuse_run(run, tmp_path / "fused", log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def test_cli_fuse_refuses_an_existing_folder(run, tmp_path):
    from click.testing import CliRunner

    from mlxft.cli import main

    (tmp_path / "taken").mkdir()
    r = CliRunner().invoke(main, ["fuse", str(run), str(tmp_path / "taken")], catch_exceptions=False)
    assert r.exit_code == 1 and "already exists" in r.output
