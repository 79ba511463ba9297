#!/usr/bin/env bash
# Fills .whl/ (ignored) with what the GPU machine lacks, for Python 3.12 x86_64 (manylinux), under the
# 64 MiB the machine receives together with the working tree. The machine already has torch, transformers,
# peft, bitsandbytes' needs (numpy, packaging), pyarrow, xxhash, fsspec, huggingface-hub, pandas,
# scikit-learn, scipy, joblib, matplotlib, safetensors and tokenizers; it lacks:
#   hydra-core, omegaconf, antlr4-python3-runtime (Hydra), hydra-joblib-launcher (several jobs at once),
#   datasets with dill and multiprocess, seqeval (imported by lora_lab.tasks.metrics),
#   bitsandbytes (the 4-bit base; its 43 MB wheel holds one library per CUDA and ROCm version: trimmed
#   to the CUDA 13 ones, which the machine's torch 2.11+cu130 loads),
#   the embedded assets (.whl/assets: experiments/gpu/prepare.py).
# wandb is not carried (these runs use logger=disabled; run.sh puts a stand-in module in its place).
# Versions: those this repository is tested with here. Needs PyPI (and, for the assets, the embedded
# packages installed: make install).
#   bash experiments/gpu/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
DEST=.whl
rm -rf "$DEST"
mkdir -p "$DEST"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1 hydra-joblib-launcher==1.2.0 datasets==5.2.0 dill==0.4.1
        multiprocess==0.70.19)
SOURCE_ONLY=(antlr4-python3-runtime==4.9.3 seqeval==1.2.2)   # pure Python, published as source only
BITSANDBYTES=bitsandbytes==0.50.2

"$PYTHON" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$DEST" "${WHEELS[@]}"
"$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "${SOURCE_ONLY[@]}"
"$PYTHON" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$TMP" "$BITSANDBYTES"
"$PYTHON" experiments/gpu/prepare.py trim-wheel "$TMP"/bitsandbytes-*.whl "$DEST" \
    'bitsandbytes/libbitsandbytes_cuda13*' 'bitsandbytes/libbitsandbytes_cpu*'
"$PYTHON" experiments/gpu/prepare.py assets "$DEST/assets"

echo
ls -l "$DEST"/*.whl | awk '{printf "%8.2f MiB  %s\n", $5 / 1048576, $9}'
echo "wheels: $(du -cb "$DEST"/*.whl | tail -1 | awk '{printf "%.1f MiB", $1 / 1048576}');" \
     "assets: $(du -sb "$DEST/assets" | awk '{printf "%.1f MiB", $1 / 1048576}');" \
     ".whl in all: $(du -sb "$DEST" | awk '{printf "%.1f MiB", $1 / 1048576}') (a call carries 64 MiB with the working tree)"
