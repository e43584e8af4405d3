"""modelfile: each family's TEMPLATE renders what Ollama's own template renders, and what training rendered."""

import json
from pathlib import Path

import pytest
from test_gotemplate import CASES, OLLAMA

from mlxft.export.check import ExportError
from mlxft.models.gguf_families import GEMMA_CHAT_TEMPLATE
from mlxft.export.gotemplate import render
from mlxft.export.modelfile import CHATML, GEMMA, LLAMA3, choose_family, modelfile_text, ollama_values

# Meta's Llama 3 turn format, as a Jinja chat template (BOS from the template text).
LLAMA3_JINJA = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
                " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_JINJA = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = {"chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            "gemma": ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]}


@pytest.mark.parametrize("family,ollama", [(CHATML, "chatml.gotmpl"), (LLAMA3, "llama3-instruct.gotmpl"),
                                           (GEMMA, "gemma3-instruct.gotmpl")])
@pytest.mark.parametrize("case", list(CASES))
def test_our_templates_render_what_ollamas_builtin_ones_do(family, ollama, case):
    expected = (OLLAMA / f"{ollama}.out" / case).read_text()
    if family is GEMMA:  # Ollama's gemma3 template ends with one more newline than Gemma's own format
        expected = expected.removesuffix("\n")
    assert render(family.template, ollama_values(CASES[case], None)) == expected


def tokenizer(tmp_path: Path, kind: str, template: str):
    """A byte-level BPE tokenizer with the family's special tokens, loaded as training loads one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS[kind])
    bos = SPECIALS[kind][0]
    return TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=SPECIALS[kind][-1],
                                                    chat_template=template))


CHATS = [[{"role": "system", "content": "Label the commit."}, {"role": "user", "content": "fix typo"}],
         [{"role": "user", "content": "add a flag"}]]


@pytest.mark.parametrize("kind,template,family,adds_bos", [
    ("chatml", CHATML_JINJA, CHATML, False), ("llama3", LLAMA3_JINJA, LLAMA3, True),
    ("gemma", GEMMA_CHAT_TEMPLATE, GEMMA, True)])
def test_the_family_is_the_one_whose_ids_equal_trainings(tmp_path, kind, template, family, adds_bos):
    from mlxft.data.encode import prompt_ids

    tok = tokenizer(tmp_path, kind, template)
    system = "Label the commit."
    expected = [prompt_ids(tok, c, system) for c in CHATS]
    asked = [[m for m in c if m["role"] != "system"] for c in CHATS]  # SYSTEM comes from the Modelfile
    bos = tok.bos_token_id if adds_bos else None
    assert choose_family(tok, asked, expected, system, bos) is family


def test_a_template_no_family_reproduces_is_refused(tmp_path):
    from mlxft.data.encode import prompt_ids

    odd = CHATML_JINJA.replace("'\n' + m['content']", "': ' + m['content']")
    tok = tokenizer(tmp_path, "chatml", odd)
    expected = [prompt_ids(tok, c) for c in CHATS]
    with pytest.raises(ExportError, match="none of the Ollama families"):
        choose_family(tok, CHATS, expected, None, None)


def test_modelfile_has_from_adapter_template_system_and_stops():
    text = modelfile_text(CHATML, "base.F16.gguf", "Label the commit.", "run.lora.gguf", header="made by mlxft")
    assert text.startswith("# made by mlxft\nFROM ./base.F16.gguf\nADAPTER ./run.lora.gguf\n")
    assert f'TEMPLATE """{CHATML.template}"""' in text and 'SYSTEM """Label the commit."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0\n" in text
    with pytest.raises(ExportError, match='"""'):
        modelfile_text(CHATML, "m.gguf", 'say """ hi')
    assert json.dumps(text)  # plain text, no surprises
