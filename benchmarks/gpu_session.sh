#!/usr/bin/env bash
# One GPU session, in stages: install the offline kit, check, build Transformer Engine's torch extension,
# and time the variants. Each call of the lent GPU machine runs some stages:
#
#   bash benchmarks/gpu_session.sh setup tests bench-local      # first call: kit part 1 carried in .kit/p1
#   bash benchmarks/gpu_session.sh join bench-step-local ...     # later calls: the next part of the TE core
#
# The kit (.kit/, git-ignored, see tools/wheelhouse) holds wheels, the transformer_engine_torch sdist and
# the TE core library as xz parts small enough to carry one per call. Everything lands in /tmp (kept while
# the machine is held); results and logs go to $OUT (or results/gpu when OUT is unset).
set -uo pipefail
[ "${1:-}" = build-te ] || cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT" /tmp/kit /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

log() { echo "[$(date +%T)] $*"; }

stage_setup() {
    cp -r .kit/p1/. /tmp/kit/
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/kit/*.whl
    tar xzf /tmp/kit/te_py.tgz -C /tmp/site  # TE core's Python files and dist-info; its library comes in parts
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
    python3 - <<'EOF' | tee -a "$OUT/gpu.txt"
import importlib.metadata as md, torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for p in ("megatron-core", "nvidia-modelopt", "transformers", "triton", "pydantic"):
    print(p, md.version(p))
# the two ceilings (METHOD.md): a large bf16 matmul and a device-to-device copy, random data
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
x = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)
y = torch.empty_like(x)
for name, fn, work in (("matmul TFLOP/s", lambda: a @ b, 2 * 8192**3 / 1e12),
                       ("copy GB/s (read+write)", lambda: y.copy_(x), 2 * x.numel() * 2 / 1e9)):
    for _ in range(3):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        fn()
    e.record(); torch.cuda.synchronize()
    print(name, round(work * 10 / (s.elapsed_time(e) / 1e3), 1))
EOF
    # Build TE's torch extension in the background (its own session, so it outlives this call).
    # bash reads a script as it runs: run a copy, which later calls cannot replace under it.
    cp "$0" /tmp/gpu_session.sh
    setsid nohup bash /tmp/gpu_session.sh build-te > /tmp/te_build.log 2>&1 < /dev/null &
    log "TE torch extension build started"
}

stage_build-te() {
    # transformer_engine_torch has no wheel on PyPI: build its C++ extension (g++ only) from the sdist.
    mkdir -p /tmp/tebuild && tar xzf /tmp/kit/transformer_engine_torch-*.tar.gz -C /tmp/tebuild
    cd /tmp/tebuild/transformer_engine_torch-*
    # setup.py imports wheel.bdist_wheel, which newer `wheel` releases moved into setuptools
    sed -i 's/^from wheel.bdist_wheel import bdist_wheel as _bdist_wheel$/try:\n    from wheel.bdist_wheel import bdist_wheel as _bdist_wheel\nexcept ImportError:\n    from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel/' setup.py
    CPLUS_INCLUDE_PATH=$(ls -d "$SITE"/nvidia/*/include | tr '\n' ':') NVTE_FRAMEWORK=pytorch \
        NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=16 \
        python3 -m pip install -v --no-build-isolation --no-deps --no-index --no-compile --target /tmp/te_torch . \
        && cp -r /tmp/te_torch/. /tmp/site/ && echo TE_BUILD_OK
}

stage_join() {
    # Kit parts carried by later calls: .kit/pN/lib.xz.partNN
    for d in .kit/p*/; do cp -n "$d"/lib.xz.part* /tmp/kit/ 2>/dev/null; done
    ls -la /tmp/kit | tee "$OUT/kit.txt"
}

stage_te-install() {
    (cd /tmp/kit && sha256sum -c lib.xz.sha256) || return 1
    cat /tmp/kit/lib.xz.part* | xz -d > /tmp/site/transformer_engine/wheel_lib/libtransformer_engine.so
    for _ in $(seq 120); do grep -q "TE_BUILD_OK\|error:" /tmp/te_build.log && break; sleep 5; done
    tail -5 /tmp/te_build.log
    python3 -c "import transformer_engine.pytorch as te, transformer_engine; print('TE', transformer_engine.__version__)" \
        2>&1 | tail -3 | tee "$OUT/te_import.txt"
}

stage_tests() {
    # Single-process tests with CUDA visible (the GPU path), then tests/gpu; spawned gloo worlds hide CUDA.
    timeout 420 python3 -m pytest tests/unit tests/gpu -q -p no:cacheprovider --maxfail 15 --timeout 120 2>&1 \
        | tail -40 > "$OUT/tests.log"
    tail -5 "$OUT/tests.log"
}

stage_tests-te() {
    timeout 300 python3 -m pytest tests/gpu -q -p no:cacheprovider -s 2>&1 | tail -30 > "$OUT/tests_te.log"
    tail -8 "$OUT/tests_te.log"
}

bench() {  # name, then train_step.py arguments
    local name=$1; shift
    python3 benchmarks/train_step.py --out "$OUT/$name.json" "$@" 2>&1 | grep -v Warning | tail -30 > "$OUT/$name.log"
    tail -22 "$OUT/$name.log"
}

stage_bench-local() {
    bench train_local --presets 0.5b 1.5b --seqs 1024 4096 --train local-megatron local-sdpa --score bf16 modelopt-fp8
}

stage_bench-te() {
    bench train_te --presets 1.5b 0.5b --seqs 4096 1024 --train te-bf16 te-fp8-delayed te-fp8-tensorwise \
        --score te-bf16 te-fp8
}

stage_bench-vocab() {
    python3 benchmarks/vocab_parallel.py --vocab 152064 --tokens 8192 --tp 1 --hidden 1536 \
        --out "$OUT/vocab_parallel.json" 2>&1 | tail -6 | tee "$OUT/vocab_parallel.log"
    [ -f benchmarks/sampler.py ] && python3 benchmarks/sampler.py --device cuda --out "$OUT/sampler.json" 2>&1 \
        | tail -12 | tee "$OUT/sampler.log"
}

step() {  # name, then gndpo_step.py arguments
    local name=$1; shift
    timeout 400 python3 benchmarks/gndpo_step.py --out "$OUT/$name.json" "$@" 2>&1 | grep -v Warning | tail -12 \
        > "$OUT/$name.log"
    tail -9 "$OUT/$name.log"
}

stage_bench-step-local() {
    step step_local --student 0.5b --teacher 1.5b --impl local --prompts 8 --samples 8 --prompt-len 256 \
        --max-new 512 --micro-batch 8
}

stage_bench-step-te() {
    step step_te --student 0.5b --teacher 1.5b --impl transformer_engine --prompts 8 --samples 8 --prompt-len 256 \
        --max-new 512 --micro-batch 8
}

for stage in "$@"; do
    log "== $stage"
    "stage_$stage"
done
log "done"
