#!/usr/bin/env bash
# The one script a GPU session runs to measure pruning on a GPU: DeiT-S/16 and ViT-B/16 (random
# init, offline), unpruned and EViT, the layer-wise routing and ToMe r=13 (the other two matched to ToMe's 59% of the
# FLOPs), timed side by side in one process, in the order of what matters most first:
#   1. float32 logits of the eager and CUDA-graph paths (default reducers) against the eager PyTorch reference;
#   2. bfloat16, batches 1, 64, 256, 1024: CUDA graph, eager, then regional torch.compile + CUDA graph (compiles);
#   3. bfloat16 CUDA graph with the lean reducers (fused; measured slower than the reference on 4 Dec 2026);
#   4. compile time of every routing from a cold cache (regional compile + CUDA graph, bf16, batch 64);
#   5. float32 logits of the compiled path against the reference;
#   6. float32, CUDA graph, batches 1, 64, 256.
# A step is started only while under --budget_s (330 s), so the run ends in about 6 minutes even when compilation is
# slow; what has run is rewritten after every step to throughput_gpu.partial.json, and a failing step is recorded
# under "errors" without stopping the run. throughput_gpu.json is written only when every step ran and every check
# passed; otherwise the partial file holds the run (and its errors), and it is the one summarized.
#
# Run it through the device tool, from the repository root. The machine's python3 has torch and timm but not
# jsonargparse (attnprune.cli needs it): carry its wheel in .whl (ignored through .git/info/exclude), fetched here with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl jsonargparse`; attnprune is imported from
# the working tree. BUDGET_S (default 330) and TIMEOUT_S (default 500) shorten a run:
#
#     run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=560)
#
# then give the machine back. It writes $OUT/throughput_gpu.json and $OUT/throughput_gpu.log (under
# benchmarks/results/ when OUT is unset). Back here:
#
#     cp <files_at>/throughput_gpu.json benchmarks/results/throughput_gpu.json
#     .venv/bin/python benchmarks/throughput.py --summarize benchmarks/results/throughput_gpu.json   # README table
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${OUT:-benchmarks/results}
mkdir -p "$out_dir"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$python" -c "import torch, timm, triton, jsonargparse; print('torch', torch.__version__, 'timm', timm.__version__, 'triton', triton.__version__, 'jsonargparse', jsonargparse.__version__)"
    timeout "${TIMEOUT_S:-500}" "$python" benchmarks/throughput.py --device cuda \
        --models deit_small_patch16_224 vit_base_patch16_224 --tome_r 13 \
        --warmup 3 --repeats 10 --budget_s "${BUDGET_S:-330}" \
        --step check:eager,cudagraph \
        --step time:bfloat16:cudagraph:1,64,256,1024 \
        --step time:bfloat16:eager:1,64,256,1024 \
        --step time:bfloat16:regional-cudagraph:1,64,256,1024 \
        --step time:bfloat16:cudagraph:1,64,256,1024:fused \
        --step compile:regional-cudagraph:64:bfloat16 \
        --step check:regional \
        --step time:float32:cudagraph:1,64,256 \
        --out "$out_dir/throughput_gpu.json"
    echo "exit status $?"
    result="$out_dir/throughput_gpu.json"
    [ -f "$result" ] || result="$out_dir/throughput_gpu.partial.json"
    "$python" benchmarks/throughput.py --summarize "$result"
} 2>&1 | tee "$out_dir/throughput_gpu.log"
