#!/usr/bin/env bash
# The test suite (what CI runs): ruff, then pytest. Assumes scripts/setup.sh has run.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check trn workers tests benchmarks
.venv/bin/python -m pytest -q --durations=15 "$@"
