#!/usr/bin/env bash
# One-off (issue 14): the Ray layer installs as `trn_workers` (pyproject's package-dir maps it to the workers/ folder,
# whose name stays). This rewrites every module reference `workers.X` / `from workers import` / `import workers` to
# `trn_workers`, then drops the transitional "workers" install name from pyproject.toml and reinstalls.
# Prose that names the workers/ folder, `--workers` flags and `workers=` arguments are left alone.
# Usage: bash scripts/rename_workers_imports.sh [ROOT]   (ROOT: a checkout, default this one). Idempotent.
set -euo pipefail
ROOT="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
cd "$ROOT"
# every module of the workers/ folder, longest first (serve_config before serve)
MODULES=$(find workers -maxdepth 1 -name '*.py' ! -name '__init__.py' -printf '%f\n' | sed 's/\.py$//' \
  | awk '{ print length, $0 }' | sort -rn | cut -d' ' -f2 | paste -sd'|')
mapfile -t files < <(grep -rlE "(^|[^A-Za-z0-9_./-])workers\.($MODULES)\b|from workers import|import workers\b|\`workers\` package" \
  trn workers tests benchmarks configs docs README.md scripts 2>/dev/null | grep -vE '\.pyc$|rename_workers_imports\.sh$' || true)
for f in "${files[@]}"; do
  sed -i -E \
    -e "s/(^|[^A-Za-z0-9_./-])workers\.($MODULES)\b/\1trn_workers.\2/g" \
    -e 's/\bfrom workers import\b/from trn_workers import/g' \
    -e 's/\bimport workers\b/import trn_workers/g' \
    -e 's/`workers` package/`trn_workers` package/g' \
    "$f"
  echo "rewrote $f"
done
# pyproject: the old install name goes (trn_workers stays mapped to the workers/ folder)
sed -i -E 's/, "workers"\]/]/; /^# "workers" is the old install name/d' pyproject.toml
grep -qE '^packages = .*"workers"' pyproject.toml && { echo "pyproject.toml still names \"workers\": edit by hand" >&2; exit 1; }
if [ -x .venv/bin/python ]; then
  uv pip install -q --python .venv/bin/python -e ".[test]"
  .venv/bin/python -c "import trn_workers.serve, trn_workers.sanitize; print('trn_workers imports')"
fi
left=$(grep -rnE "(^|[^A-Za-z0-9_./-])workers\.($MODULES)\b|from workers |import workers\b" \
  trn workers tests benchmarks configs docs README.md 2>/dev/null | grep -v '\.pyc' || true)
[ -z "$left" ] || { echo "references left (check by hand):"; echo "$left"; }
