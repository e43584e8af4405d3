"""Exported GGUFs in llama.cpp vs mlxft, on the commit-type test prompts (`make bench-export`).

    python bench/export_bench.py RUN [--limit 160] [--out bench/export_results.json]

Exports RUN as an f16 GGUF, a q8_0 GGUF and base (f16) + adapter-only GGUF, then answers
every commit-type test prompt greedily three ways and compares:
  * mlxft: base + adapter in MLX, batched greedy as `mlxft eval` runs it;
  * llama.cpp (llama-cpp-python): the GGUF's own chat template, tokenizer and stop tokens;
  * llama.cpp with the base GGUF and `--lora` adapter GGUF.
Reports reply agreement, exact match (the suite's scorer), prompt-id agreement, sizes, timings.
Needs the optional extra: pip install 'mlxft[llamacpp]' (make llamacpp).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlxft  # noqa: E402,F401  (OpenBLAS before mlx)
from mlxft.export.run import llamacpp  # noqa: E402
from mlxft.data.encode import prompt_ids  # noqa: E402
from mlxft.inference.batch import generate_batch  # noqa: E402
from mlxft.export.run import ExportOptions, export_run  # noqa: E402
from mlxft.models.load import load_run_base  # noqa: E402
from mlxft.runs.run import Run  # noqa: E402
from mlxft.evaluation.suites import load_suite, suite_examples  # noqa: E402


def mlxft_replies(run: Run, examples, max_tokens: int) -> tuple[list[str], list[list[int]], float]:
    base = load_run_base(run, with_adapters=True)  # with the training chat template
    prompts = [prompt_ids(base.tokenizer, e.messages) for e in examples]
    tic = time.perf_counter()
    replies = generate_batch(base.model, base.tokenizer, prompts, max_tokens)
    return replies, prompts, time.perf_counter() - tic


def llamacpp_side(gguf: Path, examples, max_tokens: int, lora: Path | None = None) -> dict:
    tic = time.perf_counter()
    llm = llamacpp.load(gguf, lora=lora)
    load_s = time.perf_counter() - tic
    tic = time.perf_counter()
    replies = [llamacpp.chat_reply(llm, e.messages, max_tokens) for e in examples]
    ids = [llamacpp.chat_prompt_ids(llm, e.messages) for e in examples]
    return {"replies": replies, "ids": ids, "load_s": load_s, "answer_s": time.perf_counter() - tic}


def same(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N prompts (default: all 160).")
    parser.add_argument("--work", default=None, help="Folder for the exports (default: a temporary one).")
    parser.add_argument("--out", default="bench/export_results.json")
    args = parser.parse_args()
    if not llamacpp.available():
        sys.exit(f"export bench: llama.cpp is not installed ({llamacpp.INSTALL})")
    run = Run.open(args.run)
    suite = load_suite("commit-type")
    examples = suite_examples(suite, run.system_prompt)[: args.limit]
    exact = next(s.scorer for s in suite.scorers if s.name == "exact_match")
    work = Path(args.work or tempfile.mkdtemp(prefix="export-bench-"))
    results: dict = {"run": str(run.root), "prompts": len(examples), "exports": {}}
    files = {}
    for label, opts in (("f16", ExportOptions(quant="f16")), ("q8_0", ExportOptions(quant="q8_0")),
                        ("lora", ExportOptions(quant="f16", adapter_only=True, with_base=True))):
        out = work / label
        if not out.exists():
            report = export_run(run.root, out, opts, log=lambda *_: None)
            results["exports"][label] = {"seconds": round(report.seconds, 1), "files": report.files,
                                         "checks": report.checks}
            print(f"exported {label} in {report.seconds:.0f} s: {report.files}", flush=True)
        files[label] = {p.name: p for p in out.glob("*.gguf")}
    mlx, mlx_ids, mlx_s = mlxft_replies(run, examples, suite.max_tokens)
    results["mlxft"] = {"exact_match": exact.score(mlx, examples).value, "answer_s": round(mlx_s, 1)}
    print(f"mlxft: exact match {results['mlxft']['exact_match']:.2%} ({mlx_s:.0f} s)", flush=True)
    sides = {"f16": (next(iter(files["f16"].values())), None), "q8_0": (next(iter(files["q8_0"].values())), None),
             "base f16 + lora": (next(p for n, p in files["lora"].items() if n.startswith("base.")),
                                 next(p for n, p in files["lora"].items() if n.endswith(".lora.gguf")))}
    replies = {}
    for label, (gguf, lora) in sides.items():
        side = llamacpp_side(gguf, examples, suite.max_tokens, lora)
        replies[label] = side["replies"]
        entry = {"exact_match": exact.score(side["replies"], examples).value,
                 "agreement_with_mlxft": sum(map(same, side["replies"], mlx)) / len(mlx),
                 "prompt_ids_equal": sum(a == b for a, b in zip(side["ids"], mlx_ids)) / len(mlx_ids),
                 "load_s": round(side["load_s"], 2), "answer_s": round(side["answer_s"], 1)}
        results[f"llama.cpp {label}"] = entry
        print(f"llama.cpp {label}: {json.dumps(entry)}", flush=True)
    results["lora_vs_fused_f16_agreement"] = sum(map(same, replies["base f16 + lora"], replies["f16"])) / len(mlx)
    results["disagreements_f16"] = [{"prompt": e.messages[-1]["content"], "mlxft": a, "llama.cpp": b}
                                    for e, a, b in zip(examples, mlx, replies["f16"]) if not same(a, b)][:20]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"lora vs fused f16 in llama.cpp: {results['lora_vs_fused_f16_agreement']:.2%}; wrote {args.out}")


if __name__ == "__main__":
    main()
