"""Generate the commit-type demo dataset (train/valid/test JSONL in chat format).

Run it from the repository root:

    python datasets/commit-type/generate.py [--seed 0] [--out datasets/commit-type]

The task: given a git commit message whose conventional-commit prefix
("feat:", "fix(parser):", ...) has been removed, answer with exactly one label
from LABELS. Every row is

    {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                  {"role": "user", "content": "<commit message>"},
                  {"role": "assistant", "content": "<label>"}]}

Messages are built from independent pools (verb x object x component x detail,
plus tense, casing, issue references, body paragraphs and bullet lists), so a
small model has to learn what each kind of change looks like rather than
memorise sentences. Half of the test split is held out: it uses vocabulary
(components, files, tools, packages) that never occurs in train or valid, and
half of those rows also use test-only phrasings (HELDOUT_TEMPLATES).

Standard library only and deterministic: the same seed gives byte-identical
files. Importable too: ``SYSTEM_PROMPT``, ``LABELS``, ``HELDOUT_TERMS``,
``generate(seed)``, ``heldout_subsets(seed)`` and ``write_splits(splits, out_dir)``.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
from pathlib import Path

from mlxft.files import write_jsonl

SYSTEM_PROMPT = (
    "Classify the git commit message. Reply with exactly one label: "
    "feat, fix, docs, refactor, test, perf, build, ci, chore or style."
)
LABELS = ("feat", "fix", "docs", "refactor", "test", "perf", "build", "ci", "chore", "style")

# Rows per label in each split. Test = held-out-vocabulary rows + ordinary rows.
TRAIN_PER_LABEL = 90
VALID_PER_LABEL = 12
TEST_HELDOUT_PER_LABEL = 8
TEST_MAIN_PER_LABEL = 8
MAX_WORDS = 40  # whole message, subject + body

# --------------------------------------------------------------------------- #
# Vocabulary. POOLS are used everywhere; HELDOUT pools (same names) are used
# only for the held-out part of the test split.
# --------------------------------------------------------------------------- #

POOLS: dict[str, list[str]] = {
    # ---- shared -----------------------------------------------------------
    "comp": [
        "parser", "tokenizer", "scheduler", "auth module", "login flow", "cache layer",
        "config loader", "CLI", "HTTP client", "router", "session manager", "logger",
        "database adapter", "migration runner", "exporter", "importer", "search index",
        "payment service", "notification service", "upload handler", "image resizer",
        "rate limiter", "websocket server", "job queue", "plugin loader", "settings page",
        "dashboard", "user profile page", "checkout flow", "API gateway", "metrics collector",
        "template engine", "serializer", "file watcher", "sync worker", "permissions module",
        "email sender", "report generator", "shopping cart", "invoice service", "audit log",
        "feature flag service", "i18n loader", "markdown renderer", "diff viewer", "backup job",
        "webhook handler", "pagination helper", "date picker", "sidebar", "search bar",
        "connection pool", "cron runner", "storage backend", "thumbnail service",
        "GraphQL resolver", "admin panel", "onboarding wizard", "comment editor",
        "password reset flow", "user service", "order service", "event bus", "query builder",
        "retry helper",
    ],
    "func": [
        "parse_args", "loadConfig", "get_user", "retryRequest", "formatDate", "build_index",
        "handle_upload", "computeTotals", "render_page", "validate_email", "to_json",
        "fetchItems", "normalize_path", "resolveRoute", "save_session", "apply_discount",
        "readManifest", "send_email", "create_order", "check_permissions", "encode_token",
        "list_projects", "merge_settings", "scheduleJob", "paginate",
    ],
    "file": [
        "src/parser.py", "lib/utils.js", "cmd/serve.go", "app/models/user.rb", "src/main.rs",
        "api/handlers.py", "web/src/App.tsx", "internal/auth/token.go",
        "src/components/Button.vue", "server/index.js", "config/settings.py", "client/api.ts",
        "core/engine.cpp", "app/controllers/orders_controller.rb", "pkg/cache/lru.go",
        "src/store/session.ts", "backend/views.py", "frontend/src/router.js",
        "src/lib/date.ts", "include/buffer.h",
    ],
    "flag": [
        "--dry-run", "--verbose", "--json", "--output", "--since", "--limit", "--no-color",
        "--watch", "--force", "--timeout", "--profile", "--format", "--quiet", "--config",
        "--parallel", "--include-archived", "--yes", "--region",
    ],
    "cmd": [
        "init", "login", "export", "doctor", "sync", "prune", "status", "deploy", "import",
        "logs", "config", "upgrade", "search", "backup", "restore",
    ],
    "optname": [
        "max_retries", "timeout_seconds", "default_locale", "page_size", "log_format",
        "allowed_origins", "theme", "output_dir", "retention_days", "max_upload_mb",
    ],
    "endpoint": [
        "GET /api/users/:id/export", "POST /v1/webhooks", "GET /health", "DELETE /sessions/:id",
        "PATCH /v2/projects/:id", "GET /metrics", "POST /api/orders/:id/refund", "GET /v1/search",
        "PUT /api/settings", "POST /auth/token/refresh", "GET /api/teams/:id/members",
    ],
    "topic": [
        "installation on Windows", "authentication", "rate limits", "pagination",
        "error handling", "upgrading from v1", "configuration precedence",
        "running tests locally", "webhook payloads", "self-hosting", "proxy setup",
        "log levels", "API tokens", "data retention", "backups and restores",
    ],
    "upcoming": [
        "multi-tenant support", "the async rewrite", "the new storage backend",
        "plugin support", "the v3 API",
    ],
    # ---- feat ---------------------------------------------------------------
    "feature": [
        "dark mode", "CSV export", "JSON output", "pagination", "search filters",
        "keyboard shortcuts", "bulk actions", "drag-and-drop upload", "email notifications",
        "a progress bar", "an undo button", "custom themes", "OAuth login",
        "two-factor authentication", "webhook support", "rate limit headers", "a dry-run mode",
        "an audit trail", "tag filtering", "multi-language support", "offline mode",
        "a preview pane", "sorting by date", "a confirmation dialog", "password reset via email",
        "per-user quotas", "API key rotation", "scheduled reports", "a health check",
        "streaming responses", "Markdown previews", "infinite scroll",
        "a copy-to-clipboard button", "saved searches", "SSO via SAML", "an RSS feed",
        "autocomplete", "a read-only share link",
    ],
    "supportable": [
        "YAML config files", "gzip-compressed uploads", "custom date formats",
        "environment variable overrides", "multiple accounts", "nested folders",
        "Unicode file names", "wildcard patterns", "HTTP proxies", "IPv6 addresses",
        "relative paths", "TOML configuration", "Markdown tables", "per-user time zones",
        "recurring events", "soft deletes", "custom fields", "multiple currencies",
        "WebP images", "signed URLs",
    ],
    "useraction": [
        "export their data as CSV", "pin favourite projects", "rename saved filters",
        "choose a default branch", "mute notifications per channel", "set a custom avatar",
        "reorder dashboard widgets", "invite teammates by email", "archive old projects",
        "configure the retry limit", "download invoices as PDF", "schedule exports",
        "share read-only links", "restore deleted items",
    ],
    "adminaction": [
        "disable sign-ups", "export audit logs", "impersonate users for support",
        "set per-team quotas", "lock inactive accounts", "manage API keys",
        "force a password reset",
    ],
    "newthing": [
        "a plugin API", "an event hook system", "a read-only mode", "a public SDK",
        "a command palette", "a trash bin with restore", "a bulk edit view",
        "versioned snapshots", "an activity feed", "a setup wizard",
    ],
    "capability": [
        "export reports as PDF", "read settings from environment variables",
        "send Slack notifications", "resume interrupted uploads", "filter results by tag",
        "accept multiple files at once", "generate shareable links", "handle recurring events",
        "import data from CSV", "show a diff preview", "authenticate with API tokens",
        "emit structured JSON logs", "group items by owner", "run in headless mode",
    ],
    "exposable": [
        "job status", "usage metrics", "user preferences", "build artifacts", "team membership",
    ],
    "apikind": ["REST API", "GraphQL API", "CLI", "public API"],
    "settingaction": [
        "hide archived items", "choose the default view", "limit upload size",
        "set a custom domain", "change the date format",
    ],
    "notif": ["email", "Slack", "in-app", "webhook", "desktop", "weekly digest"],
    "event": [
        "a build finishes", "someone mentions you", "a payment fails", "an export is ready",
        "a new comment is posted", "a subscription is about to expire", "a job is retried",
    ],
    "integration": [
        "Slack", "Discord", "Jira", "Google Drive", "Dropbox", "Stripe", "Sentry", "Zapier",
        "Microsoft Teams", "Okta",
    ],
    "flagname": ["new_editor", "beta_exports", "fast_search", "v2_dashboard", "smart_retry"],
    "goal": ["multi-tenant support", "the public API", "offline use", "self-service billing"],
    # ---- fix ------------------------------------------------------------------
    "cond": [
        "the input is empty", "the config file is missing", "the user has no email",
        "the token expires", "the list has a single item", "the path contains spaces",
        "the network drops", "two requests arrive at once", "a field is null",
        "the date falls on February 29", "the upload is larger than 2 GB",
        "the locale is not English", "the server returns 204", "the window is resized",
        "running on Windows", "the queue is empty", "a plugin fails to load",
        "the session cookie is missing",
    ],
    "bugkind": [
        "null pointer exception", "off-by-one error", "race condition", "memory leak",
        "infinite loop", "deadlock", "rounding error", "encoding bug", "double submission",
        "stale cache bug", "timezone bug", "integer overflow", "file handle leak",
        "use-after-free",
    ],
    "wrongvalue": ["None", "an empty list", "negative values", "the wrong user", "NaN", "stale data"],
    "case": [
        "empty strings", "leap years", "deleted users", "unicode input", "zero-length files",
        "archived projects", "guest accounts",
    ],
    "missing": [
        "None values", "empty responses", "missing config keys", "malformed JSON",
        "expired tokens", "duplicate IDs", "zero-length files", "trailing slashes in URLs",
        "non-ASCII input", "missing headers",
    ],
    "badthing": [
        "crashing on empty input", "dropping the last item", "hanging on shutdown",
        "overwriting user settings", "sending duplicate emails", "leaking file handles",
        "double-charging customers", "retrying forever", "logging passwords",
        "losing unsaved changes", "returning stale results",
    ],
    "badthing3": [
        "crashes", "hangs", "drops requests", "logs out the user", "shows stale data",
        "double-counts items", "rejects valid input", "leaks file handles",
    ],
    "badaction": [
        "crash", "reset filters", "send duplicate emails", "overwrite user settings",
        "retry forever", "swallow the error", "close the connection early",
        "drop queued jobs", "log the password",
    ],
    "wrongcalc": [
        "the VAT calculation", "the sort order", "the timezone offset",
        "the progress percentage", "discount rounding", "the word count", "the elapsed time",
    ],
    "wrongthing": [
        "timezone", "currency symbol", "sort order", "total", "redirect URL", "default value",
        "exit code",
    ],
    "symptom": ["404", "500 error", "timeout", "wrong status code", "missing CORS headers"],
    "brokenthing": [
        "login", "pagination", "file upload", "search", "sorting", "logout", "password reset",
    ],
    "event2": [
        "upgrading to {ver}", "a session timeout", "a page reload", "switching accounts",
        "a failed payment", "a config change",
    ],
    "exc": [
        "TypeError", "KeyError", "NullPointerException", "IndexError", "ZeroDivisionError",
        "UnicodeDecodeError", "nil pointer dereference", "unhandled promise rejection",
        "ValueError",
    ],
    "nullish": ["null", "missing", "empty", "undefined", "negative"],
    "field": [
        "user IDs", "email addresses", "timestamps", "prices", "file names", "headers",
        "page numbers",
    ],
    "lostthing": ["scroll position", "keyboard focus", "the previous sort order", "default settings"],
    "correctbehaviour": [
        "handle empty lists", "respect the timeout setting", "return the right status code",
        "work with Windows paths", "ignore case when comparing emails", "close the file on error",
    ],
    "offbyone": [
        "pagination", "the date range filter", "line numbers in error messages",
        "the retry counter", "substring slicing in `{func}`",
    ],
    "assumption": [
        "the list was never empty", "every user has an email", "timestamps were in UTC",
        "the file always exists", "IDs were unique",
    ],
    "doing": ["writing to disk", "sending the request", "rendering the page", "committing the transaction"],
    # ---- docs -----------------------------------------------------------------
    "doc": [
        "README", "the README", "installation instructions", "CONTRIBUTING.md",
        "the contributing guide", "the API reference", "the configuration guide",
        "the quickstart", "the troubleshooting section", "the deployment docs", "the tutorial",
        "the user guide", "the docs site", "the upgrade notes", "the {comp} docs",
        "docs/usage.md", "docs/architecture.md", "the man page", "the developer guide",
    ],
    "documentable": [
        "the {flag} flag", "the {comp} configuration options", "how to run the {comp} locally",
        "the return value of `{func}`", "environment variables used by the {comp}",
        "the release process", "known limitations of the {comp}",
        "retry behaviour of the {comp}", "the `{optname}` setting",
        "the webhook payload format", "error codes returned by the API", "the `{cmd}` command",
    ],
    "docaddition": [
        "a section on {topic}", "screenshots of the {comp}", "a table of config options",
        "a build status badge", "links to the examples", "a note about {topic}",
    ],
    "docsection": [
        "Troubleshooting", "Known issues", "Getting started", "Configuration", "Contributing",
        "Examples", "Upgrading",
    ],
    "outdated": [
        "install steps", "screenshots", "references to Python 2", "mentions of the old API",
        "links to the old wiki", "Travis badge",
    ],
    "explainable": [
        "the retry logic in the {comp}", "why `{func}` copies its input",
        "the locking order in the {comp}", "the cache invalidation rules",
    ],
    "doc_new": [
        "a troubleshooting guide", "an architecture overview", "a getting-started tutorial",
        "a page on deploying with Docker", "a diagram of the {comp} request flow",
        "a security policy", "usage examples for the {comp}",
    ],
    "linktarget": [
        "the API reference", "the changelog", "the contributing guide", "the examples folder",
    ],
    "mentionable": [
        "the minimum Python version", "the required environment variables",
        "that Windows needs WSL", "the new {flag} flag", "the default rate limits",
    ],
    # ---- refactor -------------------------------------------------------------
    "extractable": [
        "validation logic", "the retry loop", "URL building", "date formatting helpers",
        "the SQL queries", "error mapping", "the pagination logic", "token parsing",
        "shared constants",
    ],
    "newhome": [
        "a helper", "its own module", "a separate class", "a utility function", "a mixin",
        "a small service",
    ],
    "renames": [
        "`getUser` to `fetchUser`", "`cfg` to `config`", "`UserManager` to `UserService`",
        "`handle_req` to `handle_request`", "`data` to `payload`", "`tmp` to `buffer`",
        "`doStuff` to `syncAccounts`", "the `utils` module to `helpers`", "`Item` to `LineItem`",
        "`mgr` to `manager`", "`process` to `process_batch`", "`isOk` to `isValid`",
        "`ctx` to `request_context`", "`Base` to `BaseHandler`",
    ],
    "simplifiable": [
        "error handling", "the retry loop", "conditionals", "the state machine",
        "argument parsing", "the permission checks", "nested callbacks", "the constructor",
        "query parameter handling", "the event wiring",
    ],
    "movable": [
        "shared types", "constants", "database helpers", "`{func}`", "validation helpers",
        "HTTP utilities",
    ],
    "movedest": ["a common package", "a separate file", "the {comp}", "`{file}`", "core/", "internal/"],
    "patterns": [
        "callbacks with async/await", "class components with hooks",
        "manual loops with list comprehensions", "string concatenation with f-strings",
        "dict lookups with a dataclass", "the switch statement with a lookup table",
        "inheritance with composition", "global state with dependency injection",
        "raw SQL strings with query builder calls", "magic numbers with named constants",
        "boolean flags with an enum", "promise chains with async/await",
    ],
    "dupable": ["validation code", "date parsing", "error formatting", "retry handling", "request signing"],
    "unused": ["helpers", "parameters", "private methods", "branches", "enum values"],
    "convtarget": [
        "TypeScript", "a class", "dataclasses", "async functions", "a plain module",
        "pure functions",
    ],
    "consolidatable": [
        "error types", "config parsing", "duplicate validation logic", "logging calls",
    ],
    "concept": [
        "a single state object", "small service classes", "explicit interfaces",
        "a pipeline of steps",
    ],
    "abstraction": [
        "a repository layer", "a base class for handlers", "a shared error type",
        "a small interface for storage",
    ],
    "smallerparts": ["two functions", "smaller helpers", "separate parse and validate steps"],
    "dep": ["the config", "the database session", "the logger", "the clock"],
    # ---- test -----------------------------------------------------------------
    "testkind": [
        "unit tests", "integration tests", "end-to-end tests", "snapshot tests", "smoke tests",
        "edge-case tests", "more tests", "a unit test", "an integration test",
    ],
    "testcase": [
        "empty input", "expired tokens", "concurrent writes", "leap years",
        "unicode file names", "the retry limit", "invalid config files", "very large uploads",
        "negative amounts", "missing permissions", "timezone changes",
    ],
    "testname": [
        "test_login_redirect", "test_export_csv", "TestSyncWorker", "test_cache_expiry",
        "upload_spec", "test_retry_backoff", "TestRateLimiter", "checkout.e2e",
        "test_parse_dates",
    ],
    "testfile": [
        "test_parser.py", "auth.spec.ts", "cache_test.go", "test_api.py", "router.test.js",
        "user_spec.rb", "tests/integration/test_sync.py", "LoginForm.test.tsx",
        "tests/test_cli.py", "scheduler_test.go",
    ],
    "platform": ["Windows", "macOS", "Python 3.12", "ARM machines"],
    "external": [
        "the HTTP client", "the clock", "S3", "the payment gateway", "the filesystem", "SMTP",
        "the Redis connection", "random number generation", "the OAuth provider",
        "environment variables",
    ],
    "fixturething": [
        "sample invoices", "fake users", "recorded HTTP responses", "a temporary database",
        "test config files",
    ],
    "paramcases": ["all supported formats", "edge-case inputs", "both storage backends", "every locale"],
    "testtool": [
        "pytest fixtures", "a fake clock", "table-driven tests", "the new test client",
        "factories instead of raw dicts",
    ],
    # ---- perf -----------------------------------------------------------------
    "operation": [
        "startup", "JSON parsing", "search queries", "page load", "image decoding",
        "CSV import", "diff computation", "report generation", "cold starts",
        "the hot loop in `{func}`", "tokenization", "rendering of long lists",
        "permission checks", "config loading", "query planning",
    ],
    "cacheable": [
        "compiled regexes", "parsed config", "user permissions", "DNS lookups",
        "rendered templates", "API responses", "query results", "feature flag lookups",
        "font metrics",
    ],
    "metric": [
        "memory usage", "allocations", "latency", "bundle size", "the number of database queries",
        "p99 latency", "GC pressure", "lock contention", "CPU usage", "network round trips",
        "peak memory",
    ],
    "wasteful": [
        "N+1 queries", "redundant re-renders", "repeated string copies",
        "unnecessary deep copies", "recomputing hashes", "extra round trips",
        "blocking I/O on the main thread", "loading the whole file into memory",
        "repeated regex compilation", "quadratic list scans",
    ],
    "batchable": ["database writes", "metric uploads", "cache invalidations", "HTTP requests", "log flushes"],
    "lazyable": [
        "heavy dependencies", "images below the fold", "plugin modules", "translations",
        "the syntax highlighter",
    ],
    "fasterway": [
        "a set instead of a list for membership checks", "a connection pool for database access",
        "binary search for lookups", "orjson for serialization", "bulk inserts for imports",
        "a bounded LRU cache", "a ring buffer instead of list slicing",
        "a prepared statement for the hot query", "a heap instead of sorting on every insert",
    ],
    "dbcolumn": ["users.email", "orders.created_at", "events.user_id", "sessions.token", "jobs.status"],
    "parallelizable": [
        "thumbnail generation", "file hashing", "export of large reports", "image uploads",
        "index rebuilding",
    ],
    "precomputable": [
        "route tables", "lookup tables for the {comp}", "permission masks", "the search vocabulary",
    ],
    "streamable": ["large CSV exports", "log files", "uploaded archives", "API responses"],
    "reusable": ["HTTP connections", "compiled templates", "database sessions", "TLS sessions", "buffers"],
    "skipwork": [
        "re-rendering the {comp}", "rebuilding the search index", "recomputing checksums",
        "re-fetching user settings",
    ],
    "debounceable": ["search requests", "resize handlers", "autosave"],
    # ---- build ----------------------------------------------------------------
    "pkg": [
        "lodash", "requests", "react", "webpack", "numpy", "axios", "django", "express",
        "pytest", "typescript", "serde", "tokio", "golang.org/x/net", "babel", "eslint", "vite",
        "flask", "pydantic", "rails", "openssl", "sqlalchemy", "jest", "urllib3", "protobuf",
        "grpcio", "pillow", "moment", "next", "boto3", "cryptography",
    ],
    "runtime": [
        "Node 20", "Python 3.12", "Go 1.22", "Java 21", "Rust 1.78", ".NET 8", "Ruby 3.3",
        "Node 22", "Python 3.13",
    ],
    "oldruntime": ["Node 16", "Python 3.8", "Go 1.19", "Java 11", "Ruby 2.7"],
    "depsgroup": [
        "all dependencies to their latest minor versions", "dev dependencies",
        "transitive dependencies", "Python dependencies", "npm dependencies",
    ],
    "pinreason": ["a breaking change", "a broken release", "a build failure on ARM", "an import error"],
    "buildfile": [
        "Makefile", "Dockerfile", "pyproject.toml", "package.json", "the webpack config",
        "CMakeLists.txt", "go.mod", "Cargo.toml", "setup.py", "tsconfig.json",
        "vite.config.ts", "build.gradle", "requirements.txt", "setup.cfg", "MANIFEST.in",
    ],
    "buildpurpose": [
        "build wheels for arm64", "use a multi-stage build", "include static assets",
        "enable source maps", "target ES2020", "strip debug symbols",
        "use the new output directory", "produce smaller images",
        "compile with link-time optimization", "install only runtime dependencies",
    ],
    "buildmigration": [
        "setup.py to pyproject.toml", "webpack to Vite", "npm to pnpm", "Make to CMake",
        "Yarn 1 to Yarn 4", "Create React App to Vite", "Pipenv to Poetry", "Maven to Gradle",
    ],
    "maketask": [
        "release builds", "the Docker image", "cross-compiling", "generating protobuf code",
        "building the docs site",
    ],
    "maketarget": ["dist", "wheel", "image", "proto", "install-dev", "bundle"],
    "lockfile": ["package-lock.json", "poetry.lock", "Cargo.lock", "yarn.lock", "go.sum", "uv.lock"],
    "bundler": ["webpack", "Vite", "Rollup", "tsc", "the Docker build", "setuptools", "CMake"],
    "bundlerpurpose": [
        "emit source maps", "target ES2020", "split vendor chunks", "build wheels for arm64",
        "strip debug symbols", "output to dist/", "compile with -O2",
        "include static assets in the package", "produce a static binary",
    ],
    "baseimage": ["python:3.12-slim", "node:20-alpine", "debian bookworm", "distroless", "ubuntu 24.04"],
    # ---- ci -------------------------------------------------------------------
    "cisys": ["GitHub Actions", "GitLab CI", "CircleCI", "Travis CI", "Jenkins", "Azure Pipelines"],
    "citask": [
        "linting", "nightly builds", "release tagging", "publishing to PyPI",
        "running the test suite", "deploying the docs", "building Docker images",
        "security scanning", "checking links", "type checking",
    ],
    "cimatrix": [
        "Python 3.10 to 3.13", "macOS and Windows runners", "Node 18 and 20",
        "both arm64 and x86_64", "the latest Ubuntu image",
    ],
    "ciplatform": ["macOS", "Windows", "Python 3.13", "Node 22", "arm64 runners", "Ubuntu 24.04"],
    "cicache": [
        "pip downloads", "node_modules", "the Cargo registry", "Go modules",
        "Docker layers", "Gradle dependencies", "the pre-commit environments",
    ],
    "cibroken": [
        "failing release workflow", "broken CI on main", "lint job timing out in CI",
        "YAML syntax in the deploy pipeline", "permissions for the publish job",
        "the CI cache key", "the nightly workflow schedule", "missing secrets in the deploy job",
        "the coverage upload step in CI",
    ],
    "ghaction": [
        "actions/checkout", "actions/setup-python", "actions/cache", "actions/setup-node",
        "docker/build-push-action", "codecov/codecov-action", "actions/upload-artifact",
    ],
    "cijob": ["test", "lint", "build", "e2e", "release", "deploy", "docs"],
    "cisplit": ["parallel shards", "unit and integration jobs", "per-platform jobs"],
    "ciskipcond": [
        "on docs-only changes", "for draft pull requests", "on forks",
        "when only markdown files change",
    ],
    "artifact": [
        "coverage reports", "test logs", "built wheels", "screenshots from failed e2e runs",
        "the Docker image digest",
    ],
    "ciwhen": ["nightly", "on pull requests only", "on every push to main", "on tag pushes", "weekly"],
    "cifeature": [
        "a timeout", "a concurrency group", "retries for flaky steps", "a job summary",
        "a workflow_dispatch trigger", "path filters",
    ],
    "ciworkflowfile": [
        ".github/workflows/ci.yml", ".github/workflows/release.yml", ".gitlab-ci.yml",
        ".circleci/config.yml", "the Jenkinsfile", "azure-pipelines.yml", "the CI workflow",
        "the release pipeline",
    ],
    "runnerimage": ["ubuntu-22.04", "macos-14", "windows-2022"],
    "pubthing": ["wheels to PyPI", "the Docker image to GHCR", "the npm package", "docs to GitHub Pages"],
    "cicheck": ["CodeQL scanning", "dependency review", "secret scanning", "coverage upload"],
    "cienv": ["TZ=UTC", "a fixed locale", "PYTHONHASHSEED", "CI=true"],
    # ---- chore ----------------------------------------------------------------
    "ignorepat": [
        ".DS_Store", "*.log", ".env", "coverage/", ".idea/", "dist/", "*.swp", ".venv/",
        "node_modules/", "__pycache__/", ".vscode/", "*.pyc", "tmp/", "*.orig",
    ],
    "scriptrename": [
        "scripts/setup.sh to scripts/bootstrap.sh", "tools/gen.py to tools/codegen.py",
        "the `dev` npm script to `start`", "bin/run to bin/dev",
        "scripts/release.sh to scripts/cut-release.sh", "the hack/ folder to scripts/",
    ],
    "leftover": [
        "old migration scripts", "unused sample data", "leftover debug files",
        "the deprecated tools/ folder", "stale TODO comments", "commented-out scripts",
        "an unused .env.example", "old screenshots from the repo", "the empty vendor folder",
    ],
    "metafile": [
        "the copyright year", "CODEOWNERS", "issue templates", "the pull request template",
        "license headers", "author email in package metadata", "funding links",
        "the repo description", "the MAINTAINERS file", "the contributors list",
        ".editorconfig", ".mailmap",
    ],
    "cleanplace": [
        "the scripts folder", "the examples directory", "the repo root", "the tools/ directory",
        "the old prototype folder", "unused env files",
    ],
    "housekeeping": [
        "general housekeeping", "repo housekeeping", "housekeeping after the {ver} release",
        "misc housekeeping", "small housekeeping tasks",
    ],
    "syncfile": [".editorconfig", "the issue templates", "the license file", "the pre-commit config"],
    "scriptsdir": ["tools/", "scripts/", "bin/"],
    "owner": ["@alice", "@platform-team", "@bob", "@infra", "@docs-team"],
    "archivable": ["old prototype code", "the legacy scripts folder", "unused design files"],
    # ---- style ----------------------------------------------------------------
    "formatter": [
        "black", "prettier", "gofmt", "isort", "clang-format", "ruff format", "yapf",
        "standard",
    ],
    "linter": ["eslint", "flake8", "pylint", "ruff", "golint", "stylelint", "shellcheck"],
    "styletarget": [
        "the whole repo", "the {comp}", "`{file}`", "tests/", "src/", "the {comp} module",
        "all source files", "the frontend code", "{file}", "the code base", "the remaining files",
    ],
    "quotestyle": ["double", "single"],
    "punct": ["semicolons", "trailing commas", "newlines at end of file", "blank lines between functions"],
    "alignable": ["dict literals", "comments", "struct fields", "import groups"],
    "jira": ["PLAT", "WEB", "CORE", "OPS", "APP"],
}

HELDOUT: dict[str, list[str]] = {
    "comp": [
        "geocoder", "billing portal", "chat widget", "PDF renderer", "OAuth callback handler",
        "video transcoder", "inventory service", "calendar view", "shipping calculator",
        "SMS gateway", "license checker", "telemetry agent", "map tile server", "spell checker",
        "QR code generator", "leaderboard", "ticket tracker", "recommendation engine",
        "voice recorder", "barcode scanner", "loyalty points service", "weather widget",
    ],
    "func": [
        "geocode_address", "transcodeVideo", "quote_shipping", "renderInvoicePdf",
        "score_leaderboard", "scanBarcode",
    ],
    "file": [
        "geo/tiles.py", "billing/portal.go", "widgets/chat.tsx", "services/sms_gateway.rb",
        "crates/pdf/src/render.rs", "inventory/stock.py",
    ],
    "feature": ["QR code sharing", "a kanban board", "voice input", "calendar sync", "a world map view"],
    "integration": ["Notion", "Linear", "Mattermost"],
    "doc": ["the FAQ", "the glossary", "the admin handbook", "docs/recipes.md"],
    "testkind": ["property-based tests", "mutation tests", "fuzz tests"],
    "testfile": ["test_geocoder.py", "shipping.spec.ts", "transcoder_test.go"],
    "metric": ["time to first byte", "frame render time"],
    "fasterway": ["SIMD for checksum calculation", "a trie for prefix lookups"],
    "pkg": ["polars", "htmx", "zod", "fastapi", "tailwindcss"],
    "buildmigration": ["Make to Bazel", "webpack to esbuild", "CMake to Meson"],
    "cisys": ["Buildkite", "Drone CI", "Woodpecker CI"],
    "ghaction": ["pnpm/action-setup", "softprops/action-gh-release"],
    "ignorepat": [".terraform/", "*.tfstate"],
    "metafile": ["the SECURITY contacts list", "CITATION.cff"],
    "formatter": ["rustfmt", "autopep8", "stylua"],
    "linter": ["clippy", "rubocop"],
}

# Every held-out item: none of them occurs in train or valid.
HELDOUT_TERMS: tuple[str, ...] = tuple(t for items in HELDOUT.values() for t in items)

# --------------------------------------------------------------------------- #
# Templates. "<verb>" marks a verb conjugated by the message's mood; "{slot}"
# is filled from POOLS (or a generator below); "{the}" is an optional "the ".
# --------------------------------------------------------------------------- #

TEMPLATES: dict[str, list[str]] = {
    "feat": [
        "<add> {feature} to {the}{comp}",
        "<add> {feature} in {the}{comp}",
        "<add> {flag} flag to the `{cmd}` command",
        "<add> {flag} option to {the}{comp}",
        "<add> {endpoint} endpoint",
        "<add> {endpoint} endpoint for {purpose}",
        "<support> {supportable} in {the}{comp}",
        "<add> support for {supportable} to {the}{comp}",
        "<allow> users to {useraction}",
        "<allow> users to {useraction} from {the}{comp}",
        "<let> admins {adminaction}",
        "<let> admins {adminaction} from {the}{comp}",
        "<introduce> {newthing} for {the}{comp}",
        "<implement> {feature} for {the}{comp}",
        "<implement> `{cmd}` subcommand",
        "<expose> {exposable} via the {apikind}",
        "<enable> {feature} in {the}{comp} behind a feature flag",
        "{feature} for {the}{comp}",
        "new {flag} flag for `{cmd}`",
        "new {comp} setting to {settingaction}",
        "{the}{comp} can now {capability}",
        "<make> it possible to {useraction}",
        "<add> {notif} notifications when {event}",
        "<add> `{optname}` config option to {the}{comp}",
        "<add> {integration} integration",
        "<add> {integration} integration to {the}{comp}",
        "<provide> a way to {settingaction} in {the}{comp}",
        "<teach> {the}{comp} to {capability}",
    ],
    "fix": [
        "<fix> crash when {cond}",
        "<fix> crash in {the}{comp} when {cond}",
        "<fix> {bugkind} in {the}{comp}",
        "<fix> {bugkind} in `{func}`",
        "<fix> {symptom} on {endpoint}",
        "<fix> `{func}` returning {wrongvalue} for {case}",
        "<handle> {missing} in {the}{comp}",
        "<handle> {missing} in `{func}`",
        "<prevent> {the}{comp} from {badthing}",
        "<correct> {wrongcalc} in {the}{comp}",
        "<resolve> race condition between {the}{comp} and {the}{comp}",
        "{the}{comp} no longer {badthing3} when {cond}",
        "don't {badaction} when {cond}",
        "do not {badaction} after {event2}",
        "<fix> regression in {the}{comp} introduced in {ver}",
        "<fix> broken {brokenthing} after {event2}",
        "<avoid> {exc} when {cond}",
        "<avoid> {exc} in {the}{comp}",
        "<guard> against {nullish} {field} in {the}{comp}",
        "<restore> {lostthing} in {the}{comp}",
        "<make> `{func}` {correctbehaviour}",
        "<fix> off-by-one in {offbyone}",
        "<fix> wrong {wrongthing} in {the}{comp}",
        "<fix> {brokenthing} in {the}{comp} for {case}",
    ],
    "docs": [
        "<update> {doc}",
        "<update> {doc} for {ver}",
        "<update> {doc} with {docaddition}",
        "<fix> typo in {doc}",
        "<fix> typos in {doc}",
        "<fix> broken links in {doc}",
        "<fix> wrong command in {doc}",
        "<fix> outdated example in {doc}",
        "<document> {documentable}",
        "<document> {documentable} in {doc}",
        "<add> docstrings to {the}{comp}",
        "<add> docstrings to `{func}`",
        "<add> {docsection} section to {doc}",
        "<add> example for {topic} to {doc}",
        "<clarify> {topic} in {doc}",
        "<rewrite> {doc} section on {topic}",
        "<remove> outdated {outdated} from {doc}",
        "<explain> {topic} in {doc}",
        "<improve> wording in {doc}",
        "<add> code comments explaining {explainable}",
        "<describe> {topic} in {doc}",
        "<add> {doc_new}",
        "<link> to {linktarget} from {doc}",
        "<mention> {mentionable} in {doc}",
    ],
    "refactor": [
        "<extract> {extractable} from {the}{comp} into {newhome}",
        "<extract> {extractable} into {newhome}",
        "<rename> {renames}",
        "<rename> {renames} in {the}{comp}",
        "<rename> internal helpers in {the}{comp} for clarity",
        "<simplify> {simplifiable} in {the}{comp}",
        "<simplify> `{func}`",
        "<split> {the}{comp} into smaller modules",
        "<split> `{func}` into {smallerparts}",
        "<move> {movable} to {movedest}",
        "<replace> {patterns} in {the}{comp}",
        "<deduplicate> {dupable} across {the}{comp} and {the}{comp}",
        "<decouple> {the}{comp} from {the}{comp}",
        "<remove> dead code from {the}{comp}",
        "<remove> unused {unused} in {the}{comp}",
        "<convert> {the}{comp} to {convtarget}",
        "<inline> `{func}` into its only caller",
        "<consolidate> {consolidatable} in {the}{comp}",
        "<restructure> {the}{comp} package layout",
        "<reorganize> {the}{comp} around {concept}",
        "<introduce> {abstraction} in {the}{comp}",
        "<clean up> the control flow in `{func}`",
        "<flatten> nested conditionals in `{func}`",
        "<make> `{func}` a pure function",
        "<pass> {dep} explicitly to {the}{comp} instead of using a global",
    ],
    "test": [
        "<add> {testkind} for {the}{comp}",
        "<add> {testkind} for `{func}`",
        "<add> regression test for #{n}",
        "<add> a test for {testcase} in {the}{comp}",
        "<fix> flaky {testname} test",
        "<fix> flaky test in {testfile}",
        "<fix> failing tests for {the}{comp} on {platform}",
        "<increase> test coverage for {the}{comp}",
        "<improve> coverage of {the}{comp} to {pct}%",
        "<mock> {external} in {the}{comp} tests",
        "<stub> out {external} in {testfile}",
        "<add> fixtures for {fixturething}",
        "<move> shared fixtures for the {comp} into conftest.py",
        "<parametrize> {testfile} over {paramcases}",
        "<update> snapshots for {the}{comp}",
        "<update> golden files after {the}{comp} change",
        "<remove> obsolete tests for {the}{comp}",
        "<skip> {testname} test on {platform} for now",
        "<cover> {testcase} in `{func}` tests",
        "<test> {the}{comp} with {testcase}",
        "<rewrite> {the}{comp} tests to use {testtool}",
        "<split> {testfile} into smaller test modules",
        "<add> missing assertions in {testfile}",
        "<make> {testfile} independent of test order",
    ],
    "perf": [
        "<speed up> {operation} in {the}{comp}",
        "<speed up> {operation}",
        "<optimize> {operation} in {the}{comp}",
        "<cache> {cacheable} in {the}{comp}",
        "<cache> results of `{func}`",
        "<memoize> `{func}`",
        "<reduce> {metric} in {the}{comp}",
        "<reduce> {metric} of `{func}` by {pct}%",
        "<cut> {metric} of {the}{comp} by {pct}%",
        "<avoid> {wasteful} in {the}{comp}",
        "<batch> {batchable} in {the}{comp}",
        "<lazy-load> {lazyable}",
        "<lazy-load> {lazyable} in {the}{comp}",
        "<use> {fasterway} in {the}{comp}",
        "<add> index on {dbcolumn} to speed up {operation}",
        "<add> database index on {dbcolumn}",
        "<parallelize> {parallelizable}",
        "<make> {operation} {x}x faster",
        "<precompute> {precomputable} at startup",
        "<stream> {streamable} instead of loading them into memory",
        "<reuse> {reusable} across requests in {the}{comp}",
        "<skip> {skipwork} when nothing changed",
        "<debounce> {debounceable} in {the}{comp}",
    ],
    "build": [
        "<bump> {pkg} from {ver_a} to {ver_b}",
        "<bump> {pkg} to {ver_b}",
        "<upgrade> {pkg} to {ver_b}",
        "<upgrade> to {runtime}",
        "<update> {depsgroup}",
        "<add> {pkg} as a dependency",
        "<add> {pkg} as a dev dependency",
        "<remove> unused dependency {pkg}",
        "<drop> the {pkg} dependency",
        "<pin> {pkg} to {ver_b} to avoid {pinreason}",
        "<update> {buildfile} to {buildpurpose}",
        "<migrate> from {buildmigration}",
        "<switch> build from {buildmigration}",
        "<add> Makefile target for {maketask}",
        "<add> `{maketarget}` target to the Makefile",
        "<drop> support for {oldruntime}",
        "<regenerate> {lockfile}",
        "<configure> {bundler} to {bundlerpurpose}",
        "<switch> base image to {baseimage}",
        "<require> {runtime} in {buildfile}",
    ],
    "ci": [
        "<add> {cisys} workflow for {citask}",
        "<add> {cisys} job for {citask}",
        "<set up> {cisys} for {citask}",
        "<run> tests on {cimatrix} in CI",
        "<add> {ciplatform} to the CI matrix",
        "<cache> {cicache} in CI",
        "<cache> {cicache} in the {cisys} workflow",
        "<fix> {cibroken}",
        "<bump> {ghaction} to {actionver}",
        "<split> the CI {cijob} job into {cisplit}",
        "<skip> the {cijob} job {ciskipcond}",
        "<upload> {artifact} as a CI artifact",
        "<run> the {cijob} workflow {ciwhen}",
        "<add> {cifeature} to {ciworkflowfile}",
        "<use> a self-hosted runner for the {cijob} job",
        "<move> the {cijob} job from {cisys} to {cisys}",
        "<retry> the {cijob} step once on network errors in CI",
        "<pin> the CI runner image to {runnerimage}",
        "<publish> {pubthing} from the release workflow",
        "<enable> {cicheck} in the pipeline",
        "<make> the {cijob} job in CI fail on warnings",
        "<set> {cienv} in the CI environment",
    ],
    "chore": [
        "<add> {ignorepat} to .gitignore",
        "<ignore> {ignorepat} in git",
        "<bump> version to {ver_b}",
        "<release> {ver_b}",
        "<prepare> release {ver_b}",
        "<update> CHANGELOG for {ver_b}",
        "<rename> {scriptrename}",
        "<remove> {leftover}",
        "<update> {metafile}",
        "<clean up> {cleanplace}",
        "{housekeeping}",
        "{housekeeping} in {cleanplace}",
        "<sync> {syncfile} with the upstream template",
        "<move> helper scripts into {scriptsdir}",
        "<add> {owner} to CODEOWNERS",
        "<tidy> up {cleanplace}",
        "<archive> {archivable}",
        "<merge> release branch {ver_b} back into main",
    ],
    "style": [
        "<run> {formatter} on {styletarget}",
        "<format> {styletarget} with {formatter}",
        "<reformat> {styletarget}",
        "<apply> {formatter} formatting to {styletarget}",
        "<fix> {linter} warnings in {styletarget}",
        "<fix> {linter} errors",
        "<address> {linter} complaints in {styletarget}",
        "<remove> trailing whitespace",
        "<remove> trailing whitespace from {styletarget}",
        "<fix> indentation in {styletarget}",
        "<sort> imports in {styletarget}",
        "<wrap> lines longer than {linelen} characters in {styletarget}",
        "<use> {quotestyle} quotes consistently in {styletarget}",
        "<convert> tabs to spaces in {styletarget}",
        "<fix> formatting in {styletarget}",
        "<fix> code style in {styletarget}",
        "<add> missing {punct} in {styletarget}",
        "<remove> extra blank lines in {styletarget}",
        "whitespace and formatting cleanup in {styletarget}",
        "<align> {alignable} in {styletarget}",
        "<normalize> line endings in {styletarget}",
        "<fix> spacing around operators in {styletarget}",
        "<remove> unused imports flagged by {linter}",
    ],
}

# Test-only phrasings: used (with held-out vocabulary) for the held-out test rows
# only, so the test split also measures wording the model never saw.
HELDOUT_TEMPLATES: dict[str, list[str]] = {
    "feat": [
        "{feature} is now available in {the}{comp}",
        "<ship> {feature} for {the}{comp}",
        "users can now {useraction} in {the}{comp}",
    ],
    "fix": [
        "<repair> {brokenthing} in {the}{comp}",
        "<stop> {the}{comp} from {badthing}",
        "{exc} raised by `{func}` when {cond}",
    ],
    "docs": [
        "<proofread> {doc}",
        "<expand> the {docsection} section of {doc}",
        "typo in {doc}",
    ],
    "refactor": [
        "<untangle> {simplifiable} in {the}{comp}",
        "<break> up `{func}` into {smallerparts}",
        "<streamline> {simplifiable} in {the}{comp} without changing behaviour",
    ],
    "test": [
        "<write> {testkind} for {the}{comp}",
        "<harden> {testfile} against timing issues",
        "<verify> that {the}{comp} copes with {testcase}",
    ],
    "perf": [
        "<trim> {metric} in {the}{comp}",
        "{operation} in {the}{comp} is {x}x faster now",
        "<shave> {ms2} ms off {operation} in {the}{comp}",
    ],
    "build": [
        "<raise> the minimum {pkg} version to {ver_b}",
        "{pkg} {ver_a} -> {ver_b}",
        "<refresh> {lockfile} after adding {pkg}",
    ],
    "ci": [
        "<speed up> the CI pipeline by caching {cicache}",
        "<tweak> {ciworkflowfile} so the {cijob} job runs {ciwhen}",
        "<move> {citask} from {cisys} to {cisys}",
    ],
    "chore": [
        "<clean out> {leftover}",
        "version bump to {ver_b}",
        "<get> rid of {leftover}",
    ],
    "style": [
        "<lint> {styletarget} with {linter}",
        "cosmetic whitespace changes in {styletarget}",
        "<tidy> formatting of {styletarget} with {formatter}",
    ],
}

BODIES: dict[str, list[str]] = {
    "feat": [
        "This lets users {useraction} without contacting support.",
        "Disabled by default; turn it on with {flag}.",
        "Requested in #{n}.",
        "The default behaviour is unchanged.",
        "Includes docs and tests.",
        "Behind the `{flagname}` feature flag for now.",
        "First step towards {goal}.",
        "Works in both the web app and the CLI.",
        "Users asked for this in the forum.",
    ],
    "fix": [
        "The {comp} assumed {assumption}, which is not true when {cond}.",
        "Regression from {ver}.",
        "Reported by a user on Windows.",
        "Adds a regression test.",
        "The stack trace pointed at `{func}`.",
        "We now check for this case before {doing}.",
        "Only happened under heavy load.",
        "Users saw a blank page instead of an error.",
    ],
    "docs": [
        "Several people got stuck on this step.",
        "The old instructions referred to {ver}.",
        "Docs only, no code changes.",
        "Spotted while onboarding a new contributor.",
        "Also fixes a few typos along the way.",
        "Follows the style of the other guides.",
    ],
    "refactor": [
        "No behaviour change.",
        "No functional changes.",
        "Pure refactor; tests pass unchanged.",
        "This makes the {comp} easier to test.",
        "Prepares for {upcoming}.",
        "The old names are kept as aliases for one release.",
        "Behaviour is identical, only the structure changed.",
        "Should make {upcoming} easier to land.",
    ],
    "test": [
        "The test depended on wall-clock time.",
        "Uses a fake clock so it runs in milliseconds.",
        "Coverage for the {comp} goes from {pct}% to {pct2}%.",
        "No production code changes.",
        "The old test only checked the happy path.",
        "Reproduces the bug from #{n}.",
        "Failed about one run in twenty on CI.",
    ],
    "perf": [
        "Benchmark: {ms} ms down to {ms2} ms on a 10k-row dataset.",
        "Cuts p95 latency by about {pct}%.",
        "Profiling showed most of the time was spent in `{func}`.",
        "Peak memory drops from {mb} MB to {mb2} MB.",
        "No behaviour change, just less work per request.",
        "Noticeable on large workspaces.",
    ],
    "build": [
        "The new release fixes a security advisory.",
        "Needed for the arm64 Docker image.",
        "Shrinks the image by about {mb} MB.",
        "The lockfile is regenerated too.",
        "No code changes were needed.",
        "Upstream dropped support for the old version.",
    ],
    "ci": [
        "Saves about {x} minutes per run.",
        "The job started failing after the runner image update.",
        "Only runs on pushes to main.",
        "Forks don't have access to the secrets, so skip there.",
        "Mirrors what the release script does locally.",
    ],
    "chore": [
        "Nothing functional.",
        "Housekeeping before the {ver_b} release.",
        "Leftovers from the old setup.",
        "Keeps the repo root tidy.",
        "No code changes.",
    ],
    "style": [
        "No code changes.",
        "Formatting only, no logic changes.",
        "Generated by running {formatter} over the tree.",
        "Whitespace only.",
        "Makes the next diff easier to review.",
        "Pure formatting; safe to skip in review.",
    ],
}
GENERIC_BODIES = ["Closes #{n}.", "Fixes #{n}.", "See #{n}.", "Refs {jira}-{n}.", "Ticket: {jira}-{n}."]

BULLETS: dict[str, list[str]] = {
    "feat": [
        "add {flag} flag", "document the new option", "add tests for the {comp}",
        "wire it into the {comp}", "support {supportable}", "handle the empty state",
        "add a migration for the new column",
    ],
    "fix": [
        "check for None before use", "add a regression test", "log the original error",
        "return early on empty input", "handle the timeout case", "retry once on connection reset",
    ],
    "docs": [
        "fix typos", "update screenshots", "add missing flags to the table",
        "link to the API reference", "reword the intro",
    ],
    "refactor": [
        "move helpers to utils", "rename variables for clarity", "drop the unused parameter",
        "split the long function", "no behaviour change",
    ],
    "test": [
        "add fixtures for fake users", "cover the error path", "mock the HTTP client",
        "assert on the log output", "drop the sleep calls",
    ],
    "perf": [
        "cache the parsed result", "avoid copying the buffer", "reuse the connection",
        "batch the inserts", "skip work when input is unchanged",
    ],
    "build": [
        "bump {pkg}", "regenerate the lockfile", "drop the unused {pkg} dependency",
        "update the Dockerfile", "pin {pkg}",
    ],
    "ci": [
        "cache dependencies", "run on macOS too", "upload coverage", "add a timeout",
        "pin the runner image",
    ],
    "chore": [
        "update .gitignore", "remove old scripts", "bump version", "tidy the repo root",
        "update CODEOWNERS",
    ],
    "style": [
        "sort imports", "strip trailing whitespace", "wrap long lines", "fix indentation",
        "normalize quotes",
    ],
}

ISSUE_SUFFIXES = [
    " (#{n})", " (#{n})", " (closes #{n})", " (fixes #{n})", ", refs #{n}", " [#{n}]",
    " (GH-{n})", " ({jira}-{n})",
]

# --------------------------------------------------------------------------- #
# Verb conjugation.
# --------------------------------------------------------------------------- #

IRREGULAR = {  # imperative -> (past, third person)
    "run": ("ran", "runs"), "split": ("split", "splits"), "set": ("set", "sets"),
    "rewrite": ("rewrote", "rewrites"), "make": ("made", "makes"), "cut": ("cut", "cuts"),
    "speed": ("sped", "speeds"), "stub": ("stubbed", "stubs"), "skip": ("skipped", "skips"),
    "pin": ("pinned", "pins"), "wrap": ("wrapped", "wraps"), "drop": ("dropped", "drops"),
    "let": ("let", "lets"), "lazy-load": ("lazy-loaded", "lazy-loads"),
    "format": ("formatted", "formats"), "reformat": ("reformatted", "reformats"),
    "teach": ("taught", "teaches"), "ship": ("shipped", "ships"), "stop": ("stopped", "stops"),
    "break": ("broke", "breaks"), "write": ("wrote", "writes"), "trim": ("trimmed", "trims"),
    "get": ("got", "gets"), "proofread": ("proofread", "proofreads"),
}


def conjugate(verb: str, mood: str) -> str:
    """Conjugate the first word of a verb phrase: imp ("add"), past ("added"), third ("adds")."""
    if mood == "imp":
        return verb
    head, _, rest = verb.partition(" ")
    if head in IRREGULAR:
        past, third = IRREGULAR[head]
    else:
        if head.endswith("e"):
            past = head + "d"
        elif head.endswith("y") and head[-2] not in "aeiou":
            past = head[:-1] + "ied"
        else:
            past = head + "ed"
        if head.endswith(("s", "sh", "ch", "x", "z")):
            third = head + "es"
        elif head.endswith("y") and head[-2] not in "aeiou":
            third = head[:-1] + "ies"
        else:
            third = head + "s"
    word = past if mood == "past" else third
    return word + (" " + rest if rest else "")


# --------------------------------------------------------------------------- #
# Filling templates.
# --------------------------------------------------------------------------- #

_SLOT = re.compile(r"\{(\w+)\}")
_VERB = re.compile(r"<([^<>]+)>")
_STOP = {"the", "a", "an"}


class _Ctx:
    """Per-message random state: fills slots, remembers held-out use."""

    def __init__(self, rng: random.Random, heldout: bool):
        self.rng = rng
        self.heldout = heldout
        self.used_heldout = False
        self.drawn: dict[str, list[str]] = {}
        self.pct = 0
        major, minor = rng.randint(0, 6), rng.randint(0, 30)
        self.ver_a = f"{major}.{minor}.{rng.randint(0, 12)}"
        if rng.random() < 0.5:
            self.ver_b = f"{major}.{minor + 1}.0"
        else:
            self.ver_b = f"{major}.{minor}.{rng.randint(13, 20)}"
        if rng.random() < 0.3:
            self.ver_a, self.ver_b = "v" + self.ver_a, "v" + self.ver_b

    def pick(self, name: str) -> str:
        rng = self.rng
        if self.heldout and name in HELDOUT:
            pool, from_heldout = HELDOUT[name], True
        else:
            pool, from_heldout = POOLS[name], False
        seen = self.drawn.setdefault(name, [])
        choices = [p for p in pool if p not in seen] or pool
        value = rng.choice(choices)
        seen.append(value)
        if from_heldout:
            self.used_heldout = True
        return value

    def slot(self, name: str) -> str:
        rng = self.rng
        if name == "the":
            return "the " if rng.random() < 0.6 else ""
        if name in ("n", "n2"):
            return str(rng.randint(12, 2400))
        if name == "pct":
            self.pct = rng.choice([12, 15, 20, 25, 30, 35, 40, 45, 50, 60, 70, 85])
            return str(self.pct)
        if name == "pct2":  # always above the {pct} drawn before it
            return str(rng.choice([p for p in (40, 55, 65, 75, 80, 88, 92, 95) if p > self.pct] or [99]))
        if name in ("ms", "ms2", "mb", "mb2"):
            hi = rng.randint(120, 900)
            return str(hi if not name.endswith("2") else rng.randint(8, 110))
        if name == "x":
            return str(rng.randint(2, 9))
        if name == "ver":
            return rng.choice(["v", "", ""]) + f"{rng.randint(0, 5)}.{rng.randint(0, 20)}"
        if name == "ver_a":
            return self.ver_a
        if name == "ver_b":
            return self.ver_b
        if name == "linelen":
            return rng.choice(["80", "88", "100", "120"])
        if name == "actionver":
            return rng.choice(["v3", "v4", "v5"])
        if name == "purpose":
            return rng.choice([
                "bulk imports", "account deletion", "usage statistics", "refunds",
                "team invitations", "password resets", "fetching audit events",
            ])
        return self.fill(self.pick(name))

    def fill(self, text: str) -> str:
        return _SLOT.sub(lambda m: self.slot(m.group(1)), text)


def _render(core: str, mood: str) -> str:
    return _VERB.sub(lambda m: conjugate(m.group(1), mood), core)


def strict_key(text: str) -> str:
    """A stricter near-duplicate key than the tests': also drops digits and articles."""
    text = re.sub(r"[^a-z\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in _STOP)


def spec_key(text: str) -> str:
    """Lowercased, punctuation stripped, whitespace collapsed (what the tests compare)."""
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


def _capitalise_maybe(text: str, rng: random.Random) -> str:
    first = text.split(" ", 1)[0]
    if first.isalpha() and first.islower() and rng.random() < 0.55:
        return text[0].upper() + text[1:]
    return text


def _make_message(label: str, rng: random.Random, heldout: bool):
    """Return (message, subject_key, subset): "main", "heldout_vocab" or "heldout_wording"."""
    ctx = _Ctx(rng, heldout)
    new_wording = heldout and rng.random() < 0.5
    template = rng.choice(HELDOUT_TEMPLATES[label] if new_wording else TEMPLATES[label])
    core = ctx.fill(template)  # still holds <verb> markers
    r = rng.random()
    mood = "imp" if r < 0.66 else ("past" if r < 0.91 else "third")
    subject_key = strict_key(_render(core, "imp"))
    subject = _render(core, mood)
    if not template.startswith("{pkg}"):  # keep package names as spelled
        subject = _capitalise_maybe(subject, rng)
    has_ref = rng.random() < 0.22
    if has_ref:
        subject += ctx.fill(rng.choice(ISSUE_SUFFIXES))
    elif rng.random() < 0.08:
        subject += "."
    generic = [] if has_ref else GENERIC_BODIES

    body = ""
    r = rng.random()
    if r < 0.30:
        first = rng.choice(BODIES[label])
        sentences = [ctx.fill(first)]
        if rng.random() < 0.3:
            extra = rng.choice(BODIES[label] + generic)
            if extra != first:
                sentences.append(ctx.fill(extra))
        body = " ".join(sentences)
    elif r < 0.42:
        items: list[str] = []
        want = rng.randint(2, 3)
        bullet = rng.choice(["-", "-", "*"])
        used = {template}
        for _ in range(10):
            if len(items) == want:
                break
            if rng.random() < 0.6:
                source = rng.choice(BULLETS[label])
            else:  # a short line from the label's own grammar, not the subject's template
                source = rng.choice(TEMPLATES[label])
            if source in used:
                continue
            item = _render(ctx.fill(source), "imp")
            if len(item.split()) <= 8:
                used.add(source)
                items.append(item)
        capital = rng.random() < 0.4
        body = "\n".join(
            f"{bullet} {i[0].upper() + i[1:] if capital else i}" for i in items
        )
    elif r < 0.48 and generic:
        body = ctx.fill(rng.choice(generic))

    message = subject + ("\n\n" + body if body else "")
    if len(message.split()) > MAX_WORDS:
        message = subject
    subset = "heldout_wording" if new_wording else ("heldout_vocab" if ctx.used_heldout else "main")
    return message, subject_key, subset


def _row(message: str, label: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": message},
            {"role": "assistant", "content": label},
        ]
    }


