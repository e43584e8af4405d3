"""gotemplate: Go text/template as Ollama runs it, held against Ollama's own templates and expected prompts."""

from pathlib import Path

import pytest

from mlxft.export.gotemplate import TemplateError, render
from mlxft.export.modelfile import ollama_values

OLLAMA = Path(__file__).resolve().parents[1] / "fixtures" / "ollama"
CASES = {  # Ollama's template tests: the same three chats for every template
    "user": [{"role": "user", "content": "Hello, how are you?"}],
    "user-assistant-user": [{"role": "user", "content": "Hello, how are you?"},
                            {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
                            {"role": "user", "content": "I'd like to show off how chat templating works!"}],
}
CASES["system-user-assistant-user"] = [{"role": "system", "content": "You are a helpful assistant."},
                                       *CASES["user-assistant-user"]]


@pytest.mark.parametrize("template", ["chatml.gotmpl", "llama3-instruct.gotmpl", "gemma3-instruct.gotmpl"])
@pytest.mark.parametrize("case", list(CASES))
def test_renders_ollamas_builtin_templates_as_ollama_does(template, case):
    source = (OLLAMA / template).read_text()
    expected = (OLLAMA / f"{template}.out" / case).read_text()
    assert render(source, ollama_values(CASES[case], None)) == expected


def test_trim_markers_variables_and_else_if():
    source = ('{{- $n := len .Items }}{{ range $i, $x := .Items }}{{ if eq $i 0 }}first{{ else if eq $i 1 }}second'
              '{{ else }}other{{ end }}:{{ $x }}/{{ $n }} {{- end }}\n  {{- if not .Missing }} none{{ end }}')
    assert render(source, {"Items": ["a", "b", "c"]}) == "first:a/3second:b/3other:c/3 none"
    assert render('{{ if and .A (or .B .C) }}yes{{ else }}no{{ end }}', {"A": 1, "C": "x"}) == "yes"


def test_unknown_syntax_is_a_template_error():
    with pytest.raises(TemplateError):
        render("{{ if .A }}open", {})
    with pytest.raises(TemplateError):
        render("{{ printf \"%s\" .A }}", {"A": 1})
