"""A small interpreter of Go's text/template, the language of Ollama's Modelfile TEMPLATE.

It covers what chat templates use: text, ``{{- -}}`` trimming, fields (``.Role``, ``$.Messages``),
variables (``$i``, ``$last := ...``), ``if / else if / else / end``, ``range`` (with ``$i, $x :=``),
parenthesised calls and the builtins ``eq ne and or not len slice``. Missing keys read as empty,
as Ollama parses templates with ``missingkey=zero``. mlxft renders a Modelfile TEMPLATE with it to
prove, before writing the Modelfile, that Ollama will build the prompt the run was trained on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mlxft.errors import MlxftError

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|`[^`]*`|:=|=|,|[^\s(),]+)')


class TemplateError(MlxftError):
    """A template this interpreter cannot parse or run."""


@dataclass
class _Node:
    kind: str  # text | expr | if | range | assign
    value: object = None  # text, or the parsed pipeline
    names: list[str] = field(default_factory=list)  # range / assign variables
    body: list = field(default_factory=list)
    orelse: list = field(default_factory=list)


def _lex(source: str) -> list[tuple[str, str]]:
    """[('text', ...), ('action', ...)] with Go's trim markers applied to the neighbouring text."""
    parts, pos, trim_next = [], 0, False
    for match in _ACTION.finditer(source):
        text = source[pos:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        parts.append(("text", text))
        parts.append(("action", match.group(2).strip()))
        trim_next, pos = bool(match.group(3)), match.end()
    tail = source[pos:]
    parts.append(("text", tail.lstrip() if trim_next else tail))
    return [p for p in parts if p != ("text", "")]


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text.rstrip()):
        match = _TOKEN.match(text, pos)
        if not match:
            raise TemplateError(f"cannot read {text[pos:]!r}")
        out.append(match.group(1))
        pos = match.end()
    return out


def _parse_pipeline(tokens: list[str]) -> list:
    """A command: [operand] or [function, args...]; parentheses nest commands."""
    stack: list[list] = [[]]
    for tok in tokens:
        if tok == "(":
            stack.append([])
        elif tok == ")":
            inner = stack.pop()
            stack[-1].append(("call", inner))
        else:
            stack[-1].append(tok)
    if len(stack) != 1:
        raise TemplateError(f"unbalanced parentheses in {' '.join(tokens)}")
    return stack[0]


def parse(source: str) -> list[_Node]:
    """Parse a template into nodes; TemplateError on what this interpreter does not know."""
    root: list[_Node] = []
    stack: list[tuple[_Node | None, list]] = [(None, root)]
    for kind, text in _lex(source):
        body = stack[-1][1]
        if kind == "text":
            body.append(_Node("text", text))
            continue
        if text.startswith("/*"):
            continue
        tokens = _tokens(text)
        head = tokens[0] if tokens else ""
        if head == "if":
            node = _Node("if", _parse_pipeline(tokens[1:]))
            body.append(node)
            stack.append((node, node.body))
        elif head == "range":
            names, rest = [], tokens[1:]
            if ":=" in rest:
                split = rest.index(":=")
                names, rest = [t for t in rest[:split] if t != ","], rest[split + 1:]
            node = _Node("range", _parse_pipeline(rest), names)
            body.append(node)
            stack.append((node, node.body))
        elif head == "else":
            node = stack.pop()[0]
            if node is None:
                raise TemplateError("else without if")
            stack.append((node, node.orelse))
            if tokens[1:2] == ["if"]:  # else if: a nested if in the else branch, closed by the same end
                nested = _Node("if", _parse_pipeline(tokens[2:]), ["elif"])
                node.orelse.append(nested)
                stack.append((nested, nested.body))
        elif head == "end":
            while True:
                node = stack.pop()[0]
                if node is None:
                    raise TemplateError("end without if/range")
                if "elif" not in node.names:
                    break
        elif len(tokens) > 2 and tokens[0].startswith("$") and tokens[1] in (":=", "="):
            body.append(_Node("assign", _parse_pipeline(tokens[2:]), [tokens[0]]))
        else:
            body.append(_Node("expr", _parse_pipeline(tokens)))
    if len(stack) != 1:
        raise TemplateError("missing {{ end }}")
    return root


def _empty(value) -> bool:
    return value is None or value is False or value == 0 or (hasattr(value, "__len__") and len(value) == 0)


def _field(value, path: list[str]):
    for name in path:
        value = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
    return value


_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": _empty,
    "len": len,
    "slice": lambda seq, *ix: seq[ix[0]:ix[1]] if len(ix) > 1 else seq[ix[0]:] if ix else seq,
}


class _Scope:
    def __init__(self, root, dot, variables):
        self.root, self.dot, self.vars = root, dot, variables

    def operand(self, tok):
        if isinstance(tok, tuple):
            return self.command(tok[1])
        if tok.startswith('"'):
            return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
        if tok.startswith("`"):
            return tok[1:-1]
        if re.fullmatch(r"-?\d+", tok):
            return int(tok)
        if tok in ("true", "false"):
            return tok == "true"
        if tok == ".":
            return self.dot
        if tok.startswith("."):
            return _field(self.dot, tok[1:].split("."))
        if tok.startswith("$"):
            name, _, rest = tok.partition(".")
            value = self.root if name == "$" else self.vars.get(name)
            if name != "$" and name not in self.vars:
                raise TemplateError(f"undefined variable {name}")
            return _field(value, rest.split(".")) if rest else value
        raise TemplateError(f"unknown function or value {tok!r}")

    def command(self, cmd: list):
        head = cmd[0]
        if isinstance(head, str) and head in ("and", "or"):
            values = [self.operand(t) for t in cmd[1:]]
            pick = next((v for v in values if _empty(v) == (head == "and")), values[-1])
            return pick
        if isinstance(head, str) and head in _FUNCS:
            return _FUNCS[head](*[self.operand(t) for t in cmd[1:]])
        if len(cmd) != 1:
            raise TemplateError(f"cannot call {head!r}")
        return self.operand(head)


def _run(nodes: list[_Node], scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.value)
        elif node.kind == "expr":
            value = scope.command(node.value)
            out.append("" if value is None else str(value).lower() if isinstance(value, bool) else str(value))
        elif node.kind == "assign":
            scope.vars[node.names[0]] = scope.command(node.value)
        elif node.kind == "if":
            _run(node.body if not _empty(scope.command(node.value)) else node.orelse, scope, out)
        elif node.kind == "range":
            items = scope.command(node.value) or []
            for i, item in enumerate(items):
                inner = _Scope(scope.root, item, dict(scope.vars))
                if len(node.names) == 2:
                    inner.vars[node.names[0]], inner.vars[node.names[1]] = i, item
                elif node.names:
                    inner.vars[node.names[0]] = item
                _run(node.body, inner, out)
            if not items:
                _run(node.orelse, scope, out)


def render(source: str, data: dict) -> str:
    """Render a Go template with ``data`` (dicts for structs: {'Messages': [{'Role': .., 'Content': ..}]})."""
    out: list[str] = []
    _run(parse(source), _Scope(data, data, {}), out)
    return "".join(out)
