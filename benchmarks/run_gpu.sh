#!/usr/bin/env bash
# On the GPU machine (device tool), after the wheel bundle's parts were moved to /tmp/bundle:
#   bash benchmarks/run_gpu.sh STAGE...     STAGE: tests | sync | sync1 | actor | judge | learner3b | learner7b | e2e | e2e1
# Installs the bundle once (/tmp/site), writes model assets once (/tmp/pr1-assets), runs the stages,
# logs and result JSON to $OUT (PR1_RESULTS_DIR; a job kept running across device calls: OUT=/tmp/..., copied out by a later call).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_ALLOW_INSECURE_SERIALIZATION=1 RAY_USAGE_STATS_ENABLED=0 MLFLOW_ALLOW_FILE_STORE=true MLFLOW_TRACKING_URI=file:///tmp/mlruns
out="${OUT:-/tmp/out}"; mkdir -p "$out"
export PR1_RESULTS_DIR="$out"  # result JSON straight to $out: the tree is replaced at each device call
. /tmp/bundle/install.sh /tmp/bundle /tmp/site > "$out/install.log" 2>&1 || { tail "$out/install.log"; exit 1; }
# .whl (carried): wheels the bundle lacks. Ray Serve imports grpc_reflection: grpcio-reflection 1.84.0, the
# version of the image's grpcio (1.84.0; a newer one refuses to import). pip download --no-deps into .whl/.
if [ -d .whl ] && [ ! -f /tmp/site-extra/.pr1-extra ]; then
    # a separate target: `pip --target --upgrade` replaces whole top-level folders (opentelemetry/)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-extra .whl/*.whl >> "$out/install.log" 2>&1 \
        && rm -rf /tmp/site-extra/opentelemetry/__init__.py && touch /tmp/site-extra/.pr1-extra
fi
export PYTHONPATH="$PWD:$PYTHONPATH:/tmp/site-extra"
[ -d /tmp/pr1-assets/vl7b ] || python3 -m benchmarks.assets /tmp/pr1-assets > "$out/assets.log" 2>&1
run() {  # run NAME SECONDS CMD...
    local name="$1" secs="$2"; shift 2; local t0=$(date +%s)
    echo "=== $name (limit ${secs}s)"
    ray stop --force > /dev/null 2>&1  # a stage killed at its limit leaves its cluster behind
    timeout "$secs" "$@" > "$out/$name.log" 2>&1; local rc=$?
    grep -E "passed|failed|Error|error|^[a-z_ ]+  |^[0-9]|ratio|wrote|mfu|GB|Traceback" "$out/$name.log" | grep -v -E "Warning|warn" | tail -n 30
    echo "=== $name rc=$rc in $(( $(date +%s) - t0 ))s"
}
for stage in "$@"; do
    case "$stage" in
        tests) run tests ${TESTS_LIMIT:-420} python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -k "${TESTS_K:-.}" ;;
        sync) run sync ${SYNC_LIMIT:-200} python3 -m benchmarks.bench_weight_sync /tmp/pr1-assets/vl7b --rounds 6 --eager ;;
        sync1) run sync1 ${SYNC_LIMIT:-300} python3 -m benchmarks.bench_weight_sync /tmp/pr1-assets/vl3b --rounds 4 --eager --colocated ;;
        e2e1) run e2e1 ${E2E_LIMIT:-560} python3 -m benchmarks.bench_async configs/gpu1-3b.yaml --staleness ${E2E_STALENESS:-0 2} --steps ${E2E_STEPS:-10} --name async_sync_1gpu_3b ${E2E_ARGS:-} ;;
        actor) run actor 560 python3 -m benchmarks.bench_vllm_actor /tmp/pr1-assets/vl7b --prompts ${ACTOR_PROMPTS:-192} --n 8 --max-tokens 2048 --eager ${ACTOR_ARGS---one-call} ;;
        learner3b) run learner3b 130 python3 -m benchmarks.bench_learner /tmp/pr1-assets/vl3b --gpus 1 ;;
        learner7b) run learner7b 400 python3 -m benchmarks.bench_learner /tmp/pr1-assets/vl7b --gpus 2 --groups 2 ;;
        e2e) run e2e 560 python3 -m benchmarks.bench_async configs/bench-2gpu-3b.yaml --staleness 0 2 --steps ${E2E_STEPS:-6} --name async_sync_2gpu_3b ;;
        judge) run judge 560 python3 -m benchmarks.bench_judge /tmp/pr1-assets --shapes ${JUDGE_SHAPES:-judge7b judge32b_awq} --verdicts 1024 ${JUDGE_ARGS:-} ;;
    esac
done
exit 0
