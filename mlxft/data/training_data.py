"""A training run's data, read, checked and encoded once.

`mlxft train` needs the dataset three ways before step 1: `mlxft data check`'s findings (refuse
on errors), the memory plan's batches, and the encoded rows the loop trains on. All three use
this one object: the files are read once, the tokenizer loaded once, and every row tokenized once
(the check's encodings are kept and truncated to max_seq_length for training).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlxft.config import Recipe
from mlxft.data.check import Report, check_dataset
from mlxft.data.encode import Encoded, encode_rows, load_tokenizer
from mlxft.data.formats import Dataset, Example, load_dataset
from mlxft.errors import DataError

SPLITS = ("train", "valid")  # what training reads; test is for evaluation


@dataclass
class TrainingData:
    path: Path
    dataset: Dataset
    tokenizer: object
    default_template: bool  # the base has no chat template: mlxft's ChatML default is used
    report: Report
    encodings: dict[str, Encoded] = field(default_factory=dict)  # row location -> full encoding

    def examples(self, split: str) -> list[Example]:
        return self.dataset.splits.get(split, [])

    def encoded(self, split: str, system_prompt: str | None, max_length: int | None) -> list[Encoded]:
        """The split's rows as token ids and loss masks, cut at `max_length` tokens."""
        examples = self.examples(split)
        missing = [i for i, ex in enumerate(examples) if ex.where not in self.encodings]
        if missing:  # the check's token counts came from its cache: tokenize these here, once
            fresh = encode_rows(self.tokenizer, [examples[i].row for i in missing], system_prompt, None)
            self.encodings.update((examples[i].where, enc) for i, enc in zip(missing, fresh))
        out = []
        for ex in examples:
            enc = self.encodings[ex.where]
            out.append(enc if max_length is None or len(enc.ids) <= max_length
                       else Encoded(enc.ids[:max_length], enc.mask[:max_length]))
        return out


def load_training_data(recipe: Recipe, data_dir: Path, log: Callable) -> TrainingData:
    """Read and check the dataset in `data_dir` (as `mlxft data check` does) before any weights
    load; refuse to train on errors."""
    tokenizer, default_template = load_tokenizer(recipe.model.source)
    dataset = load_dataset(Path(data_dir))
    encodings: dict[str, Encoded] = {}
    report = check_dataset(dataset, data_dir, recipe, tokenizer, required_splits=SPLITS, keep=encodings)
    if not report.ok:
        raise DataError(
            f"{report.errors[0]} ({len(report.errors)} error(s); nothing trained; see: mlxft data check {data_dir})"
        )
    if report.warnings:
        log(f"data check: {len(report.warnings)} warning(s); see: mlxft data check {data_dir}")
    return TrainingData(Path(data_dir), dataset, tokenizer, default_template, report, encodings)
