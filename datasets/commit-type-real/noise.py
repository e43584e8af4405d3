"""Label noise in mined commit subjects: how often near-identical subjects carry different labels
in different repositories, and the score a perfect per-subject majority vote would get on the
test split (the ceiling beside the adapter's score). Used by mine.py; standard library only.

Two notions of "the same subject":
- `exact`: mine.subject_key (case, punctuation, versions, numbers and articles ignored);
- `near`: `near_key` below, the set of content words after dropping identifiers (backticked
  code, paths, package names with / @ . _ or digits) and common endings, so "update deps" and
  "Updated dependencies for `foo`" ... meet.

The majority vote sees every mined occurrence of a subject (all repositories, before dedup and
balancing) and answers its most common label; a test row scores 1 when its label is that
majority, 1/k when k labels tie, 0 otherwise. A subject seen once is always "right", so the
ceiling only charges the disagreement that can be observed.
"""

from __future__ import annotations

import collections
import math
import re

STOP = {"a", "an", "the", "to", "of", "in", "on", "for", "and", "or", "with", "from", "by", "at", "as", "is",
        "be", "it", "its", "this", "that", "into", "when", "not", "no", "use", "using", "some", "all"}
CODE = re.compile(r"`[^`]*`")
IDENTIFIER = re.compile(r"\S*[\d/@._]\S*")


def near_key(text: str) -> str:
    """Sorted content words, identifiers removed, crudely stemmed."""
    text = IDENTIFIER.sub(" ", CODE.sub(" ", text.lower()))
    words = set()
    for w in re.sub(r"[^a-z]+", " ", text).split():
        if w in STOP:
            continue
        words.add(_stem(w))
    return " ".join(sorted(words))


def _stem(word: str) -> str:
    """A crude stemmer: dependencies/dependency, updated/updates/update meet."""
    if word.endswith("ies") and len(word) > 5:
        return word[:-3] + "y"
    for end in ("ing", "ed", "es", "s"):
        if len(word) > len(end) + 3 and word.endswith(end):
            word = word[: -len(end)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 4 else word


def _groups(pool, key_fn) -> dict[str, list]:
    groups = collections.defaultdict(list)
    for c in pool:
        groups[key_fn(c.text)].append(c)
    return groups


def cross_repo(groups: dict[str, list]) -> dict:
    """Subjects that occur in 2+ repositories: how often the repositories' labels for them differ."""
    shared = disagree = rows = off_majority = 0
    pairs: collections.Counter = collections.Counter()
    for members in groups.values():
        by_repo = collections.defaultdict(collections.Counter)
        for c in members:
            by_repo[c.repo][c.label] += 1
        if len(by_repo) < 2:
            continue
        shared += 1
        repo_labels = {votes.most_common(1)[0][0] for votes in by_repo.values()}
        if len(repo_labels) > 1:
            disagree += 1
            pairs.update(["/".join(sorted(p)) for p in _pairs(sorted(repo_labels))])
        votes = collections.Counter(c.label for c in members)
        rows += len(members)
        off_majority += len(members) - votes.most_common(1)[0][1]
    return {"subjects_in_2plus_repos": shared, "of_which_labels_differ": disagree,
            "share_differing": round(disagree / shared, 4) if shared else None,
            "rows_in_those_subjects": rows, "rows_off_their_majority": off_majority,
            "share_rows_off_majority": round(off_majority / rows, 4) if rows else None,
            "most_common_disagreements": dict(pairs.most_common(8))}


def _pairs(labels):
    return [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]


def ceiling(groups: dict[str, list], test, key_fn) -> dict:
    """Per-subject majority vote on the test rows (1/k credit for a k-way tie)."""
    score = matched = matched_score = 0.0
    for row in test:
        members = groups.get(key_fn(row.text), [])
        votes = collections.Counter(c.label for c in members) or collections.Counter([row.label])
        top = max(votes.values())
        winners = [lab for lab, n in votes.items() if n == top]
        credit = 1 / len(winners) if row.label in winners else 0.0
        score += credit
        if any(c.repo != row.repo for c in members):
            matched += 1
            matched_score += credit
    return {"ceiling": round(score / len(test), 4),
            "test_rows_seen_in_other_repos": int(matched),
            "majority_vote_on_those": round(matched_score / matched, 4) if matched else None}


def naive_bayes(train, test, labels) -> float:
    """Exact match of a bag-of-words multinomial Naive Bayes (add-one) trained on train, on test."""
    counts = {lab: collections.Counter() for lab in labels}
    prior = collections.Counter(c.label for c in train)
    for c in train:
        counts[c.label].update(_words(c.text))
    vocab = set().union(*counts.values())
    totals = {lab: sum(counts[lab].values()) for lab in labels}
    right = 0
    for c in test:
        def logp(lab):
            return math.log(prior[lab] + 1) + sum(math.log((counts[lab][w] + 1) / (totals[lab] + len(vocab)))
                                                  for w in _words(c.text))
        right += max(labels, key=logp) == c.label
    return round(right / len(test), 4)


def reader_agreement(rows, reader: dict[str, str], labels) -> dict:
    """How often a careful reader who saw only the subject (reader-labels.jsonl, labelled blind,
    before looking at the authors' labels) chose the authors' label: a practical ceiling."""
    seen = [c for c in rows if c.text in reader]
    per_label = {lab: [0, 0] for lab in labels}
    for c in seen:
        per_label[c.label][0] += reader[c.text] == c.label
        per_label[c.label][1] += 1
    right = sum(n for n, _ in per_label.values())
    return {"rows": len(seen), "of": len(rows), "agreement": round(right / len(seen), 4) if seen else None,
            "per_label": {lab: f"{n}/{total}" for lab, (n, total) in per_label.items()}}


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def measure(pool, test, subject_key, labels, train=None, reader=None, valid=None) -> dict:
    """The label-noise report mine.py writes into manifest.json."""
    report = {}
    for name, key_fn in (("exact", subject_key), ("near", near_key)):
        groups = _groups(pool, key_fn)
        report[name] = {"cross_repo": cross_repo(groups), "test": ceiling(groups, test, key_fn)}
    if train is not None:
        report["naive_bayes_train_to_test"] = naive_bayes(train, test, labels)
    if reader:
        report["reader"] = {"test": reader_agreement(test, reader, labels)}
        if valid is not None:
            report["reader"]["valid"] = reader_agreement(valid, reader, labels)
    return report
