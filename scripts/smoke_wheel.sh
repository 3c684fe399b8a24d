#!/usr/bin/env bash
# Wheel smoke test (issue 14; CI runs it after the tests): build the wheel, install it into a fresh venv in a
# temporary folder OUTSIDE the checkout, and from there check that
#   - `trn --help` runs and `import trn` lists the public API (trn.__all__) without importing torch or Ray,
#   - Restorer.pretrained("fashion-mnist") finds the shipped weights inside the wheel and restores a batch,
#   - the default checkpoint paths (checkpoints/NAME) resolve to the shipped weights from any directory,
#   - the Ray Serve app module imports, and the app built on the shipped restorer serves one restore request.
# Uses uv (its cache makes the pinned torch/torchvision pair a link, not a download, once scripts/setup.sh ran).
# Usage: bash scripts/smoke_wheel.sh [--keep] [--no-serve]     (--keep: leave the temporary folder for a look)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
KEEP=0 SERVE=1
for a in "$@"; do
  case "$a" in
    --keep) KEEP=1 ;;
    --no-serve) SERVE=0 ;;
    *) echo "usage: $0 [--keep] [--no-serve]" >&2; exit 2 ;;
  esac
done
command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv
WORK="$(mktemp -d "${TMPDIR:-/tmp}/trn-wheel-smoke.XXXXXX")"
[ "$KEEP" = 1 ] && echo "smoke folder: $WORK" || trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS

rm -rf "$REPO/build"  # setuptools reuses build/lib and never deletes from it: a module removed since would ship
uv build -q --wheel -o "$WORK/dist" "$REPO"
WHEEL="$(ls "$WORK"/dist/trn-*.whl)"
echo "wheel: $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"
uv venv -q "$WORK/venv" --python 3.11
uv pip install -q --compile-bytecode --python "$WORK/venv/bin/python" "$WHEEL"  # bytecode: docs/deploy.md
echo "installed into $WORK/venv ($((SECONDS - t0)) s)"

cd "$WORK"  # nothing below can come from the checkout
export OMP_NUM_THREADS=1 TRN_SMOKE_REPO="$REPO" TRN_SMOKE_SERVE="$SERVE"
unset TRN_WEIGHTS_DIR PYTHONPATH
"$WORK/venv/bin/trn" --help >/dev/null
"$WORK/venv/bin/python" -c "import sys, trn; print(trn.__all__); assert 'torch' not in sys.modules and 'ray' not in sys.modules"
"$WORK/venv/bin/python" - <<'EOF'
import io
import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import trn
from trn.restorer import Restorer
from trn.weights import resolve_checkpoint, shipped_checkpoints

repo = Path(os.environ["TRN_SMOKE_REPO"]).resolve()
site = Path(trn.__file__).resolve().parent
assert repo not in site.parents, f"trn imported from the checkout: {site}"
assert not (Path.cwd() / "checkpoints").exists()
print("shipped weights:", shipped_checkpoints())
for name in ("checkpoints/trn_fmnist_agnostic", "checkpoints/trn_fmnist", "checkpoints/fmnist_guard"):
    p = resolve_checkpoint(name)
    assert site in p.parents, f"{name} resolved outside the installed package: {p}"

r = Restorer.pretrained("fashion-mnist")
x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
out = r.restore(x)
assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1 and (out - x).abs().mean() > 1e-3
print(f"restored a batch of {len(x)}: mean |change| {(out - x).abs().mean():.4f}")

import trn_workers.serve as serve_app  # noqa: E402  (the service app module imports)

if os.environ["TRN_SMOKE_SERVE"] == "1":
    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for attempt in range(3):  # Ray gives its raylet a fixed 30 s to register: a busy machine can miss that
        try:
            # address="local": a new instance, never a cluster that another process left running on the machine
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = serve_app.build_app({"restorer": str(resolve_checkpoint("checkpoints/trn_fmnist_agnostic")), "num_cpus": 0.5})
        serve.run(app, name="smoke", route_prefix="/")
        img = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/restore", data=buf.getvalue(),
                                     headers={"Content-Type": "image/png"})
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    body = resp.read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        got = np.asarray(Image.open(io.BytesIO(body)), dtype=np.float32) / 255
        want = r.restore(torch.from_numpy(img.astype(np.float32) / 255)[None, None])[0, 0].numpy()
        assert got.shape == (28, 28) and np.abs(got - want).max() <= 1 / 255 + 1e-6, "served != in-process restore"
        assert np.abs(got - img / 255).mean() > 0.01, "the service returned its input"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as resp:
            print("served /v1/restore from the wheel; /healthz:", json.loads(resp.read() or b"{}"))
    finally:
        serve.shutdown()
        ray.shutdown()
EOF
echo "wheel smoke test passed ($((SECONDS - t0)) s)"
