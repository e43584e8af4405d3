"""The `mlxft` command: parse, call, print. No logic lives here.

Every command turns an MlxftError into one line on stderr and exit code 1.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

import mlxft

from mlxft.errors import MlxftError


def friendly(fn):
    """Run a command; user mistakes become one clear message and exit 1, Ctrl-C exits 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MlxftError as e:
            click.echo(f"mlxft: error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("mlxft: interrupted", err=True)
            sys.exit(130)

    return wrapper


sampling_options = [
    click.option("--temp", type=float, default=0.0, show_default=True, help="0 = greedy."),
    click.option("--top-p", type=float, default=0.0, help="Nucleus sampling (0 = off)."),
    click.option("--top-k", type=int, default=0, help="Keep the K most likely tokens (0 = off)."),
    click.option("--min-p", type=float, default=0.0, help="Drop tokens below min-p x top probability (0 = off)."),
    click.option("--max-tokens", type=int, default=256, show_default=True),
    click.option("--seed", type=int, default=None, help="Random seed for sampling."),
    click.option("--system", default=None, help="System prompt (default: the one the run was trained with)."),
]


def with_sampling(fn):
    for opt in reversed(sampling_options):
        fn = opt(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(mlxft.__version__, prog_name="mlxft")
def main():
    """Fine-tune open LLMs on your laptop with MLX."""


@main.command("import-gguf")
@click.argument("gguf_file", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--dequantize", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
              help="Write dense weights instead of keeping the GGUF's quantization.")
@friendly
def import_gguf_cmd(gguf_file, out_dir, dequantize):
    """Convert a GGUF file into an mlx-lm model folder."""
    from mlxft.models.gguf_import import import_gguf  # lazy: CLI start-up

    out = import_gguf(Path(gguf_file), Path(out_dir), dequantize=dequantize)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("recipe", default="smollm2-135m")
@click.option("--data", "data_dir", default=None, help="Folder with train/valid/test.jsonl (default: the recipe's).")
@click.option("--model", default=None,
              help="Base model instead of the recipe's: builtin:NAME, a local mlx-lm/HF folder, a .gguf file or a hub repo id.")
@click.option("--tier", type=int, default=None, help="Memory tier in GB (default: detected).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. train.iters=200.")
@click.option("--runs-dir", default=None, help="Where run folders go (default: ./runs).")
@click.option("--compare/--no-compare", default=False,
              help="After training, score base vs adapter on the recipe's eval suites; exit 1 when a gate fails.")
@click.option("--resume", "resume_run", default=None, metavar="RUN",
              help="Continue RUN from its newest checkpoint, with the recipe and data in RUN/config.json.")
@click.option("--method", type=click.Choice(["sft", "dpo", "orpo", "grpo"]), default=None,
              help="Training objective (default: the recipe's train.method); dpo/orpo need preference pairs, grpo prompts.")
@click.option("--reward", "reward_functions", multiple=True, metavar="FILE.py:FN[:W]",
              help="GRPO: add a reward function fn(completion, example) -> float (repeatable).")
@click.option("--hosts", default=None, metavar="H1,H2",
              help="Data-parallel over these hosts (IPs or ssh names; 127.0.0.1,127.0.0.1 = two local ranks) via mlx.launch.")
@click.option("--hostfile", default=None, metavar="JSON", help="Data-parallel over mlx.launch's JSON hostfile.")
@click.option("--launch-arg", "launch_args", multiple=True, metavar="ARG",
              help="Pass ARG to mlx.launch, e.g. --launch-arg=--starting-port=40000.")
@click.option("--auto-fit", is_flag=True,
              help="When the memory plan does not fit the tier, shrink the batch / checkpoint / quantize until it does.")
@friendly
def train(recipe, data_dir, model, tier, overrides, runs_dir, compare, resume_run, method, reward_functions, hosts,
          hostfile, launch_args, auto_fit):
    """Fine-tune RECIPE (a name in recipes/ or a .yaml path), or continue a run with --resume RUN."""
    from mlxft.recipes import load_recipe  # lazy: CLI start-up
    from mlxft.runs.run import Run
    from mlxft.training import distributed, launch
    from mlxft.training.setup import resume, train as run_training

    if hosts or hostfile or launch_args:  # re-run this command on every host, as ranks of one job
        argv = launch.rank_argv(sys.argv[sys.argv.index("train"):])
        sys.exit(launch.launch(argv, hosts, hostfile, launch_args))
    distributed.init()  # a rank of mlx.launch/mpirun joins its group; a plain process is a group of one
    if resume_run:
        if data_dir or model or tier or overrides or runs_dir or method or reward_functions:
            raise click.UsageError(
                "--resume RUN trains with RUN/config.json; drop --data/--model/--tier/--set/--runs-dir/--method/--reward")
        result = resume(resume_run)
    else:
        if model:
            overrides = (*overrides, f"model.source={model}")
        if method:
            overrides = (*overrides, f"train.method={method}")
        r = load_recipe(recipe, tier=tier, overrides=overrides)
        r.grpo.reward_functions = [*r.grpo.reward_functions, *reward_functions]
        click.echo(f"recipe {r.name} for the {r.tier} GB tier")
        result = run_training(r, data_dir, Path(runs_dir) if runs_dir else None, auto_fit=auto_fit)
    compare = compare and distributed.is_main()  # rank 0 evaluates; the other ranks are done
    trained = Run.open(result.run.root) if compare else None
    if compare and trained.method in ("dpo", "orpo") and not trained.recipe.eval.suites:
        # lazy: CLI start-up (no suites named: log-prob preference on the test pairs)
        from mlxft.evaluation.pairs import compare_pairs, format_pairs

        click.echo(format_pairs(compare_pairs(result.run.root, log=click.echo)))
        compare = False
    if compare:
        from mlxft.evaluation.evaluate import compare_run, format_comparison  # lazy: CLI start-up

        evaluated = compare_run(result.run.root, log=click.echo)
        click.echo(format_comparison(evaluated))
    click.echo(f"run folder: {result.run.root}")
    if compare and not evaluated["passed"]:
        sys.exit(1)  # an eval gate failed (the table above says which): CI should notice


@main.command("plan")
@click.argument("recipe", default="smollm2-135m")
@click.option("--tier", type=int, default=None, help="Memory tier in GB (default: detected).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. train.batch_size=4.")
@click.option("--data", "data_dir", default=None, help="Folder with train.jsonl (default: the recipe's).")
@click.option("--model", default=None, help="Base model instead of the recipe's.")
@friendly
def plan_cmd(recipe, tier, overrides, data_dir, model):
    """Predict peak memory and tokens/s of training RECIPE, and whether it fits the tier."""
    from mlxft.training.plan import format_plan, plan_recipe  # lazy: CLI start-up
    from mlxft.recipes import load_recipe

    if model:
        overrides = (*overrides, f"model.source={model}")
    r = load_recipe(recipe, tier=tier, overrides=overrides)
    click.echo(f"recipe {r.name} for the {r.tier} GB tier")
    click.echo(format_plan(plan_recipe(r, data_dir)))


@main.command("eval")
@click.argument("run_or_model")
@click.option("--suite", "suites", multiple=True, metavar="NAME",
              help="Suite in evals/ (or a .yaml path); repeatable. Default: the recipe's eval.suites.")
@click.option("--against", default=None, metavar="BASE",
              help="Compare with this model or run instead of the run's own base.")
@click.option("--data", default=None, type=click.Path(dir_okay=False),
              help="Score one --suite on this chat JSONL instead of its own data (e.g. your held-out set).")
@click.option("--split", default="test", show_default=True, help="Split scored when the recipe names no suites.")
@click.option("--failures", default=3, show_default=True, help="Worst failures shown per suite (eval.json keeps 10).")
@friendly
def eval_cmd(run_or_model, suites, against, data, split, failures):
    """Score base vs adapter on eval suites; print the table, write RUN/eval.json; exit 1 if a gate fails."""
    from mlxft.evaluation.evaluate import compare_run, format_comparison  # lazy: CLI start-up

    result = compare_run(run_or_model, list(suites), against, data, split, log=click.echo)
    click.echo(format_comparison(result, failures))
    if result["run"]:
        click.echo(f"wrote {result['run']}/eval.json")
    if not result["passed"]:
        sys.exit(1)


@main.command("eval-pairs")
@click.argument("run")
@click.option("--data", default=None, type=click.Path(),
              help="Preference pairs to score (default: the run's test split).")
@friendly
def eval_pairs(run, data):
    """Preference accuracy of base vs adapter on held-out pairs (log-probs); adds a suite to RUN/eval.json."""
    from mlxft.evaluation.pairs import compare_pairs, format_pairs  # lazy: CLI start-up

    result = compare_pairs(run, data, log=click.echo)
    click.echo(format_pairs(result))
    click.echo(f"wrote {run}/eval.json")


@main.command()
@click.argument("target")
@click.option("--prompt", "-p", required=True, help="The user message.")
@click.option("--show-probs", type=click.IntRange(min=1), default=None, metavar="K",
              help="Print each step's top-K tokens before/after temperature, top-p, min-p, top-k.")
@with_sampling
@friendly
def generate(target, prompt, show_probs, temp, top_p, top_k, min_p, max_tokens, seed, system):
    """Generate a reply from TARGET: a run folder or a model (builtin:, folder, .gguf, hub id)."""
    from mlxft.inference.generate import Sampling, generate_text, load_target  # lazy: CLI start-up
    from mlxft.inference.sampling import show_probs as show

    loaded = load_target(target)
    sampling = Sampling(temp, top_p, top_k, min_p, max_tokens, seed)
    if show_probs:
        return show(loaded, prompt, loaded.system(system), sampling, show_probs)
    generate_text(loaded, prompt, loaded.system(system), sampling)


@main.command()
@click.argument("target")
@with_sampling
@friendly
def chat(target, temp, top_p, top_k, min_p, max_tokens, seed, system):
    """Chat in the terminal with TARGET: a run folder or a model."""
    from mlxft.inference.generate import Sampling, chat_loop, load_target  # lazy: CLI start-up

    loaded = load_target(target)
    chat_loop(loaded, loaded.system(system), Sampling(temp, top_p, top_k, min_p, max_tokens, seed))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly
def doctor(as_json):
    """Show what this machine gives mlx: device, BLAS, measured GFLOP/s, memory tier."""
    from mlxft.doctor import collect, format_report  # lazy: CLI start-up

    info = collect()
    click.echo(json.dumps(info, indent=2) if as_json else format_report(info))


# ---------------------------------------------------------------- mlxft data (prepare, check)

_recipe_opt = click.option("--recipe", default="smollm2-135m", show_default=True,
                           help="Recipe whose tokenizer, system prompt and max_seq_length the checks use.")
_model_opt = click.option("--model", default=None, help="Use this model's tokenizer instead of the recipe's.")
_format_opt = click.option("--format", "fmt", default=None,
                           type=click.Choice(["chat", "sharegpt", "alpaca", "completions", "text", "preference"]),
                           help="Row format (default: detected per file).")


@main.group()
def data():
    """Prepare and check datasets."""


@data.command("prepare")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--split", "split_text", default="0.9,0.05,0.05", show_default=True,
              help="train,valid,test fractions for a single source (named split files are kept).")
@click.option("--seed", type=int, default=0, show_default=True, help="Changes which rows land in which split.")
@_format_opt
@_recipe_opt
@_model_opt
@friendly
def data_prepare(src, out, split_text, seed, fmt, recipe, model):
    """Normalise SRC (file or folder; chat, ShareGPT, Alpaca, ...) to chat JSONL splits in OUT."""
    from mlxft.data.check import recipe_and_tokenizer  # lazy: CLI start-up
    from mlxft.data.prepare import parse_split, prepare_dataset

    fractions = parse_split(split_text)
    r, tokenizer, why = recipe_and_tokenizer(recipe, model)
    if why:
        click.echo(f"mlxft: note: no token statistics ({why})", err=True)
    prepare_dataset(src, out, fractions, seed, fmt, tokenizer, r, log=click.echo)
    click.echo(f"wrote {out} (manifest.json lists formats, hashes and token counts)")


@data.command("check")
@click.argument("path", type=click.Path())
@_recipe_opt
@_model_opt
@_format_opt
@click.option("--fix", "fix_out", default=None, type=click.Path(),
              help="Write a cleaned copy (broken and duplicate rows dropped, fix_log.jsonl says why) to this folder.")
@click.option("--limit", type=int, default=20, show_default=True, help="Problems shown per kind (0 = all).")
@friendly
def data_check(path, recipe, model, fmt, fix_out, limit):
    """Report every problem in PATH (file or folder) with file and line; exit 1 on errors."""
    from mlxft.data.check import check_path, recipe_and_tokenizer  # lazy: CLI start-up
    from mlxft.data.prepare import write_clean

    r, tokenizer, why = recipe_and_tokenizer(recipe, model)
    if why:
        click.echo(f"mlxft: note: {why}", err=True)
    report = check_path(path, r, tokenizer, fmt)
    click.echo(report.format(limit))
    if fix_out:
        kept, dropped = write_clean(report, fix_out)
        click.echo(f"wrote a cleaned copy to {fix_out}: " + ", ".join(f"{s} {n} rows" for s, n in kept.items())
                   + f"; {dropped} rows dropped (see fix_log.jsonl); the input is unchanged")
    if not report.ok:
        sys.exit(1)


@main.command()
@click.option("--base", default=None, help="Base model (builtin:, folder, .gguf, hub id); default: the adapters' own base.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH", help="Serve a run or adapters folder as model NAME.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless you mean otherwise).")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--max-tokens-cap", type=int, default=2048, show_default=True, help="Largest max_tokens a request may ask for.")
@click.option("--max-queue", type=int, default=32, show_default=True, help="Queued requests before answering 429.")
@click.option("--api-key", default=None, metavar="KEY",
              help="Require Authorization: Bearer KEY on every request (default: $MLXFT_API_KEY; none = no check).")
@click.option("--insecure-no-auth", is_flag=True, help="Listen beyond loopback without an API key anyway.")
@click.option("--request-timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds a request may take, queue included, before answering 504.")
@friendly
def serve(base, adapters, host, port, max_tokens_cap, max_queue, api_key, insecure_no_auth, request_timeout):
    """OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models; model=NAME picks the adapter."""
    from mlxft.inference.serve import Limits, load_engine, make_server, parse_adapter_args  # lazy: CLI start-up
    from mlxft.inference.serve_guard import check_bind, resolve_api_key

    api_key = resolve_api_key(api_key)
    warning = check_bind(host, api_key, insecure_no_auth)  # before loading anything: a refusal is instant
    engine = load_engine(base, parse_adapter_args(adapters), Limits(max_tokens_cap=max_tokens_cap, max_queue=max_queue,
                                                                    request_timeout=request_timeout), log=click.echo)
    try:
        server = make_server(engine, host, port, api_key=api_key)
    except OSError as e:
        raise MlxftError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    if warning:
        click.echo(warning + " (admin stays loopback-only)")
    click.echo(f"serving {', '.join(engine.pool.names())} on http://{host}:{server.server_address[1]}/v1"
               + (" (API key required)" if api_key else ""))
    try:
        server.serve_forever()
    finally:
        server.server_close()


@main.command()
@click.argument("run")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--dequantize", is_flag=True, help="Write dense weights even when the base is quantized.")
@friendly
def fuse(run, out_dir, dequantize):
    """Merge RUN's adapter into its base and write an mlx-lm/HF model folder (verified before it is kept)."""
    from mlxft.models.fuse import fuse_run  # lazy: CLI start-up

    report = fuse_run(run, out_dir, dequantize=dequantize, log=click.echo)
    click.echo(f"wrote {report.out}")


@main.command("export")
@click.argument("run")
@click.argument("out", required=False, type=click.Path(file_okay=False))
@click.option("--to", "to", type=click.Choice(["gguf", "ollama", "lmstudio", "mlx"]), default="gguf", show_default=True,
              help="gguf: llama.cpp file; ollama: GGUF + Modelfile; lmstudio: MLX folder in LM Studio's models; mlx: fused folder.")
@click.option("--quant", default="f16", show_default=True,
              help="GGUF type: f32 f16 bf16 q8_0 q5_0 q5_1 q4_0 q4_1 (K-quants such as q4_k_m: llama.cpp's llama-quantize).")
@click.option("--adapter-only", is_flag=True, help="The LoRA alone as a GGUF adapter (llama.cpp --lora, Ollama ADAPTER).")
@click.option("--with-base", is_flag=True, help="With --adapter-only: write the base GGUF too (--to ollama always does).")
@click.option("--name", default=None, help="Model name in file names and the card (default: the run folder's name).")
@click.option("--push", metavar="REPO_ID", default=None, help="Upload the finished folder to this Hugging Face repo.")
@click.option("--prompts", type=click.IntRange(min=1), default=8, show_default=True,
              help="Eval prompts the written files are checked on against base + adapter.")
@friendly
def export_cmd(run, out, to, quant, adapter_only, with_base, name, push, prompts):
    """Export RUN (verified against base + adapter) into OUT; --to lmstudio defaults to LM Studio's models folder."""
    from mlxft.export.run import ExportOptions, export_run  # lazy: CLI start-up

    opts = ExportOptions(to=to, quant=quant, adapter_only=adapter_only, with_base=with_base, name=name, push=push,
                         prompts=prompts)
    report = export_run(run, out, opts, log=click.echo)
    for file, size in sorted(report.files.items()):
        click.echo(f"  {file}  {size / 1e6:.1f} MB")
    click.echo(f"wrote {report.out} in {report.seconds:.0f} s (README.md is its model card); to run it:")
    for line in report.usage:
        click.echo(f"  {line}")
    if report.pushed:
        click.echo(f"pushed to {report.pushed}")


# ---------------------------------------------------------------- mlxft report, mlxft runs


@main.command()
@click.argument("run")
@friendly
def report(run):
    """Write RUN/report.html: run card, loss/throughput/memory curves, eval tables (self-contained, offline)."""
    from mlxft.runs.report import write_report  # lazy: CLI start-up

    click.echo(f"wrote {write_report(run)}")


@main.group(invoke_without_command=True)
@click.option("--runs-dir", default=None, help="Folder of run folders (default: $MLXFT_RUNS or ./runs).")
@click.pass_context
@friendly
def runs(ctx, runs_dir):
    """List runs with their key figures; `mlxft runs compare A B` puts two side by side."""
    if ctx.invoked_subcommand is not None:
        return
    from mlxft.runs.summary import format_run_list, list_runs  # lazy: CLI start-up

    found = list_runs(runs_dir)
    click.echo(format_run_list(found) if found else "no runs yet (mlxft train RECIPE makes one)")


@runs.command("compare")
@click.argument("run_a")
@click.argument("run_b")
@friendly
def runs_compare(run_a, run_b):
    """Config differences, metrics and eval scores of RUN_A and RUN_B side by side."""
    from mlxft.runs.compare import compare_runs  # lazy: CLI start-up

    click.echo(compare_runs(run_a, run_b))


@main.command()
@click.option("--runs-dir", default=None, help="Folder of run folders (default: $MLXFT_RUNS or ./runs).")
@click.option("--port", type=int, default=8321, show_default=True, help="Port on 127.0.0.1 (0 = any free port).")
@friendly
def studio(runs_dir, port):
    """Local web app on 127.0.0.1: start, watch, stop/resume, compare and talk to runs; prints the URL to open."""
    from mlxft.studio.app import serve  # lazy: CLI start-up

    serve(Path(runs_dir or os.environ.get("MLXFT_RUNS") or "runs"), port, log=click.echo)


# ---------------------------------------------------------------- mlxft synth (teacher-to-student data)


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--teacher", required=True, metavar="MODEL_OR_URL",
              help="builtin:NAME, a model folder, .gguf, hub id, a run folder (base + adapter), or an OpenAI-compatible URL.")
