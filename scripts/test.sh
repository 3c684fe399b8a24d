#!/usr/bin/env bash
# The test suite (the README's test command): set up (idempotent), ruff, then pytest.
#   bash scripts/test.sh            the quick suite: tests marked slow are left out (target: under 6 min on 2 cores)
#   bash scripts/test.sh --all      every test, slow ones included (what CI runs)
# Any other argument goes to pytest, e.g. `bash scripts/test.sh tests/test_model.py -x` or `-m ray`.
set -euo pipefail
cd "$(dirname "$0")/.."
mark=(-m "not slow")
args=()
for a in "$@"; do
  if [ "$a" = "--all" ]; then mark=(); else args+=("$a"); fi
done
bash scripts/setup.sh
.venv/bin/ruff check trn workers tests benchmarks
.venv/bin/python -m pytest -q --durations=15 "${mark[@]}" "${args[@]}"
