#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run: a lent GPU machine is held for minutes, so everything is
# prepared here and runs unattended, each step logged, a failed step not stopping the next.
#   1. tests/devices: the model and engine on CUDA against the CPU (float32), bfloat16, MTP speculation, decode steps
#      replayed from CUDA graphs, the expert bank's grouped matmuls, FP8 weights loaded on the device
#   2. bench/engine.py on CUDA: Tandem against transformers on the bundled model, batch 1, 8 and 32; then Tandem
#      with eager decode steps (no CUDA graphs), batch 1 and 32
#   3. the same on Moonlight-16B-A3B's shape (random bfloat16 weights), batch 1 and 64, Tandem only, with the
#      decode step against the memory-bandwidth bound; graphs, then eager
# Uses the Python that has torch (PYTHON, default python3) with the repository on PYTHONPATH: no install, as a
# bare GPU machine that reaches no package index has torch, numpy, safetensors, tokenizers and transformers.
# Results go to $OUT (the device tool's folder) or build/gpu-check: check.log and one results.json per run
# (throughput.png for the graphed runs), 7 files, as the device tool brings back at most 8.
set -uo pipefail
if [ $# -gt 0 ]; then  # --help, or anything else: it takes no arguments
    sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'
    [ "$1" = --help ] || [ "$1" = -h ]
    exit
fi
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu-check}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD/libs:$PWD" PYTHONUNBUFFERED=1
status=0

step() {  # step NAME COMMAND...: run, append to check.log, remember a failure
    local name=$1
    shift
    echo "=== $name: $*"
    local started=$SECONDS
    "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - started)) s"
    [ "$rc" -eq 0 ] || status=1
}

{
nvidia-smi
"$py" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda",
  torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")'
# --noconftest: tests/conftest.py serves the other suites and imports redis, which the GPU machine lacks
step tests "$py" -m pytest -q -rs --noconftest tests/devices
step engine "$py" bench/engine.py --device cuda --batch-sizes 1,8,32 --out "$out/engine"
step engine-eager "$py" bench/engine.py --device cuda --batch-sizes 1,32 --spec-tokens 0,2 --skip-transformers \
    --no-cuda-graphs --out "$out/engine-eager"
step moonlight "$py" bench/engine.py --random-preset moonlight --device cuda --batch-sizes 1,64 --spec-tokens 0 \
    --skip-transformers --out "$out/moonlight"
step moonlight-eager "$py" bench/engine.py --random-preset moonlight --device cuda --batch-sizes 1,64 \
    --spec-tokens 0 --skip-transformers --no-cuda-graphs --out "$out/moonlight-eager"
rm -f "$out/engine-eager/throughput.png" "$out/moonlight-eager/throughput.png"
exit "$status"  # of this group, a subshell (it feeds tee): the script exits with it below
} 2>&1 | tee "$out/check.log"
exit "${PIPESTATUS[0]}"
