"""Ollama Modelfiles that build the prompt the run was trained on.

Ollama formats chats with a Go template (TEMPLATE), not the model's Jinja chat template.
Each family below (ChatML, Llama 3, Gemma) has a TEMPLATE written for Ollama's data
(``.Messages`` with the Modelfile's SYSTEM prepended as a system message when a request has
none, ``.System`` = the system text) and the stop words that end a turn. Before a Modelfile is
written, the family's TEMPLATE is rendered (mlxft.export.gotemplate) on the check prompts and tokenized
as llama.cpp does (BOS added when the GGUF says so); its ids must equal the ids training used.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxft.data.encode import prompt_ids
from mlxft.export.check import ExportError
from mlxft.export.gotemplate import render


@dataclass(frozen=True)
class OllamaFamily:
    name: str
    template: str  # Go template over Ollama's .Messages / .System
    stop: tuple[str, ...]  # PARAMETER stop: the strings that open or close a turn


CHATML = OllamaFamily("chatml", (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"), ("<|im_start|>", "<|im_end|>"))
LLAMA3 = OllamaFamily("llama3", (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>\n"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
# Gemma has no system role: the system text opens the first user turn (as Gemma's own template does).
GEMMA = OllamaFamily("gemma", (
    "{{- range $i, $_ := .Messages }}\n"
    "{{- if eq .Role \"user\" }}<start_of_turn>user\n"
    "{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
    "{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n"
    "{{ .Content }}<end_of_turn>\n"
    "{{ end }}\n"
    "{{- end }}<start_of_turn>model\n"), ("<start_of_turn>", "<end_of_turn>"))
FAMILIES = (CHATML, LLAMA3, GEMMA)

# A multi-turn probe beside the check prompts, so an assistant turn in the history is covered too.
PROBE = [{"role": "user", "content": "Hello, how are you?"},
         {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
         {"role": "user", "content": "I'd like to show off how chat templating works!"}]


def ollama_values(messages: list[dict], system: str | None) -> dict:
    """What Ollama hands the TEMPLATE for a chat request: SYSTEM prepended when the chat has no system
    message, ``.System`` the system messages joined by blank lines."""
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    return {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
            "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
            "Tools": None, "Response": ""}


def ollama_prompt_ids(family: OllamaFamily, tokenizer, messages: list[dict], system: str | None,
                      bos_id: int | None) -> list[int]:
    """The ids Ollama's llama.cpp runner feeds the model: the rendered TEMPLATE, BOS first when the GGUF adds one."""
    text = render(family.template, ollama_values(messages, system))
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return ([bos_id] if bos_id is not None else []) + ids


def choose_family(tokenizer, conversations: list[list[dict]], expected: list[list[int]], system: str | None,
                  bos_id: int | None) -> OllamaFamily:
    """The family whose TEMPLATE reproduces the training ids on every check prompt and the probe."""
    convs = [*conversations, PROBE]
    want = [*expected, prompt_ids(tokenizer, PROBE, system)]
    mismatches = []
    for family in FAMILIES:
        got = [ollama_prompt_ids(family, tokenizer, c, system, bos_id) for c in convs]
        if got == want:
            return family
        first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        mismatches.append(f"{family.name}: {tokenizer.decode(got[first])[:60]!r}")
    raise ExportError("the run's chat template is none of the Ollama families mlxft writes (ChatML, Llama 3, "
                      f"Gemma); first prompt each renders: {'; '.join(mismatches)}; training renders "
                      f"{tokenizer.decode(want[0])[:60]!r}. Export --to gguf and write the TEMPLATE yourself")


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise ExportError(f'the {what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile_text(family: OllamaFamily, model_file: str, system: str | None, adapter_file: str | None = None,
                   header: str = "") -> str:
    """The Modelfile: FROM (and ADAPTER), TEMPLATE, SYSTEM, stop words, greedy decoding as eval used."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines.append(f"FROM ./{model_file}")
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    lines.append(f"TEMPLATE {_quoted(family.template, 'template')}")
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt')}")
    lines += [f'PARAMETER stop "{stop}"' for stop in family.stop]
    lines += ["# greedy decoding, as mlxft eval scored the adapter", "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"
