#!/usr/bin/env bash
# The test suite (the README's test command, and what CI runs): set up (idempotent), ruff, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check trn workers tests benchmarks
.venv/bin/python -m pytest -q --durations=15 "$@"
