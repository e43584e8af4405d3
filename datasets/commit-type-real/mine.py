"""Mine real conventional-commit subjects into the commit-type task, split by repository.

Run it from the repository root, with git mirrors of the repositories in REPOS (for example
those the project's `fetch` tool brings, laid out as MIRRORS/<owner>+<name>/repo):

    python datasets/commit-type-real/mine.py --mirrors /work/.mirror [--seed 0] [--out datasets/commit-type-real]

Each repository is read from the exact commit in REPOS (`git log --no-merges <head>`), so the
same mirrors give byte-identical files whatever has been pushed since. A commit subject
`type(scope)!: subject` becomes one row: the user turn is the subject with the type, scope and
`!` removed and its PR/issue numbers stripped; the assistant turn is the type. Commits by bots,
release, merge, revert and work-in-progress commits are dropped (`clean_subject` says why for
each). Every repository belongs to one split (REPOS), so the test rows come from projects the
model never trained on. Rows are then deduplicated by `subject_key` (within a split, one row
per key with its majority label; across splits, test wins over valid and valid over train),
and balanced by label with a cap, drawn round-robin across repositories (seeded).

Writes train/valid/test.jsonl (chat rows plus `metadata` {repo, commit}, which mlxft ignores)
and manifest.json (repositories, licences, commit ranges, counts, what was dropped and why, and
the label-noise measurement of noise.py). Standard library only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import noise  # noqa: E402  (this folder's label-noise measurement)

SYSTEM_PROMPT = (
    "Classify the git commit message. Reply with exactly one label: "
    "feat, fix, docs, refactor, test, perf, build, ci, chore or style."
)
LABELS = ("feat", "fix", "docs", "refactor", "test", "perf", "build", "ci", "chore", "style")
SPLITS = ("train", "valid", "test")
# Rows per label at most (fewer where the repositories of a split do not have them).
CAPS = {"train": 160, "valid": 12, "test": 40}
MIN_WORDS, MAX_WORDS, MAX_CHARS = 2, 24, 160


@dataclass(frozen=True)
class Repo:
    name: str      # owner/name on GitHub
    licence: str   # SPDX id, read from the LICENSE file at `head`
    head: str      # the commit history is read from (git log <head>)
    split: str     # train | valid | test: the whole repository goes to one split


REPOS = (
    # train: 21 projects (JS/TS tooling and frameworks, Rust, Python, Go-free)
    Repo("vitejs/vite", "MIT", "a98c8d95d552c6fa98ab66fb810f5b39ad5abf49", "train"),
    Repo("vitest-dev/vitest", "MIT", "c3ba16b35847d27fb9f01f38cdcb047c77e121f8", "train"),
    Repo("vuejs/core", "MIT", "e2bede96134f757aad5c5b33ac9be055022dbfc8", "train"),
    Repo("vueuse/vueuse", "MIT", "1354e69588f601f721ce2b5e4328d7c3214a0c7e", "train"),
    Repo("nuxt/nuxt", "MIT", "4e0099839c3ea0483e6dc639e4be6d9bdffc3e56", "train"),
    Repo("unocss/unocss", "MIT", "a441ef4d8b14a20c0b3551383ae1b1e96940c0d2", "train"),
    Repo("pnpm/pnpm", "MIT", "36e5ae6ac8d03743442f083680fa3015e4a774b3", "train"),
    Repo("angular/angular-cli", "MIT", "9a1b250bbd3617ce66ff67730075dcda054b5e79", "train"),
    Repo("TanStack/query", "MIT", "40321a0b1b3bdd0afa11f0e439642ab84cdf6afe", "train"),
    Repo("trpc/trpc", "MIT", "340811ba5320637fbaf48fccf3dbfdd258bd34db", "train"),
    Repo("tusen-ai/naive-ui", "MIT", "2ac0b01e7490d887803626deb498005594253a46", "train"),
    Repo("rollup/rollup", "MIT", "89bda2cd8e9def2ea037e7dbffaf392ce9f1ddcb", "train"),
    Repo("axios/axios", "MIT", "23a25af0688d1db2c396deb09229d2271cc24f6c", "train"),
    Repo("conventional-changelog/commitlint", "MIT", "1fd1be00701ab48c9baa964e3b8c0c36a451ccc4", "train"),
    Repo("googleapis/release-please", "Apache-2.0", "fdaca293b5c9215c7bcae72dd228ba9558120817", "train"),
    Repo("open-telemetry/opentelemetry-js", "Apache-2.0", "61126358cb5cf06a2004151cbad18e79cbede00a", "train"),
    Repo("pola-rs/polars", "MIT", "4db92c12c08c390f95b517a00ae0afe818e1abf6", "train"),
    Repo("oxc-project/oxc", "MIT", "288f9a5188b9409cd0dfa34c25a0419e5eb8443b", "train"),
    Repo("biomejs/biome", "MIT OR Apache-2.0", "18883b7dafb8f9581534508fdd5b1e34632f2724", "train"),
    Repo("tauri-apps/tauri", "Apache-2.0 OR MIT", "a8105eccb2122f003b4a36bbfb747998f53c5f10", "train"),
    Repo("yargs/yargs", "MIT", "2a4378bdc2eac9cf7d0cdfe0a52b1b25f779806a", "train"),
    # valid: 2 projects (best-adapter selection measures transfer too)
    Repo("honojs/hono", "MIT", "28a9c128912de19f3fb28b00ae289c9b93f6f392", "valid"),
    Repo("commitizen-tools/commitizen", "MIT", "b66582e9462d1d6f7e72560fa49a1b2511ae30a2", "valid"),
    # test: 6 projects the adapter never sees (JS, Python, Go, Rust)
    Repo("semantic-release/semantic-release", "MIT", "8d905a56e80030c141a71a32c0c4cb870e90470a", "test"),
    Repo("python-semantic-release/python-semantic-release", "MIT", "c74aa3b99de6d9c721f8bd6d2abfa142298b94c9", "test"),
    Repo("eslint/eslint", "MIT", "c27bc926e496985eb7911c09eb60914b2e4b5d0f", "test"),
    Repo("feast-dev/feast", "Apache-2.0", "f0bc0700be7029166e6605e407de6d229cd1e93e", "test"),
    Repo("goreleaser/goreleaser", "MIT", "cd616d2c080b205bfe0833396e6f2d208253095e", "test"),
    Repo("starship/starship", "ISC", "6f33dcec91b758ccbae4ed850eaa6feabff798f9", "test"),
)

# ------------------------------------------------------------------------------------ cleaning

HEADER = re.compile(r"^(?P<type>[A-Za-z]+)\s*(?:\((?P<scope>[^()]*)\))?\s*(?P<bang>!)?\s*:\s*(?P<rest>.*)$")
BOT = re.compile(r"\[bot\]|\bbot@|renovate|dependabot|greenkeeper|github-actions|release-please|"
                 r"semantic-release-bot|allcontributors|snyk|pre-commit-ci|autofix-ci", re.I)
RELEASE_SCOPES = {"release", "releases", "master", "main", "bump", "version", "publish", "changelog"}
RELEASE = re.compile(r"^(v?\d+\.\d+|release[sd]?\b|releasing\b|publish(ed|ing)?\b|prepare (for )?(the )?release\b|"
                     r"(bump|update) (the )?version\b|version bump\b|changelog\b|update changelog\b)", re.I)
SKIP = re.compile(r"\[(skip ci|ci skip|no ci|skip release)\]", re.I)
NOT_A_CHANGE = re.compile(r"^(wip|revert|reverts|merge|squash!|fixup!|amend!)\b", re.I)
ISSUE = r"(?:[\w.-]+/[\w.-]+)?(?:#|GH-)\d+"
ISSUES = rf"{ISSUE}(?:\s*(?:,|and|&)?\s*{ISSUE})*"
REF_VERB = r"(?:close[sd]?|fix(?:e[sd])?|resolve[sd]?|refs?|see|re|related(?: to)?|part of|for)\s*:?\s*"
# "(#123)", "(#1, #2)", "(fixes #4)", "[#5]" anywhere; "..., closes #6" / " #7" at the end.
REF_BRACKETED = re.compile(rf"\s*[(\[]\s*(?:{REF_VERB})?{ISSUES}\s*[)\]]", re.I)
REF_TRAILING = re.compile(rf"[\s,;:-]*(?:{REF_VERB})?{ISSUES}\s*\.?\s*$", re.I)
INNER_PREFIX = re.compile(r"^(?P<word>[A-Za-z][\w./-]*)\s*(?:\([^()]*\))?!?:\s")
TRUNCATED = re.compile(r"\s*\(?\u2026$")  # GitHub cuts long squash titles with "…"
GITMOJI = re.compile(r"^(?::[a-z0-9_+-]+:\s*)+")
NOT_LATIN = re.compile(r"[^\x00-\x7f\u00a0-\u024f\u2018-\u201d\u2026]")


def strip_refs(text: str) -> str:
    """The subject without PR/issue numbers: '(#123)', '[#5]', ', closes #6', 'fix #7' at the end."""
    text = REF_BRACKETED.sub("", text)
    while True:
        shorter = REF_TRAILING.sub("", text)
        if shorter == text:
            return text.strip()
        text = shorter


def clean_subject(subject: str, author: str = "") -> tuple[str, str] | str:
    """(label, message) for a usable commit subject, else the reason it is dropped."""
    if BOT.search(author):
        return "bot"
    subject = " ".join(subject.split())
    if SKIP.search(subject):
        return "skip-ci"  # "[skip ci]" marks release-tool and changelog commits
    if NOT_A_CHANGE.match(subject):
        return "merge/revert/wip"
    head = HEADER.match(subject)
    if not head:
        return "not-conventional"
    label, scope = head["type"].lower(), (head["scope"] or "").strip().lower()
    if label in {"release", "revert"}:
        return {"release": "release", "revert": "merge/revert/wip"}[label]
    if label not in LABELS:
        return "other-type"
    if head["type"] != label:  # "Fix:", "Chore:": older conventions (ESLint's "Chore:" meant any upkeep)
        return "capitalised-type"
    rest = TRUNCATED.sub("", GITMOJI.sub("", strip_refs(head["rest"]))).strip()
    if scope in RELEASE_SCOPES or RELEASE.match(rest):
        return "release"
    if NOT_A_CHANGE.match(rest):
        return "merge/revert/wip"
    inner = INNER_PREFIX.match(rest)
    if inner and inner["word"].lower() in {*LABELS, "revert", "release"}:
        return "double-prefix"
    if inner:  # a component written Go-style after the type ("fix: env: close file"): a scope too
        rest = rest[inner.end():].strip()
    if re.search(r"#\d|https?://", rest):
        return "issue-or-url-left"
    if NOT_LATIN.search(rest):
        return "non-latin"
    words = rest.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or len(rest) > MAX_CHARS:
        return "too-short-or-long"
    return label, rest


VERSION = re.compile(r"\bv?\d+(?:\.[\dx*]+)*(?:-[\w.]+)?\b")
ARTICLES = {"a", "an", "the"}


def subject_key(text: str) -> str:
    """Rows equal under this are duplicates: case, punctuation, versions, numbers and articles ignored."""
    text = VERSION.sub(" ", text.lower())
    words = re.sub(r"[\W_]+", " ", text).split()
    return " ".join(w for w in words if w not in ARTICLES and not w.isdigit())


# ------------------------------------------------------------------------------------ mining


@dataclass(frozen=True)
class Commit:
    repo: str
    commit: str
    order: int     # position in `git log` (0 = newest)
    label: str
    text: str

    @property
    def key(self) -> str:
        return subject_key(self.text)


def git_log(git_dir: Path, head: str) -> list[tuple[str, str, str]]:
    """(commit id, author, subject) newest first, the history of `head` without merge commits."""
    out = subprocess.run(["git", "--git-dir", str(git_dir), "log", "--no-merges", "--format=%H%x1f%an <%ae>%x1f%s%x1e",
                          head], check=True, capture_output=True, text=True, encoding="utf-8", errors="replace").stdout
    return [tuple(rec.strip("\n").split("\x1f", 2)) for rec in out.split("\x1e") if rec.strip()]


def mine_repo(repo: Repo, git_dir: Path) -> tuple[list[Commit], collections.Counter, int]:
    """The usable commits of one repository, the drop reasons counted, and the commits read."""
    log = git_log(git_dir, repo.head)
    kept, dropped = [], collections.Counter()
    for order, (sha, author, subject) in enumerate(log):
        result = clean_subject(subject, author)
        if isinstance(result, str):
            dropped[result] += 1
        else:
            kept.append(Commit(repo.name, sha, order, *result))
    return kept, dropped, len(log)


def dedupe(commits: list[Commit]) -> list[Commit]:
    """One commit per subject key: the majority label (ties: the newest commit's), the newest commit with it."""
    groups: dict[str, list[Commit]] = collections.defaultdict(list)
    for c in sorted(commits, key=lambda c: (c.repo, c.order)):
        groups[c.key].append(c)
    out = []
    for members in groups.values():
        votes = collections.Counter(c.label for c in members)
        top = max(votes.values())
        label = next(c.label for c in members if votes[c.label] == top)
        out.append(next(c for c in members if c.label == label))
    return out


def balance(commits: list[Commit], cap: int, rng: random.Random) -> list[Commit]:
    """At most `cap` rows per label, taken round-robin across repositories (each repo's rows shuffled)."""
    chosen = []
    for label in LABELS:
        by_repo: dict[str, list[Commit]] = collections.defaultdict(list)
        for c in sorted(commits, key=lambda c: (c.repo, c.order)):
            if c.label == label:
                by_repo[c.repo].append(c)
        queues = [rng.sample(rows, len(rows)) for _, rows in sorted(by_repo.items())]
        picked: list[Commit] = []
        while len(picked) < cap and any(queues):
            for queue in queues:
                if queue and len(picked) < cap:
                    picked.append(queue.pop())
        chosen += picked
    return chosen


def build_splits(commits: list[Commit], repos: tuple[Repo, ...], seed: int, caps: dict[str, int] = CAPS,
                 exclude_keys: set[str] = frozenset()) -> dict[str, list[Commit]]:
    """Split by repository, deduplicate (test > valid > train across splits), balance, shuffle."""
    split_of = {r.name: r.split for r in repos}
    taken = set(exclude_keys)
    out = {}
    for split in ("test", "valid", "train"):
        rows = [c for c in dedupe([c for c in commits if split_of[c.repo] == split]) if c.key not in taken]
        rows = balance(rows, caps[split], random.Random(f"{seed}-{split}"))
        taken |= {c.key for c in rows}
        random.Random(f"{seed}-{split}-order").shuffle(rows)
        out[split] = rows
    return {split: out[split] for split in SPLITS}


def to_row(c: Commit) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": c.text},
                         {"role": "assistant", "content": c.label}],
            "metadata": {"repo": c.repo, "commit": c.commit}}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object a line, written to a temporary file and renamed (never half a file)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def handwritten_keys(root: Path) -> set[str]:
    """The hand-written eval messages: no mined row may equal one of them."""
    path = root / "datasets" / "commit-handwritten" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {subject_key(r["messages"][1]["content"]) for r in rows}


