"""A plain reference for SentencePiece-BPE tokenization, as llama.cpp's SPM tokenizer does it.

Written from the algorithm, not from mlxft.models.gguf, so tests can compare the tokenizer.json the
importer builds against it: control and user-defined pieces match whole on the raw text; in
between, spaces become U+2581, each character starts as a symbol, and the adjacent pair whose
joined text is the highest-scoring normal vocabulary piece is joined (leftmost on a tie) until
no pair joins; symbols not in the vocabulary become <0xXX> byte pieces.
"""

from __future__ import annotations

import re

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def spm_encode(text: str, tokens: list[str], scores: list[float], types: list[int],
               bos_id: int | None = None) -> list[int]:
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = {t: s for t, s, k in zip(tokens, scores, types) if k == NORMAL}
    whole = sorted((t for t, k in zip(tokens, types) if k in (CONTROL, USER_DEFINED)), key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(t) for t in whole)) if whole else None
    ids = [] if bos_id is None else [bos_id]
    pos = 0
    for match in [*(pattern.finditer(text) if pattern else []), None]:
        segment = text[pos:match.start()] if match else text[pos:]
        if segment:
            ids += _merge(segment.replace(" ", "\u2581"), vocab, normal)
        if match:
            ids.append(vocab[match.group()])
            pos = match.end()
    return ids


def _merge(segment: str, vocab: dict[str, int], normal: dict[str, float]) -> list[int]:
    symbols = list(segment)
    while True:
        best = None
        for i in range(len(symbols) - 1):
            score = normal.get(symbols[i] + symbols[i + 1])
            if score is not None and (best is None or score > best[0]):
                best = (score, i)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    ids = []
    for symbol in symbols:
        if symbol in vocab:
            ids.append(vocab[symbol])
        else:
            ids += [vocab[f"<0x{b:02X}>"] for b in symbol.encode("utf-8")]
    return ids
