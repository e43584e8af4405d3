"""The playground: the base and one or two runs' adapters answer the same prompt, on `mlxft serve`'s machinery.

One Engine (mlxft/inference/serve.py) holds the base once and an AdapterPool of the chosen runs'
adapters; each request names a model ("base" or a run), and the pool switches adapters
without reloading the base. Each adapter answers with the system prompt and chat template its
run was trained with, exactly as `mlxft serve` does. The next-token view runs
mlxft/inference/sampling.py's `next_token_steps` (what `mlxft generate --show-probs` prints) on the same
generation thread, so it never races a generation for the active adapter.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

from mlxft.data.encode import prompt_ids
from mlxft.inference.adapter_pool import BASE_NAME, read_adapter
from mlxft.inference.generate import Sampling
from mlxft.inference.sampling import next_token_steps
from mlxft.inference.serve import Engine, Job, Limits, RequestError, load_engine, parse_job
from mlxft.runs.run import RunDir
from mlxft.runs.summary import open_run, read_config
from mlxft.studio.security import StudioError

MAX_ADAPTERS = 2
MAX_PROB_STEPS = 64  # the next-token table is for reading, not for long answers


class Playground:
    """The engine for the base of the runs last asked for; replaced when another base is needed."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits(max_tokens_cap=1024)
        self.engine: Engine | None = None
        self.base: str | None = None
        self.lock = threading.Lock()
        self.stamps: dict[str, int] = {}  # run name -> mtime of the adapter file loaded

    def ensure(self, runs: list[Path]) -> Engine:
        """An engine whose pool holds the adapters of `runs` (by run folder name) over their shared base."""
        if not 1 <= len(runs) <= MAX_ADAPTERS:
            raise StudioError(f"pick one or two runs to compare with the base (got {len(runs)})")
        with self.lock:
            bases = {_base_source(run) for run in runs}
            if len(bases) != 1 or None in bases:
                raise StudioError("the runs were trained on different base models "
                                  f"({', '.join(map(str, bases))}): the playground holds one base at a time")
            base = bases.pop()
            if self.engine is None or self.base != base:
                if self.engine is not None:
                    self.engine.stop()
                self.engine, self.base = load_engine(base, [], self.limits, log=lambda *_: None), base
                self.stamps = {}
            pool = self.engine.pool
            for run in runs:
                stamp = _adapter_stamp(run)
                if run.name in pool.adapters and self.stamps.get(run.name) != stamp:  # trained on since: reload
                    self.engine.call(lambda: pool.remove(run.name))
                if run.name not in pool.adapters:
                    adapter = read_adapter(run.name, run)
                    self.engine.call(lambda: pool.add(adapter))
                    self.stamps[run.name] = stamp
            return self.engine

    def start(self, runs: list[Path], body: dict) -> Job:
        """Queue a reply to an OpenAI-style chat body ({model, messages, temperature, top_p, ...}), checked
        by `mlxft serve`'s own parse_job; model is "base" or one of the runs' names."""
        engine = self.ensure(runs)
        try:
            job, _ = parse_job(body, True, engine)
            engine.submit(job)
        except RequestError as e:
            raise StudioError(str(e), e.status) from None
        return job

    @staticmethod
    def stream(job: Job) -> Iterator[str]:
        """Text pieces of the job's reply, as `mlxft serve` streams them."""
        try:
            while True:
                kind, value = job.out.get()
                if kind == "error":
                    raise StudioError(str(value), value.status)
                if kind == "done":
                    return
                yield value
        finally:
            job.cancelled = True  # a closed browser tab stops the generation at its next token

    def next_tokens(self, runs: list[Path], body: dict, k: int) -> dict:
        """Each generated step's top-k tokens before/after the body's sampling settings (--show-probs)."""
        engine = self.ensure(runs)
        try:
            job, _ = parse_job(body, True, engine)
        except RequestError as e:
            raise StudioError(str(e), e.status) from None
        pool = engine.pool
        sampling = Sampling(job.temp, job.top_p, job.top_k, job.min_p, min(job.max_tokens, MAX_PROB_STEPS), job.seed)

        def work():
            pool.activate(job.model)
            ids = prompt_ids(pool.tokenizer, job.messages, pool.system_prompt(job.model))
            steps = []
            for step in next_token_steps(pool.model, pool.tokenizer, ids, sampling, k):
                steps.append(step)
                if step["eos"]:
                    break
            return steps

        return {"model": job.model, "steps": engine.call(work)}

    def system_prompts(self, runs: list[Path]) -> dict[str, str | None]:
        """What each model is prompted with: the runs' own system prompts; none for the base."""
        return {BASE_NAME: None, **{run.name: read_config(open_run(run)).get("system_prompt") for run in runs}}


def _base_source(run: Path) -> str | None:
    """The base model a run trained on, as its config.json records it (what read_adapter takes too)."""
    return ((read_config(open_run(run)).get("recipe") or {}).get("model") or {}).get("source")


def _adapter_stamp(run: Path) -> int:
    weights = RunDir(run).best_adapters / "adapters.safetensors"
    return weights.stat().st_mtime_ns if weights.is_file() else 0