def reader_labels(folder: Path) -> dict[str, str]:
    """Subject -> the label a careful reader gave it blind (reader-labels.jsonl; see README)."""
    path = folder / "reader-labels.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["subject"]: r["label"] for r in rows}


def manifest(repos, mined, dropped, read, splits, noise_report, seed, caps) -> dict:
    per_repo = []
    for repo in repos:
        commits = mined[repo.name]
        kept = collections.Counter(c.repo for rows in splits.values() for c in rows)[repo.name]
        per_repo.append({"repo": repo.name, "url": f"https://github.com/{repo.name}", "licence": repo.licence,
                         "split": repo.split, "head": repo.head, "commits_read": read[repo.name],
                         "oldest_mined": commits[-1].commit if commits else None,
                         "newest_mined": commits[0].commit if commits else None,
                         "usable": len(commits), "rows": kept,
                         "labels_usable": dict(collections.Counter(c.label for c in commits).most_common()),
                         "dropped": dict(dropped[repo.name].most_common())})
    return {"seed": seed, "caps_per_label": caps, "system_prompt": SYSTEM_PROMPT, "labels": list(LABELS),
            "rows": {s: len(rows) for s, rows in splits.items()},
            "rows_per_label": {s: {lab: sum(c.label == lab for c in rows) for lab in LABELS}
                               for s, rows in splits.items()},
            "repos_per_split": {s: sorted({r.name for r in repos if r.split == s}) for s in SPLITS},
            "label_noise": noise_report, "repos": per_repo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirrors", required=True, help="folder holding <owner>+<name>/repo git directories")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-label", type=int, default=CAPS["train"], help="train rows per label at most")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args()
    root, out = Path(__file__).resolve().parents[2], Path(args.out)
    mined, dropped, read = {}, {}, {}
    for repo in REPOS:
        git_dir = Path(args.mirrors) / repo.name.replace("/", "+") / "repo"
        mined[repo.name], dropped[repo.name], read[repo.name] = mine_repo(repo, git_dir)
        print(f"{repo.name:50s} {repo.split:5s} {read[repo.name]:6d} commits, {len(mined[repo.name]):6d} usable")
    pool = [c for repo in REPOS for c in mined[repo.name]]
    caps = {**CAPS, "train": args.train_per_label}
    splits = build_splits(pool, REPOS, args.seed, caps, exclude_keys=handwritten_keys(root))
    noise_report = noise.measure(pool, splits["test"], subject_key, LABELS, train=splits["train"],
                                 reader=reader_labels(out), valid=splits["valid"])
    for split, rows in splits.items():
        write_jsonl(out / f"{split}.jsonl", [to_row(c) for c in rows])
    report = manifest(REPOS, mined, dropped, read, splits, noise_report, args.seed, caps)
    (out / "manifest.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for split, counts in report["rows_per_label"].items():
        print(f"{split}: {len(splits[split])} rows {counts}")
    print(json.dumps(noise_report, indent=1))


if __name__ == "__main__":
    main()