def _build(seed: int) -> tuple[dict[str, list[dict]], dict[str, str]]:
    seen_subjects: set[str] = set()
    seen_messages: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    subsets: dict[str, str] = {}
    n_main = TRAIN_PER_LABEL + VALID_PER_LABEL + TEST_MAIN_PER_LABEL

    for label in LABELS:
        rng = random.Random(f"commit-type:{seed}:{label}")
        wanted = {True: TEST_HELDOUT_PER_LABEL, False: n_main}
        got: dict[bool, list[tuple[str, str]]] = {True: [], False: []}
        # Held-out rows first, so the unique held-out phrasings are not used up.
        for heldout in (True, False):
            attempts = 0
            while len(got[heldout]) < wanted[heldout]:
                attempts += 1
                if attempts > 50_000:
                    raise RuntimeError(f"{label}: grammar too small for {wanted[heldout]} rows")
                message, skey, subset = _make_message(label, rng, heldout)
                if heldout and subset == "main":
                    continue
                mkey = spec_key(message)
                if skey in seen_subjects or mkey in seen_messages:
                    continue
                seen_subjects.add(skey)
                seen_messages.add(mkey)
                got[heldout].append((message, subset))

        main = [m for m, _ in got[False]]
        splits["valid"] += [_row(m, label) for m in main[:VALID_PER_LABEL]]
        test_main = main[VALID_PER_LABEL:VALID_PER_LABEL + TEST_MAIN_PER_LABEL]
        splits["test"] += [_row(m, label) for m, _ in got[True]] + [_row(m, label) for m in test_main]
        splits["train"] += [_row(m, label) for m in main[VALID_PER_LABEL + TEST_MAIN_PER_LABEL:]]
        subsets.update({m: s for m, s in got[True]})
        subsets.update({m: "main" for m in test_main})

    for name, rows in splits.items():
        random.Random(f"commit-type:{seed}:shuffle:{name}").shuffle(rows)
    return splits, subsets


def generate(seed: int = 0) -> dict[str, list[dict]]:
    """Build the dataset: {"train": [...], "valid": [...], "test": [...]} of chat rows."""
    return _build(seed)[0]


def heldout_subsets(seed: int = 0) -> dict[str, str]:
    """Map each test-split user message to its subset, for per-subset scoring:
    "main" (train-like), "heldout_vocab" (held-out words, train phrasings) or
    "heldout_wording" (held-out words and test-only phrasings)."""
    return _build(seed)[1]


def write_splits(splits: dict[str, list[dict]], out_dir: str | os.PathLike) -> None:
    """Write <split>.jsonl, each atomically."""
    for name, rows in splits.items():
        write_jsonl(Path(out_dir) / f"{name}.jsonl", rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args(argv)
    splits = generate(args.seed)
    write_splits(splits, args.out)
    for name, rows in splits.items():
        print(f"{name}: {len(rows)} rows -> {Path(args.out) / (name + '.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