@click.option("--teacher-model", default=None, help="Model name at the endpoint (default: the first it lists).")
@click.option("--seeds", required=True, type=click.Path(dir_okay=False),
              help="Topics (one per line) or example rows (JSONL/JSON/CSV); cycled.")
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="Rows to keep.")
@click.option("--mode", type=click.Choice(["generate", "answer"]), default="generate", show_default=True,
              help="generate: the teacher writes whole examples (JSON); answer: it answers each seed's prompt.")
@click.option("--template", type=click.Path(dir_okay=False), default=None,
              help="jinja2 teacher prompt (default: the packaged one of the mode; see mlxft/templates/).")
@click.option("--system", default=None, help="The student's system prompt, put first in every row.")
@click.option("--recipe", default=None, help="Take the system prompt from this recipe and check leakage against its valid/test splits.")
@click.option("--against", multiple=True, type=click.Path(), help="Eval/test data no row may leak into: a file, or a folder (its valid and test splits).")
@click.option("--filter", "filters", multiple=True, metavar="SUITE:SCORER", help="Keep rows that pass this eval-suite scorer.")
@click.option("--judge", default=None, metavar="MODEL_OR_URL", help="LLM judge that scores each row 1-10.")
@click.option("--judge-model", default=None, help="Model name at the judge endpoint.")
@click.option("--judge-threshold", type=float, default=7.0, show_default=True, help="Lowest judge score kept.")
@click.option("--judge-template", type=click.Path(dir_okay=False), default=None, help="jinja2 rubric for the judge.")
@click.option("--temp", type=float, default=0.7, show_default=True, help="Teacher sampling temperature.")
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Longest teacher reply; a reply cut at this length is rejected.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-attempts", type=click.IntRange(min=1), default=None,
              help="Stop after this many teacher calls (default: 4 x N; answer mode: one per seed).")
