"""Write test.jsonl: commit messages written by hand for mlxft, in wordings the commit-type
generator never uses (informal, real-world style). Run from the repository root:

    python datasets/commit-handwritten/make.py

No seed is needed: the rows are fixed and written in this order. Apache-2.0, like mlxft.
"""

import json
import os
import tempfile
from pathlib import Path

SYSTEM_PROMPT = (
    "Classify the git commit message. Reply with exactly one label: "
    "feat, fix, docs, refactor, test, perf, build, ci, chore or style."
)

MESSAGES = {
    "feat": [
        "let users export their playlists as CSV",
        "Dark mode toggle now lives in the header",
        "support for uploading several photos at once",
        "New `--dry-run` switch shows what would be deleted",
        "allow admins to impersonate a user for debugging",
    ],
    "fix": [
        "stop double-charging when the pay button is clicked twice",
        "timezone math was off by an hour after DST change",
        "Crash on empty cart when applying coupon",
        "don't drop the last row when the page size divides evenly",
        "handle None from the geolocation lookup instead of blowing up",
    ],
    "docs": [
        "explain how to run the app behind nginx",
        "typo in contributing guide",
        "Document the retry env vars in the wiki page",
        "add examples for the search endpoint to the API reference",
        "clarify the docstring of merge_profiles",
    ],
    "refactor": [
        "pull the invoice math out of the view into its own class",
        "collapse three near-identical helpers into one",
        "Move the HTTP bits behind an interface, no behaviour change",
        "rename confusing variable names in the scheduler loop",
        "untangle circular import between models and utils",
    ],
    "test": [
        "cover the refund path with an integration test",
        "Flaky login test: wait for the redirect properly",
        "more cases for the slugify unit tests",
        "add fixtures for the expired-token scenarios",
        "snapshot tests for the settings screen",
    ],
    "perf": [
        "batch the thumbnail lookups instead of one query per image",
        "memoize the permission check; it ran 400 times per request",
        "Speed up startup by lazy-loading the PDF library",
        "avoid copying the whole buffer on every append",
        "use a set for the blocklist lookup (was a list scan)",
    ],
    "build": [
        "upgrade react to 18.3",
        "Pin numpy below 2 until the wheels catch up",
        "switch the Dockerfile base image to slim",
        "drop the unused lodash dependency",
        "regenerate package-lock after the merge",
    ],
    "ci": [
        "run the test matrix on python 3.12 too",
        "GitHub action: cache pip downloads between jobs",
        "nightly pipeline posts failures to the team channel",
        "skip the deploy job on forks",
        "split the e2e stage so it runs in parallel",
    ],
    "chore": [
        "bump version to 2.4.0 for the release",
        "ignore .DS_Store files",
        "update CODEOWNERS for the billing folder",
        "clean up stale feature branches script",
        "tidy the changelog before tagging",
    ],
    "style": [
        "run prettier on the whole frontend",
        "fix indentation in settings.py",
        "sort imports with isort",
        "Trailing whitespace and missing newlines at EOF",
        "apply black formatting, no code changes",
    ],
}


def main() -> None:
    out = Path(__file__).parent / "test.jsonl"
    rows = [{"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": m},
                          {"role": "assistant", "content": label}]}
            for label, messages in MESSAGES.items() for m in messages]
    fd, tmp = tempfile.mkstemp(prefix=".test.jsonl.", dir=out.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, out)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
