"""Preference pairs (prompt, chosen answer, rejected answer) as token ids, for DPO/ORPO and pair scoring.

Only the answer (the turns after the prompt's last user message) is supervised; the prompt is
context. mlxft.data.formats stores a pair as {"messages": prompt + chosen, "rejected": [...]}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mlxft.data.encode import Encoded, Rendered, encode_rendered, render_row
from mlxft.data.formats import Example, load_dataset
from mlxft.errors import DataError


@dataclass
class Pair:
    """One preference pair as token ids; masks cover the answer only (not the prompt)."""

    chosen: Encoded
    rejected: Encoded
    where: str = ""
    # The reference model's summed log-probs of each answer (DPO only; NaN until computed).
    ref_chosen: float = math.nan
    ref_rejected: float = math.nan

    @property
    def length(self) -> int:
        return len(self.chosen.ids) + len(self.rejected.ids)


def split_pair(row: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) messages of a normalised preference row.

    The prompt runs through the last user message; the chosen answer is what follows it.
    """
    messages, rejected = row["messages"], row.get("rejected")
    if not rejected:
        raise DataError("not a preference pair: no rejected answer")
    if isinstance(rejected, str):  # a chat row may carry its rejected answer as plain text
        rejected = [{"role": "assistant", "content": rejected}]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    cut = users[-1] + 1 if users else len(messages) - 1
    return messages[:cut], messages[cut:], rejected


def render_pair(tokenizer, row: dict, system_prompt: str | None) -> tuple[Rendered, Rendered]:
    """Render prompt+chosen and prompt+rejected; only the answers' assistant turns are supervised."""
    prompt, chosen, rejected = split_pair(row)
    n_prompt_turns = sum(m["role"] == "assistant" for m in prompt)
    out = []
    for answer in (chosen, rejected):
        sub = {"messages": prompt + answer, **({"tools": row["tools"]} if row.get("tools") else {})}
        r = render_row(tokenizer, sub, system_prompt)
        r.turns = r.turns[n_prompt_turns:]  # assistant turns inside the prompt are context, not compared
        out.append(r)
    return out[0], out[1]


def encode_pairs(tokenizer, rows: list[dict], system_prompt: str | None, max_length: int | None,
                 where: list[str] | None = None) -> list[Pair]:
    """Token ids and answer masks of each pair, tokenized in one batch."""
    where = where or [f"row {i + 1}" for i in range(len(rows))]
    rendered: list[Rendered] = []
    for row, loc in zip(rows, where):
        try:
            rendered += render_pair(tokenizer, row, system_prompt)
        except DataError as e:
            raise DataError(f"{loc}: {e}") from None
    encoded = encode_rendered(tokenizer, rendered, max_length)
    pairs = []
    for i, loc in enumerate(where):
        chosen, rejected = encoded[2 * i], encoded[2 * i + 1]
        if not chosen.mask.any() or not rejected.mask.any():
            raise DataError(f"{loc}: the prompt fills max_seq_length={max_length} tokens, so nothing of the "
                            "chosen or rejected answer is left to compare; raise train.max_seq_length or shorten it")
        pairs.append(Pair(chosen, rejected, loc))
    return pairs


def require_pairs(examples: dict[str, list[Example]], method: str) -> None:
    """Every row of the given splits must be a pair; say which is not."""
    for split, rows in examples.items():
        missing = [ex.where for ex in rows if "rejected" not in ex.row]
        if missing:
            raise DataError(
                f"{missing[0]}: train.method={method} trains on preference pairs (prompt + chosen + rejected), "
                f"but this row has no rejected answer ({len(missing)} such row(s) in {split}); "
                "use train.method=sft for plain chat data"
            )


def read_pair_rows(path: Path) -> list[dict]:
    """Normalised preference rows of a file (any format mlxft reads); DataError names file:line."""
    ds = load_dataset(Path(path))
    errors = [p for p in ds.problems if p.severity == "error"]
    if errors:
        raise DataError(str(errors[0]))
    rows = [ex for split in ds.splits.values() for ex in split]
    missing = [ex.where for ex in rows if "rejected" not in ex.row]
    if missing or not rows:
        raise DataError(f"{missing[0] if missing else path}: expected preference pairs (prompt + chosen + rejected)")
    return [ex.row for ex in rows]
