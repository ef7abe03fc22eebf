#!/bin/bash
# Checks that need a CUDA GPU, in one run (about 8 minutes on an H200; SKIP_CLI=1 drops step 4):
#   1. the exactness suite with the shared tiny fixtures on the GPU (LAB_TEST_DEVICE=cuda);
#   2. c(B) and v(K, B) of the Qwen pair's architectures by batch size, and the speedup
#      they predict with the acceptance measured on the trained pair (scripts/device_costs.py);
#   3. eager against captured (static cache in batch buckets + torch.compile, CUDA graphs) at batch 1, 4, 16:
#      c, v(K), the bars of issue #12, and end-to-end tokens/s of the one decode loop (scripts/captured_check.py);
#   4. the command line end to end on the GPU: bench (batch sizes, the peer) and quantised
#      generate, over random-weight copies of the Qwen pair (timings real, outputs meaningless).
# usage: scripts/gpu_check.sh OUT_DIR [MODELS_DIR]
# MODELS_DIR holds qwen2.5-coder-1.5b/ and qwen2.5-coder-0.5b/ with config and tokenizer files
# (default: the prepared presets, lab.models.cache_dir()). Needs: torch with CUDA, the pinned
# transformers, xgrammar and bitsandbytes, pytest.
set -u
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [MODELS_DIR]}
models=${2:-${LAB_CACHE_DIR:-$HOME/.cache/speculative-decoding-lab}}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}  # DEVICE=cpu tries the script where there is no GPU
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch; from importlib.metadata import version as v; print('torch', torch.__version__, 'cuda', torch.version.cuda, *(f'| {p} {v(p)}' for p in ('transformers', 'xgrammar', 'bitsandbytes')))"

step "1. exactness suite on $device"
LAB_TEST_DEVICE=$device timeout 300 $py -m pytest -q -p no:cacheprovider -m "not real_model and not browser" \
    --junitxml="$out/pytest_cuda.xml" -o junit_family=xunit1 \
    tests/test_decode.py tests/test_decode_batch.py tests/test_exactness.py tests/test_layer_skip.py tests/test_kv.py tests/test_verify.py \
    tests/test_grammar.py tests/test_batch_constrained.py tests/test_quant.py tests/test_costs.py \
    tests/test_compare.py tests/test_sweep.py tests/test_theory.py tests/test_eagle.py 2>&1 | tail -40

step "2. costs by batch size (random weights of the Qwen pair's architectures, bf16)"
$py scripts/device_costs.py --target "$models/qwen2.5-coder-1.5b" --draft "$models/qwen2.5-coder-0.5b" \
    --random-weights --device $device --k 4 --mean-acceptance-length 3.36 --repeats ${REPEATS:-9} \
    --batch-sizes ${BATCH_SIZES:-1 2 4 8 16 32 64 128} --out "$out/costs_qwen_cuda.json"

step "3. eager vs captured steps (random weights of the Qwen pair's architectures, bf16)"
timeout 330 $py scripts/captured_check.py --target "$models/qwen2.5-coder-1.5b" --draft "$models/qwen2.5-coder-0.5b" \
    --device $device --k 4 --batch-sizes 1 4 16 --budget-s ${CAPTURE_BUDGET_S:-200} --out "$out/captured_cuda.json"

[ -n "${SKIP_CLI:-}" ] && { step done; exit 0; }
step "4. command line on $device (random-weight copies)"
rand=/tmp/lab-random
$py - "$models" "$rand" "$device" <<'PY'
import shutil, sys
from pathlib import Path
import lab  # noqa: F401
import torch
from lab.studies.costs import random_model
models, rand = Path(sys.argv[1]), Path(sys.argv[2])
for name in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"):
    dst = rand / name
    dst.mkdir(parents=True, exist_ok=True)
    for f in (models / name).iterdir():
        if f.name != "model.safetensors" and f.is_file():
            shutil.copy(f, dst / f.name)
    if not (dst / "tokenizer.json").exists():
        shutil.copy(models / "tokenizer.json", dst / "tokenizer.json")
    torch.manual_seed(0)
    random_model(str(dst), sys.argv[3]).save_pretrained(dst)
    print("saved", dst)
PY
timeout 240 $py -m lab bench --target $rand/qwen2.5-coder-1.5b --drafter draft-model --draft $rand/qwen2.5-coder-0.5b \
    --device $device --k 4 --batch-sizes 1,4,16 --prompts summarization:4 --max-new-tokens 24 \
    --out "$out/bench_random_cuda.json" 2>&1 | tail -25
for q in nf4 int8; do
  timeout 120 $py -m lab generate --target $rand/qwen2.5-coder-1.5b --target-quant $q --drafter layer-skip --k 3 \
      --device $device --compare-baseline --max-new-tokens 16 --prompt "Write a haiku about GPUs." 2>&1 | tail -6
done
step done
