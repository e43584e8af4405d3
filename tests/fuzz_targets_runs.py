"""Fuzz target for run folders as another tool or a damaged disk leaves them: adapter_config.json,
adapters.safetensors and config.json, read by `serve` (an adapters folder or a run folder), `mlxft runs`
and `train --resume`. Shared pieces (tiny adapter run, tiny pool) are used by fuzz_targets_io too.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from hypothesis import strategies as st

from fuzz_harness import Outcome, json_values, mutate, probe, workdir
from fuzz_targets import SECTIONS, Target
from mlxft.errors import MlxftError


ADAPTER_KEYS = ["fine_tune_type", "num_layers", "lora_parameters", "rank", "scale", "dropout", "keys", "base_model",
                "system_prompt", "chat_template"]
RUN_KEYS = ["recipe", "data", "base_model", "chat_template", "system_prompt", "versions", "run_format", "steps",
            "started", "finished", "path", "sha256", "rows", "mlxft", "source", "name", *SECTIONS]


def json_doc(keys, base: dict):
    """config files: the real one with fields replaced, any JSON with the known keys, or damaged bytes."""
    good = json.dumps(base).encode()
    return st.one_of(
        st.dictionaries(st.sampled_from(list(base)), json_values(keys, 6), max_size=4)
        .map(lambda d: json.dumps({**base, **d}).encode()),
        json_values(keys).map(lambda v: json.dumps(v).encode()),
        mutate(good), st.binary(max_size=64),
    )


@lru_cache(maxsize=1)
def tiny_adapter_run() -> Path:
    """A real adapter run folder over the tiny model (made once per process)."""
    import tempfile

    from conftest import SYSTEM, make_tiny_llama
    from lora_fixtures import make_adapter_run

    root = Path(tempfile.mkdtemp(prefix="mlxft-fuzz-run-"))
    return make_adapter_run(root / "run", make_tiny_llama(root / "tiny"), seed=1, system_prompt=SYSTEM)


@lru_cache(maxsize=1)
def tiny_pool():
    from mlx_lm.utils import load

    from mlxft.inference.adapter_pool import AdapterPool

    run = tiny_adapter_run()
    model, tokenizer = load(json.loads((run / "config.json").read_text())["recipe"]["model"]["source"])
    return AdapterPool(model, tokenizer, tokenizer.chat_template)


def _run_files() -> dict[str, bytes]:
    run = tiny_adapter_run()
    return {name: (run / name).read_bytes() for name in ("config.json", "adapters/adapter_config.json",
                                                        "adapters/adapters.safetensors")}


def safetensors_header(header) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + b"\0" * 16


@lru_cache(maxsize=1)
def run_strategy():
    files = _run_files()
    weights = st.one_of(
        st.just(files["adapters/adapters.safetensors"]), mutate(files["adapters/adapters.safetensors"]),
        json_values(["dtype", "shape", "data_offsets", "__metadata__", "model.layers.0.self_attn.q_proj.lora_a"], 8)
        .map(safetensors_header), st.binary(max_size=40))
    return st.tuples(json_doc(ADAPTER_KEYS, json.loads(files["adapters/adapter_config.json"])), weights,
                     json_doc(RUN_KEYS, json.loads(files["config.json"])))


def run_run_folder(case) -> Outcome:
    from mlxft.inference.adapter_pool import read_adapter
    from mlxft.runs.summary import summarize
    from mlxft.runs.run import RunDir
    from mlxft.training.setup import resume

    adapter_config, weights, config = case
    with workdir() as tmp:
        run = tmp / "run"
        (run / "adapters").mkdir(parents=True)
        (run / "adapters" / "adapter_config.json").write_bytes(adapter_config)
        (run / "adapters" / "adapters.safetensors").write_bytes(weights)
        (run / "config.json").write_bytes(config)
        pool = tiny_pool()

        def serve_it(path):
            adapter = read_adapter("fuzz", path)
            try:
                pool.add(adapter)
                pool.activate("fuzz")
            finally:
                pool.adapters.pop("fuzz", None)
                pool.activate("base")

        def call():
            errors = {}
            steps = {"serve adapters/": lambda: serve_it(run / "adapters"), "serve run": lambda: serve_it(run),
                     "read_config": lambda: RunDir.open(run).read_config(), "runs": lambda: summarize(run),
                     "resume": lambda: resume(run, log=lambda *_: None)}
            for name, step in steps.items():
                try:  # each reader on its own: one refusal must not hide another reader's traceback
                    step()
                except Exception as e:  # noqa: BLE001
                    errors[name] = e
            for e in errors.values():
                if not isinstance(e, MlxftError):
                    raise e
            refused = [e for name, e in errors.items() if name != "resume"]  # resume always refuses: no checkpoint
            if refused:
                raise refused[0]

        return probe(call, [run])


def _hand_runs() -> list[tuple[str, tuple]]:
    files = _run_files()
    acfg, weights, cfg = (files[k] for k in ("adapters/adapter_config.json", "adapters/adapters.safetensors", "config.json"))
    good_cfg, good_acfg = json.loads(cfg), json.loads(acfg)
    return [
        ("config is not JSON", (acfg, weights, b"{oops")),
        ("config is a list", (acfg, weights, b"[]")),
        ("newer run format", (acfg, weights, json.dumps({**good_cfg, "run_format": 99, "versions": {"mlxft": "9.0"}}).encode())),
        ("recipe is a string", (acfg, weights, json.dumps({**good_cfg, "recipe": "tiny"}).encode())),
        ("recipe.model is a list", (acfg, weights, json.dumps({**good_cfg, "recipe": {"model": [1]}}).encode())),
        ("recipe.train is a number", (acfg, weights, json.dumps({**good_cfg, "recipe": {"train": 3}}).encode())),
        ("recipe.train is a number, data recorded", (acfg, weights, json.dumps(
            {**good_cfg, "recipe": {"train": 3}, "data": {"path": "/nowhere", "sha256": {"train": "0" * 64}}}).encode())),
        ("tiers with a bad key", (acfg, weights, json.dumps({**good_cfg, "recipe": {"tiers": {"x": {}}}}).encode())),
        ("data.path missing", (acfg, weights, json.dumps({**good_cfg, "data": {}}).encode())),
        ("system prompt is a number", (acfg, weights, json.dumps({**good_cfg, "system_prompt": 5}).encode())),
        ("adapter_config is a list", (b"[1]", weights, cfg)),
        ("lora scale is text", (json.dumps({**good_acfg, "lora_parameters": {"scale": "big"}}).encode(), weights, cfg)),
        ("lora scale is NaN", (json.dumps({**good_acfg, "lora_parameters": {"scale": float("nan")}}).encode(), weights, cfg)),
        ("lora_parameters is a list", (json.dumps({**good_acfg, "lora_parameters": [1]}).encode(), weights, cfg)),
        ("fine_tune_type dora", (json.dumps({**good_acfg, "fine_tune_type": "dora"}).encode(), weights, cfg)),
        ("chat_template is a list", (json.dumps({**good_acfg, "chat_template": [1]}).encode(), weights, b"{}")),
        ("weights empty", (acfg, b"", cfg)),
        ("weights truncated", (acfg, weights[: len(weights) // 2], cfg)),
        ("weights header lies", (acfg, safetensors_header({"x.lora_a": {"dtype": "F32", "shape": [10**12],
                                                                        "data_offsets": [0, 8]}}), cfg)),
        ("weights 1-D lora_a", (acfg, safetensors_header({"model.layers.0.self_attn.q_proj.lora_a": {
            "dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}), cfg)),
        ("weights not LoRA", (acfg, safetensors_header({"model.embed_tokens.weight": {
            "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}), cfg)),
    ]


RUNS = Target("run folders: adapter_config.json / config.json", None, None, run_run_folder)


def runs_target() -> Target:
    """RUNS with its strategy and hand cases built (they need the tiny adapter run, made on first use)."""
    RUNS.strategy, RUNS.hand = run_strategy(), _hand_runs()
    return RUNS

