#!/usr/bin/env bash
# The GPU run (experiments/gpu/README.md): installs what the machine lacks from .whl/ (wheels, and the
# asset folder .whl/assets put first on PYTHONPATH), then runs experiments/gpu/driver.py.
#   bash experiments/gpu/run.sh ab [OUT]     # (a) benchmark + (b) 4-bit base, at most 6 minutes
#   bash experiments/gpu/run.sh c [OUT]      # (c) the embedded study at full size, at most 6 minutes
#   GPU_DRY=1 bash experiments/gpu/run.sh all /tmp/out   # the CPU rehearsal of both (tests/test_gpu_driver.py)
# OUT defaults to $OUT (set on the GPU machine), else outputs/gpu/out. Settings: see driver.py.
set -euo pipefail
export GPU_STARTED="${GPU_STARTED:-$(date +%s)}"
cd "$(dirname "$0")/../.."
ROOT="$PWD"
PYTHON="${PYTHON:-python3}"
PART="${1:-ab}"
OUTDIR="${2:-${OUT:-$ROOT/outputs/gpu/out}}"
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/${PART}_log.txt") 2>&1

if [ "${GPU_DRY:-0}" != 1 ]; then
    SITE=/tmp/lora_lab_site
    ls .whl/*.whl >/dev/null 2>&1 || { echo "[gpu] no wheels in .whl/: run experiments/gpu/fetch_wheels.sh here and carry .whl"; exit 1; }
    echo "[gpu] installing $(ls .whl/*.whl | wc -l) wheels and lora_lab into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$SITE" .
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu] installed in $(( $(date +%s) - GPU_STARTED )) s"
fi
ASSETS="${GPU_ASSETS:-$ROOT/.whl/assets}"
if [ -d "$ASSETS" ]; then
    export PYTHONPATH="$ASSETS${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu] assets: $ASSETS"
else
    echo "[gpu] no asset folder ($ASSETS): the embedded packages must be installed"
fi
# lora_lab imports wandb at module level; these runs log nothing (logger=disabled, WANDB_MODE=disabled),
# so where wandb is not installed a stand-in module that only says so is enough
if ! (cd /tmp && "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('wandb') is None)"); then
    STAND_IN=/tmp/lora_lab_wandb_stand_in
    mkdir -p "$STAND_IN/wandb"
    cat > "$STAND_IN/wandb/__init__.py" <<'EOF'
"""Stand-in for wandb, which is not installed here; these runs use logger=disabled and never call it."""


def __getattr__(name):
    raise ImportError(f"wandb is not installed here (stand-in module): wandb.{name} is unavailable")
EOF
    export PYTHONPATH="$STAND_IN${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu] wandb is not installed: a stand-in module satisfies its import (logger=disabled)"
fi
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PYTHON" experiments/gpu/driver.py "$PART" "$OUTDIR"