@friendly
def synth(out, teacher, teacher_model, seeds, n, mode, template, system, recipe, against, filters, judge, judge_model,
          judge_threshold, judge_template, temp, top_p, max_tokens, seed, max_attempts):
    """Generate N training rows into OUT with a teacher; rerun the same command to continue."""
    from mlxft.data.synth import SynthOptions, run_synth  # lazy: CLI start-up
    from mlxft.data.teacher import TeacherSampling

    opts = SynthOptions(Path(seeds), n, Path(out), mode, Path(template) if template else None, system,
                        tuple(Path(p) for p in against), TeacherSampling(temp, top_p, max_tokens), seed, max_attempts)
    result = run_synth(opts, teacher, teacher_model, filters, judge, judge_model, judge_threshold, judge_template,
                       recipe, log=click.echo)
    click.echo(f"{result.kept} rows in {result.out}/synth.jsonl, {result.rejected} rejected (rejects.jsonl says why), "
               f"{result.attempts} attempts; manifest.json has the settings")
    if not result.complete:
        sys.exit(1)


# ---------------------------------------------------------------- mlxft baseline (prompting before training)


@main.command()
@click.argument("recipe", default="smollm2-135m")
@click.option("--suite", required=True, metavar="NAME", help="Eval suite in evals/ (or a .yaml path).")
@click.option("--shots", type=click.IntRange(min=0), default=3, show_default=True,
              help="Few-shot examples from the training split (0 = zero-shot only).")
@click.option("--seed", type=int, default=0, show_default=True, help="Which training examples are drawn.")
@click.option("--run", "run", default=None, metavar="RUN", help="Score this run's base and record into RUN/eval.json.")
@click.option("--model", default=None, help="Another base model than the recipe's.")
@click.option("--runs-dir", default=None, help="Where runs (and runs/baselines/) live (default: $MLXFT_RUNS or ./runs).")
@friendly
def baseline(recipe, suite, shots, seed, run, model, runs_dir):
    """Score RECIPE's base model zero-shot and few-shot on a suite: is fine-tuning needed at all?"""
    from mlxft.evaluation.baseline import format_baseline, resolve_target, run_baseline  # lazy: CLI start-up

    target = resolve_target(recipe, run, model, runs_dir)
    entry = run_baseline(target, suite, shots, seed, log=click.echo)
    click.echo(format_baseline(entry))
    click.echo(f"recorded in {target.baseline_path}" + (" and its eval.json" if target.run and
                                                       target.run.folder.eval_json.is_file() else ""))


if __name__ == "__main__":
    main()
