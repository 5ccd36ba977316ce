#!/usr/bin/env bash
# The GPU run of issue 13, as one script (a few minutes on one H100/H200-class machine).
#
#   bash loadtest/gpu_check.sh            # from the repository root, on the GPU machine
#
# Needs: python3 with a CUDA torch; the project's other dependencies either installed or
# as wheels in .whl/ (installed into /tmp/site, no index); FBGEMM (CPU build) for the
# embedding shards as wheels in .whl/fb/ (the first one whose ops load next to the torch
# there is used); a demo store in demo_store/ (built here if missing, ~1 min).
# Writes into $OUT (default /tmp/gpu_check): log.txt, pytest.txt, the P5 results
# (gpu_p5_cuda.* in-process pipeline, gpu_p5_servers_cuda.* real servers) and the
# servers' logs (servers.tgz).
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
t0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

stamp "environment"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    export PATH=/tmp/site/bin:$PATH
else
    export PYTHONPATH=$PWD
fi
for w in .whl/fb/*1.6.0* .whl/fb/*1.5.0* .whl/fb/*1.7.0* .whl/fb/*; do
    [ -f "$w" ] || continue
    rm -rf /tmp/fb && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fb "$w" \
        >/dev/null 2>&1 || continue
    if PYTHONPATH=/tmp/fb:$PYTHONPATH python3 -c "import torch, fbgemm_gpu
torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function" 2>/tmp/fb_err.txt; then
        export PYTHONPATH=/tmp/fb:$PYTHONPATH
        echo "FBGEMM for the shards: $(basename "$w")"
        break
    fi
    echo "FBGEMM $(basename "$w") does not load here: $(tail -1 /tmp/fb_err.txt)"
done
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max --format=csv
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
nproc

if [ ! -f demo_store/ads_ctr/v1/eval.jsonl ]; then
    stamp "building the demo store"
    timeout 240 python3 -m modelpack demo --store demo_store --quiet 2>&1 | tail -3
fi

stamp "tests on CUDA (tests/gpu and every gpu-marked test)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu tests/unit/test_dense.py 2>&1 \
    | tee "$OUT/pytest.txt" | tail -25

stamp "P5 in-process pipeline on CUDA (parity, syncs, launches, allocator)"
timeout 150 python3 -m loadtest.bench.gpu --store demo_store --device cuda \
    --saturation-s 3 --step-s 3 --out "$OUT/gpu_p5_cuda.json" 2>&1 | tail -15

stamp "P5 real servers on CUDA"
mkdir -p /tmp/p5_logs
timeout 330 python3 -m loadtest.bench.gpu_servers --store demo_store --device cuda \
    --log-dir /tmp/p5_logs ${GPU_SERVERS_ARGS:-} --out "$OUT/gpu_p5_servers_cuda.json" 2>&1 | tail -40
tar czf "$OUT/servers.tgz" -C /tmp p5_logs 2>/dev/null
stamp "done"
