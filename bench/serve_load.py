"""Load check for `mlxft serve`: many concurrent requests over two adapters and the base, no adapter bleed.

    .venv/bin/python bench/serve_load.py [--requests 200] [--concurrency 8]

Builds the tiny test model and two hand-made LoRA adapters in a temp folder, serves them on
127.0.0.1 (a free port), asks every (model, prompt) pair alone first, then fires the load
(alternating base / a / b, half of them streamed) and checks: 0 errors, and every greedy
answer equals the answer the same model gave to the same request alone. Prints p50/p95
latency. Exit 1 on any error or mismatch. Takes seconds on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tiny-model fixtures

import mlxft  # noqa: E402,F401  (OpenBLAS before mlx)
from conftest import SYSTEM, make_tiny_llama  # noqa: E402
from lora_fixtures import BRACKETS, make_adapter_run  # noqa: E402

from mlxft.inference.serve import Limits, load_engine, make_server  # noqa: E402

MODELS = ["base", "a", "b"]
PROMPTS = [f"{w} {n}" for w in ("alpha", "beta", "gamma", "x y") for n in ("x", "z w")]


def ask(client, model: str, prompt: str, stream: bool) -> str:
    kw = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
    return client.chat.completions.create(**kw).choices[0].message.content


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120.0, help="give up (exit 1) after this many seconds")
    args = parser.parse_args()
    import openai

    tmp = Path(tempfile.mkdtemp(prefix="mlxft-serve-load-"))
    base = make_tiny_llama(tmp / "tiny")
    a = make_adapter_run(tmp / "run-a", base, seed=1, system_prompt=SYSTEM)
    b = make_adapter_run(tmp / "run-b", base, seed=2, system_prompt=None, chat_template=BRACKETS,
                         keys=("self_attn.q_proj", "mlp.down_proj"), rank=8)
    engine = load_engine(None, [("a", str(a)), ("b", str(b))], Limits(max_queue=64), log=lambda *_: None)
    server = make_server(engine, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused",
                           max_retries=0, timeout=60)
    try:
        alone = {(m, p): ask(client, m, p, False) for m in MODELS for p in PROMPTS}
        differ = sum(alone[("a", p)] != alone[("base", p)] and alone[("b", p)] != alone[("base", p)] for p in PROMPTS)
        print(f"{len(alone)} reference answers; adapters differ from the base on {differ}/{len(PROMPTS)} prompts")
        jobs = [(MODELS[i % 3], PROMPTS[(i // 3) % len(PROMPTS)], i % 2 == 1) for i in range(args.requests)]

        def timed(job):
            tic = time.perf_counter()
            try:
                return job, ask(client, *job), time.perf_counter() - tic, None
            except Exception as e:  # counted, not raised: the check reports every failure
                return job, None, time.perf_counter() - tic, f"{type(e).__name__}: {e}"

        tic = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(timed, jobs, timeout=args.timeout))
        wall = time.perf_counter() - tic
    finally:
        server.shutdown()
        server.server_close()
        engine.stop()
    errors = [(j, e) for j, _, _, e in results if e]
    bleed = [(j, got) for j, got, _, e in results if not e and got != alone[j[:2]]]
    lat = sorted(t for *_, t, _ in results)
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    print(f"{len(results)} requests, {args.concurrency} concurrent, {wall:.1f} s ({len(results) / wall:.1f} req/s): "
          f"errors {len(errors)}, answers unlike the same request alone {len(bleed)}")
    print(f"latency p50 {statistics.median(lat) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")
    for job, what in (errors + bleed)[:5]:
        print(f"  {job}: {what!r}")
    return 1 if errors or bleed or differ == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
