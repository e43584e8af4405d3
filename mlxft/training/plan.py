"""`mlxft plan RECIPE [--tier N] [--set k=v]`: predict a run's peak memory and speed before it starts.

Peak memory = base weights at their training precision + trainable parameters with their
gradients and AdamW state + saved activations of the trainable blocks (all of them, or with
gradient checkpointing each block's input plus one block's recomputation, or under mlx-lm's
checkpointing the share MLX keeps alive anyway) + per-token arrays outside the trainable blocks
(+ the chunked attention's transient chunks at long context on the CPU) + the logits at supervised
positions. Token counts come from the
recipe's data when it is on disk (the longest batch, after the shared prompt prefix is split
off, as training does); otherwise every row is assumed max_seq_length long.

The activation coefficients were fitted to mx.get_peak_memory on llama-shaped test models and on
SmolLM2-135M (see tests/training/test_plan.py and the README table); predictions are within 8% there.
`mlxft train` refuses a plan that does not fit, and `--auto-fit` changes the recipe until it does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxft.config import Recipe
from mlxft.data.encode import encode_rows, load_splits, load_tokenizer
from mlxft.doctor import matmul_gflops
from mlxft.errors import ConfigError
from mlxft.models import families
from mlxft.models.load import backend as current_backend
from mlxft.recipes import resolve_data_dir, usable_memory_bytes
from mlxft.training.batches import EpochBatches
from mlxft.training.fast.attention import chunk_rows as attention_chunk_rows
from mlxft.training.fast.fastexp import can_build_kernels
from mlxft.training.fast.paths import speed_paths
from mlxft.training.fast.prefix import PAD_MULTIPLE, batch_groups, row_groups
from mlxft.training.loss import logits_peak_bytes
from mlxft.training.shapes import Shape, shape_of

# Share of the budget a run may plan to use: the process itself, the OS and the allocator's
# cache need the rest.
HEADROOM = 0.9

# Activations per token per trainable block, in units of the activation dtype:
# ACT_D * hidden + ACT_F * intermediate + ACT_ATTN * heads * keys (+ LoRA's rank-sized pieces),
# plus OUTSIDE_D * hidden per token outside the trainable blocks (embeddings, the frozen blocks'
# transients, the final norm and the gathered hidden states). Fitted with non-negative
# coefficients to mx.get_peak_memory of 14 LoRA configurations: 5 llama-shaped test models
# (tests/training/test_plan.py) and 9 of SmolLM2-135M on its replay data (1-30 trainable blocks, batch
# 4-16, rank 8-32, shared prefix on/off, checkpointing); all within 8% (README). The hidden and
# intermediate sizes move together in these models, so the split between ACT_D and ACT_F (and
# OUTSIDE_D) is loose; their sum per token is what was measured.
ACT_D, ACT_F, ACT_ATTN = 0.09, 3.75, 2.83
OUTSIDE_D = 34.5
# The fused SwiGLU (CPU training, fastmath.py) keeps its two inputs, not the SiLU's output too.
FUSED_SWIGLU_SAVES = 1.0
# Under mlx-lm's gradient checkpointing MLX still keeps many blocks' full activations alive
# (it recomputes ahead): fitted 80% of the trainable blocks, never fewer than 2 blocks' worth.
# (mlxft checkpoints by blocks where the family allows: fast/blockwise.py, BLOCKWISE_BLOCKS below.)
CHECKPOINT_BLOCKS = 2.0
CHECKPOINT_SHARE = 0.8
# Long rows on the CPU run the attention in query chunks (fast/attention.py): per token it keeps
# ATTN_CHUNKED * heads * head_dim instead of ACT_ATTN * heads * keys, plus ATTN_CHUNKS chunks of
# scores in flight (MLX evaluates a few operations ahead). Checkpointing by blocks keeps every
# trainable block's input and BLOCKWISE_BLOCKS blocks' activations (the recomputed block and its
# backward). Fitted to SmolLM2-135M at 1024-4096 tokens and a Llama-3.2-1B-shaped model (README).
ATTN_CHUNKED = 7.0
ATTN_CHUNKS = 12
BLOCKWISE_BLOCKS = 3.0
# Short rows (attention in one piece) under checkpointing by blocks: the recomputed block's backward
# also holds this many fp32 score-sized arrays (scores, probabilities' and scores' gradients) beyond
# the saved ones. Fitted to the two such measurements (a d384 test model at 8 x 184 tokens, -15% without
# it; SmolLM2-135M's default recipe, -3%).
BLOCKWISE_SCORES = 3.0
# Achieved share of the measured matmul FLOP/s for a LoRA step on the CPU (bench/train_bench.py).
STEP_EFFICIENCY = 0.4


@dataclass
class Plan:
    recipe: str
    device: str
    budget_bytes: int
    weight_bytes: float
    trainable_bytes: float  # parameters + gradients + AdamW state
    activation_bytes: float
    logits_bytes: float
    peak_bytes: float
    tokens_per_step: int
    tokens_per_sec: float
    precision: str
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes * HEADROOM


def training_precision(shape: Shape, source: str, quantize: int | None, backend: str) -> tuple[float, int, str]:
    """(bytes per base weight, bytes per activation, label) as `models.load_base` will load the base."""
    gguf_like = source.startswith("builtin:") or source.endswith(".gguf")
    if backend == "cpu":  # load_base dequantizes quantized bases to fp32 on the CPU
        if gguf_like or shape.bits < 16 or shape.bits == 32:
            return 4.0, 4, "fp32"
        return 2.0, 2, "bf16"
    bits = quantize or (shape.bits if shape.bits < 16 else 0)
    if bits:  # packed weights + an fp16 scale and bias per group of 64
        return bits / 8 + 4 / 64, 2, f"{bits}-bit"
    return 2.0, 2, "bf16"


@dataclass
class Batch:
    rows: int  # rows that run through the blocks (the batch size)
    suffix: int  # tokens per row after the shared prefix (the whole row when none is shared)
    prefix: int  # shared prefix tokens, run once per batch
    supervised: int  # supervised positions in the batch
    indices: tuple[int, ...] = ()  # its rows in the training split, when read from data
    tokens: int = 0  # real (unpadded) tokens, the shared prefix counted per row, as training counts them
    prefixes: int = 1  # prefixes run (one per group of rows under one system prompt; `prefix` = the longest)

    @property
    def padded(self) -> int:
        return self.rows * self.suffix + self.prefixes * self.prefix if self.prefix else self.rows * self.suffix


def epoch_batches(recipe: Recipe, data_dir: Path | None, rows: list | None = None) -> tuple[list[Batch], str | None]:
    """The batches of training's first epoch, in its order, as the step runs them (shared prefix
    split off where it applies). `rows`: the training split already encoded (as `mlxft train`
    has it), else read from `data_dir`. Without readable data: one batch of max_seq_length rows,
    and a note saying so."""
    t = recipe.train
    worst = Batch(t.batch_size, t.max_seq_length, 0, t.batch_size * t.max_seq_length // 4, (),
                  t.batch_size * t.max_seq_length)
    if rows is None and (data_dir is None or not (Path(data_dir) / "train.jsonl").is_file()):
        return [worst], f"no data at {data_dir}: assumed every row is max_seq_length={t.max_seq_length} tokens"
    try:
        rows = rows if rows is not None else encoded_rows(recipe.model.source, str(data_dir), recipe.data.system_prompt,
                                                           t.max_seq_length)
    except Exception as error:  # an unreadable row is `mlxft data check`'s job to report
        return [worst], f"could not read {data_dir} ({error}): assumed max_seq_length rows"

    def part(batch, skips, index, prefixes=1):  # rows after their prefixes (skips: one per row; 0: full rows)
        S = max(len(e.ids) - 1 - k for e, k in zip(batch, skips))
        S = -(-S // PAD_MULTIPLE) * PAD_MULTIPLE if max(skips) else S
        return Batch(len(batch), S, max(skips), sum(int(e.mask[1:].sum()) for e in batch), index,
                     sum(len(e.ids) - 1 for e in batch), prefixes)

    paths = speed_paths(recipe)
    order = EpochBatches(rows, t, grouped=paths.grouped_batches).order(0)  # as training draws them
    order = order or [np.arange(min(len(rows), t.batch_size))]
    out = []
    for b in order:
        batch, index = [rows[i] for i in b], tuple(int(i) for i in b)
        groups = batch_groups(batch, several=not paths.packing) if paths.shared_prefix else None  # packing: one prefix
        _, skips = row_groups(groups or [], len(batch))  # a group per system prompt, each with its own prefix
        out.append(part(batch, skips, index, len(groups or ())))
    return out, None


def _longest(batches: list[Batch], note: str | None, data_dir) -> tuple[Batch, str]:
    best = max(batches, key=lambda b: b.padded)  # the first of equals, in training order
    return best, note or f"longest batch of {data_dir}: {best.rows} x {best.suffix} tokens" + prefix_note(best)


def prefix_note(b: Batch) -> str:
    if not b.prefix:
        return ""
    if b.prefixes > 1:
        return f" after {b.prefixes} group prefixes of up to {b.prefix} tokens"
    return f" after a shared {b.prefix}-token prefix"


@functools.lru_cache(maxsize=4)  # auto-fit re-plans the same data several times
def encoded_rows(source: str, data_dir: str, system_prompt: str | None, max_seq_length: int):
    """The train split of `data_dir` encoded as training encodes it (cached: the benches and auto-fit reuse it)."""
    tok, _ = load_tokenizer(source)
    split = load_splits(Path(data_dir), ("train",))["train"]
    return encode_rows(tok, split, system_prompt, max_seq_length)


def predict(recipe: Recipe, shape: Shape, batch: Batch, backend: str = "cpu", budget_bytes: int | None = None,
            matmul_flops: float | None = None, speed_batches: list[Batch] | None = None) -> Plan:
    """Peak memory of `recipe` on a model of `shape` for `batch` (the longest), and its speed over
    `speed_batches` (an epoch's batches; `batch` alone when not given)."""
    t, lora = recipe.train, recipe.lora
    w_bytes, a_bytes, label = training_precision(shape, recipe.model.source, recipe.quantize, backend)
    n_train = shape.layers if lora.num_layers == -1 else min(lora.num_layers, shape.layers)
    weights = shape.total_params() * w_bytes
    if recipe.fine_tune_type == "full":
        trainable = n_train * shape.block_params() * w_bytes * 4  # weights' grads + 2 AdamW moments (+ the update)
    else:
        trainable = n_train * _lora_params(shape, lora) * 4 * 4  # fp32 A/B, grads, 2 AdamW moments
    fused = backend == "cpu" and t.fast_silu and can_build_kernels()  # the fused kernels (fastmath, attention.py)
    kept, blocks = activation_bytes(recipe, shape, batch, n_train, a_bytes, fused)
    logits = logits_peak_bytes(batch.supervised, shape.vocab, fused=fused)  # one piece, or chunked
    activations = kept + blocks
    if blocks:  # checkpointing by blocks evaluates the blocks and the head apart: their peaks do not add up
        peak = weights + trainable + kept + max(blocks, logits)
    else:
        peak = weights + trainable + activations + logits
    tps = 0.0
    if matmul_flops:  # tokens over time, time = matmul FLOPs at the achieved share of the measured rate
        speed = speed_batches or [batch]
        work = sum(step_flops(shape, n_train, lora, b, t.grad_checkpoint) for b in speed)
        tps = sum(b.tokens or b.rows * (b.suffix + b.prefix) for b in speed) / (work / (matmul_flops * STEP_EFFICIENCY))
    return Plan(recipe.name, backend, budget_bytes or 0, weights, trainable, activations, logits, peak,
                batch.rows * (batch.suffix + batch.prefix) * t.grad_accumulation, tps, label)


def activation_bytes(recipe: Recipe, shape: Shape, batch: Batch, n_train: int, a_bytes: int, fused: bool) -> tuple[float, float]:
    """(activation memory that stays through the step, and what is alive only while the blocks run)
    at the step's peak: the trainable blocks' saved activations (all of them; with checkpointing by
    blocks each block's input, then one block's recomputation at a time; with mlx-lm's
    checkpointing the share MLX keeps alive), per-token arrays outside them, and on the CPU the
    chunked attention's transient chunks (long rows: its saved part is then linear in the tokens)."""
    t, D, F = recipe.train, shape.hidden, shape.inter * max(shape.active, 1)
    keys = batch.prefix + batch.suffix
    rows = attention_chunk_rows(batch.rows, shape.heads, batch.suffix, keys)
    chunked = fused and rows < batch.suffix
    attention = ATTN_CHUNKED * shape.heads * shape.hd if chunked else ACT_ATTN * shape.heads * keys
    act_f = ACT_F - FUSED_SWIGLU_SAVES if fused and recipe.model.family in families.SWIGLU else ACT_F
    per_token = ACT_D * D + act_f * F + attention + 4 * recipe.lora.rank * 7
    chunks = -(-batch.suffix // rows)  # chunks of fp32 scores in flight, never more than there are
    chunk = batch.rows * shape.heads * rows * keys * 4 if chunked else 0
    tokens = batch.padded * a_bytes
    transient = min(ATTN_CHUNKS, chunks) * chunk
    if speed_paths(recipe).blockwise:  # every block's input, then one block at a time (blockwise.py)
        scores = 0 if chunked else BLOCKWISE_SCORES * batch.rows * shape.heads * batch.suffix * keys * 4
        return n_train * D * tokens, BLOCKWISE_BLOCKS * per_token * tokens + transient + scores
    if t.grad_checkpoint:  # mlx-lm's mx.checkpoint per block
        kept = n_train * D + max(CHECKPOINT_BLOCKS, CHECKPOINT_SHARE * n_train) * per_token
    else:
        kept = n_train * per_token
    return (kept + OUTSIDE_D * D) * tokens + transient, 0.0


def _lora_params(shape: Shape, lora) -> int:
    D, hd = shape.hidden, shape.hd
    dims = {
        "q_proj": (D, shape.heads * hd), "k_proj": (D, shape.kv * hd), "v_proj": (D, shape.kv * hd),
        "o_proj": (shape.heads * hd, D), "gate_proj": (D, shape.inter), "up_proj": (D, shape.inter),
        "down_proj": (shape.inter, D), "qkv_proj": (D, (shape.heads + 2 * shape.kv) * hd),
        "gate_up_proj": (D, 2 * shape.inter),
    }
    total = 0
    for key in lora.targets:
        i, o = dims.get(key.rsplit(".", 1)[-1], (D, D))
        experts = shape.experts if key.startswith("mlp.switch_mlp") or ".experts" in key else 1
        total += lora.rank * (i + o) * experts
    return total


def step_flops(shape: Shape, n_train: int, lora, b: Batch, checkpoint: bool = False) -> float:
    """Matmul FLOPs (2*m*n*k) of one micro-batch as mlxft runs it: every block's forward over the
    suffix rows (padding included); in the trainable blocks also the shared prefix once, and the
    backward's input gradients (~1x the forward; 2x with checkpointing, which recomputes it) plus
    the LoRA weight gradients; the lm-head and its input gradient at supervised positions only."""
    if shape.experts:
        lin = shape.hidden * (shape.heads + shape.kv) * shape.hd * 2 + 3 * shape.hidden * shape.inter * shape.active
    else:
        lin = shape.block_params()
    adapter = _lora_params(shape, lora)

    def block(tokens, keys):  # forward of one block: `tokens` queries over `keys` keys each on average
        return 2 * tokens * (lin + adapter) + 4 * tokens * keys * shape.heads * shape.hd

    suffix = block(b.rows * b.suffix, b.prefix + b.suffix / 2)
    prefix = block(b.prefixes * b.prefix, b.prefix / 2)  # the groups' prefixes, padded to the longest
    trainable = (3 if checkpoint else 2) * (suffix + prefix)
    head = 4 * b.supervised * shape.hidden * shape.vocab
    return (shape.layers - n_train) * suffix + n_train * trainable + head


def plan_recipe(recipe: Recipe, data_dir: Path | None = None, budget_bytes: int | None = None,
                backend: str | None = None, measure_speed: bool = True, rows: list | None = None) -> Plan:
    """Plan `recipe` on this machine (or for `budget_bytes` / `backend` when given); `rows`: the
    training split already encoded."""
    backend = backend or current_backend()
    if budget_bytes is None:
        budget_bytes = budget_for(recipe)
    shape = shape_of(recipe.model.source)
    data_dir = resolve_data_dir(data_dir or recipe.data.path)
    batches, note = epoch_batches(recipe, data_dir, rows)
    batch, note = _longest(batches, note, data_dir)
    flops = None
    if measure_speed:
        flops = matmul_gflops(2048, repeats=3) * 1e9  # the size `mlxft doctor` and `make bench` measure: steadier than 1024
    plan = predict(recipe, shape, batch, backend, budget_bytes, flops, batches)
    plan.notes.append(note)
    return plan


def budget_for(recipe: Recipe) -> int:
    """The recipe's tier in bytes, never more than this machine can give a run (Metal working set or RAM)."""
    usable = usable_memory_bytes()
    return min(int(recipe.tier * 2**30), usable) if recipe.tier else usable


def check_fits(recipe: Recipe, data_dir, fit: bool, log, rows: list | None = None) -> Recipe:
    """`mlxft train`'s gate: refuse a run that will not fit, or (fit=True) change it until it does
    (`rows`: the training split already encoded)."""
    plan = plan_recipe(recipe, data_dir, measure_speed=False, rows=rows)
    if plan.fits:
        return recipe
    if not fit:
        raise ConfigError(refusal(plan))
    fitted, changes = auto_fit(recipe, data_dir, rows=rows)
    if not fitted.fits:
        raise ConfigError(f"--auto-fit could not make it fit (tried: {', '.join(changes) or 'nothing left to change'}); "
                          + refusal(fitted))
    log(f"auto-fit: predicted peak {gb(plan.peak_bytes)} > {gb(plan.budget_bytes * HEADROOM)}; changed "
        f"{'; '.join(changes)} -> predicted {gb(fitted.peak_bytes)}")
    return recipe


def auto_fit(recipe: Recipe, data_dir: Path | None = None, budget_bytes: int | None = None,
             backend: str | None = None, rows: list | None = None) -> tuple[Plan, list[str]]:
    """Shrink the batch (keeping batch x accumulation), then checkpoint, then quantize, until it fits;
    mutates `recipe`."""
    backend = backend or current_backend()
    t = recipe.train
    changes: list[str] = []
    plan = plan_recipe(recipe, data_dir, budget_bytes, backend, measure_speed=False, rows=rows)
    while not plan.fits:
        if t.batch_size > 1:
            t.batch_size, t.grad_accumulation = t.batch_size // 2, t.grad_accumulation * 2
            changes.append(f"train.batch_size={t.batch_size} with train.grad_accumulation={t.grad_accumulation}")
        elif not t.grad_checkpoint:
            t.grad_checkpoint = True
            changes.append("train.grad_checkpoint=true")
        elif backend != "cpu" and recipe.quantize != 4:  # on the CPU the base is dequantized anyway
            recipe.quantize = 4
            changes.append("quantize=4 (QLoRA on a 4-bit base)")
        else:
            break
        plan = plan_recipe(recipe, data_dir, budget_bytes, backend, measure_speed=False, rows=rows)
    return plan, changes


def refusal(plan: Plan) -> str:
    """The message `mlxft train` refuses with when the plan does not fit."""
    return (
        f"this run needs ~{gb(plan.peak_bytes)} at its peak but the budget is {gb(plan.budget_bytes * HEADROOM)} "
        f"({HEADROOM:.0%} of {gb(plan.budget_bytes)}): lower train.batch_size (raise train.grad_accumulation to keep "
        "the effective batch), set train.grad_checkpoint=true, lower train.max_seq_length or lora.num_layers, "
        "set quantize=4 on a GPU, or rerun with --auto-fit; details: mlxft plan " + plan.recipe
    )


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def format_plan(plan: Plan) -> str:
    rows = [
        ("base weights", f"{gb(plan.weight_bytes)} ({plan.precision})"),
        ("trainable + grads + AdamW", gb(plan.trainable_bytes)),
        ("activations", gb(plan.activation_bytes)),
        ("logits (supervised positions)", gb(plan.logits_bytes)),
        ("predicted peak", gb(plan.peak_bytes)),
        ("budget", f"{gb(plan.budget_bytes)} on {plan.device} (plans may use {HEADROOM:.0%})"),
        ("fits", "yes" if plan.fits else "NO"),
        ("tokens per optimizer step", str(plan.tokens_per_step)),
    ]
    if plan.tokens_per_sec:
        rows.append(("expected speed", f"~{plan.tokens_per_sec:.0f} tokens/s over an epoch's batches (measured matmul x {STEP_EFFICIENCY:.0%})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"{k:<{width}}  {v}" for k, v in rows] + [f"note: {n}" for n in plan.notes])
