#!/usr/bin/env bash
# The GPU checks in one command: the CUDA tests (pytest -m cuda) and the GPU benchmarks of
# docs/benchmarks.md (the MLP step-time ratio on one GPU; ResNet-20 bf16 samples/s without and
# with trainer.compile; experiment=gpt_small for 300 steps, bf16 and compiled, its tokens/s and
# MFU), ending with a Markdown summary to paste into docs/benchmarks.md.
#
#   scripts/gpu_check.sh --prepare        # where PyPI is reachable: wheels into .whl/ (see below)
#   scripts/gpu_check.sh [PYTEST ARGS]    # on the GPU machine, offline: install, tests, benchmarks
#   scripts/gpu_check.sh --install-only   # the install step and its check alone
#
# The check runs the python3 that holds a CUDA build of torch (PYTHON=... names another), as it
# is: no venv, no download. distsgd comes from this checkout through PYTHONPATH, so torch is never
# reinstalled. What that python lacks of distsgd's pure-Python dependencies (a GPU image often has
# torch, numpy, tensorboard, matplotlib, scikit-learn and pytest, but not hydra-core, omegaconf or
# antlr4-python3-runtime) is installed with pip --no-index from the wheels that --prepare put in
# .whl/ (GPU_CHECK_WHEELS=DIR for another folder), into a temporary folder put on PYTHONPATH.
# Through a device tool that copies only tracked files, carry .whl/ along (it is git-ignored).
#
# Time: each step has a limit (LIMITS below), about 10 minutes in all, so that the whole check
# fits the 15 minutes of a lent GPU with its start-up; a step that runs out is reported as timed out, and the summary is
# printed whatever failed (also on SIGTERM). BENCH_ROUNDS (default 6) sets the benchmarks' rounds.
# GPU_CHECK_LOGS=DIR keeps the logs there (default: a new temporary folder).
# Exit status: 0 when everything passed, 1 when a test or benchmark failed or timed out, 2 without
# a GPU, 3 when the install or its check failed.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py="${PYTHON:-python3}"
wheels="${GPU_CHECK_WHEELS:-$repo/.whl}"
# The versions the CPU suite runs with. antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 needs)
# is only an sdist on PyPI: --prepare builds its wheel, which is pure Python like the others.
PINS=(hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3)
# Seconds per step: install, pytest, and the three benchmarks in the order of `benches` below.
declare -A LIMITS=([install]=60 [pytest]=170 [mlp]=50 [resnet20_bf16]=70 [resnet20_bf16_compile]=140 [gpt_small]=150)

prepare() {
    # --python-version: the wheels are for the GPU machine's Python 3.12, whatever runs this.
    local pip=("${PREPARE_PYTHON:-python3}" -m pip)
    mkdir -p "$wheels" || return 1
    "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$wheels" "${PINS[@]:0:2}" || return 1
    "${pip[@]}" wheel -q --no-deps -w "$wheels" "${PINS[2]}" || return 1
    echo "gpu_check: wheels for the GPU machine in $wheels:" && ls "$wheels"
}

install() {  # puts distsgd and whatever it lacks on PYTHONPATH; the check: import distsgd.train, compose the config
    if ! "$py" -c "import hydra, omegaconf" 2>/dev/null; then
        if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
            echo "gpu_check: $py lacks hydra-core and no wheels are in $wheels: run scripts/gpu_check.sh --prepare" \
                 "where PyPI is reachable, and bring that folder along" >&2
            return 1
        fi
        site="$(mktemp -d "${TMPDIR:-/tmp}/distsgd-gpu-check-site.XXXXXX")"
        # --find-links with the pins: the pinned files of the folder, whatever else it holds.
        timeout "${LIMITS[install]}" "$py" -m pip install -q --no-index --find-links "$wheels" --no-deps --no-compile \
            --no-cache-dir --target "$site" "${PINS[@]}" || return 1
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    timeout "${LIMITS[install]}" "$py" -m distsgd.train --cfg job trainer.device=cpu >/dev/null || return 1
    "$py" -c 'import importlib.metadata, distsgd, hydra; print("gpu_check: distsgd from", distsgd.__file__ + ", hydra-core",
                                                               hydra.__version__, "from", hydra.__file__ + ", torch",
                                                               importlib.metadata.version("torch"))'
}

case "${1:-}" in
    --prepare) prepare; exit ;;
    --install-only) install || exit 3; exit 0 ;;
esac
install || exit 3

if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU: torch $("$py" -c 'import torch; print(torch.__version__)') of $py sees none" \
         "(torch.cuda.is_available() is false). Run it with the python that holds a CUDA build of torch: PYTHON=..." >&2
    exit 2
fi

logs="${GPU_CHECK_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/distsgd-gpu-check.XXXXXX")}"
mkdir -p "$logs"
rounds="${BENCH_ROUNDS:-6}"
failed=0
current=pytest
declare -A status=()

step() {  # step NAME COMMAND...: runs it under its limit, logs to $logs/NAME.log, records how it ended
    local name="$1" code
    shift
    current="$name"
    echo "== $* (limit ${LIMITS[$name]} s; log: $logs/$name.log)"
    timeout --kill-after=10 "${LIMITS[$name]}" "$@" 2>&1 | tee "$logs/$name.log"
    code="${PIPESTATUS[0]}"
    case "$code" in
        0) status[$name]=passed ;;
        124|137) status[$name]="timed out after ${LIMITS[$name]} s"; failed=1 ;;
        *) status[$name]="failed (exit $code)"; failed=1 ;;
    esac
}

result() {  # result NAME PATTERN SED-EXPRESSION: the line bench.py ends with, or how the step ended
    local line
    line="$(grep -E "$2" "$logs/$1.log" 2>/dev/null | tail -n 1)"
    if [ -n "$line" ]; then sed -E "$3" <<< "$line"; else echo "(${status[$1]:-not run}: see $logs/$1.log)"; fi
}

summary() {
    trap - EXIT
    local tests ratio mlp_rate plain compiled gpt gpu versions driver commit distsgd_rate
    tests="$(grep -E '^=+ .*(passed|failed|skipped|error).* in [0-9.]+s' "$logs/pytest.log" 2>/dev/null | tail -n 1 |
             sed -E 's/^=+ //; s/ =+$//')"
    ratio="$(result mlp '^distsgd/minimal: ' 's/^distsgd\/minimal: //')"
    mlp_rate="$(result mlp '^samples/s \(global\)' 's/^samples\/s \(global\): //')"
    distsgd_rate='s/^samples\/s \(global\): distsgd ([0-9,]*[0-9]).*/\1/'
    plain="$(result resnet20_bf16 '^samples/s \(global\)' "$distsgd_rate")"
    compiled="$(result resnet20_bf16_compile '^samples/s \(global\)' "$distsgd_rate")"
    gpt="$(result gpt_small 'done: 300 steps' 's/.*train\/mfu ([^,]*),.*train\/tokens_per_sec ([^,]*),.*/\2 tokens\/s, MFU \1/')"
    gpu="$("$py" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB)")' 2>/dev/null)"
    versions="$("$py" -c 'import platform, torch; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), Python {platform.python_version()}")')"
    driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
    if commit="$(git rev-parse --short HEAD 2>/dev/null)"; then
        git diff --quiet HEAD || commit="$commit + local changes"
    else
        commit="${GPU_CHECK_COMMIT:-unknown}"
    fi
    cat <<EOF

## Results: GPU

Machine: $gpu${driver:+, driver $driver}; $versions. distsgd at commit \`$commit\` ($(date +%Y-%m-%d)).
Produced by \`scripts/gpu_check.sh\` ($rounds rounds per benchmark).

| check | result |
| --- | --- |
| \`pytest -m cuda\` | ${tests:-(${status[pytest]:-not run}: see $logs/pytest.log)} |
| MLP, 1 GPU, 300 steps: distsgd/minimal step time | $ratio |
| MLP, 1 GPU: samples/s (global) | $mlp_rate |
| ResNet-20, bf16, 1 GPU: distsgd samples/s | $plain |
| ResNet-20, bf16, \`trainer.compile=true\`, 1 GPU: distsgd samples/s | $compiled |
| \`experiment=gpt_small\` (byte-level, 85M), 16 x 1024 tokens per step, bf16, compiled, 1 GPU: steps 250-299 | $gpt |

The ResNet-20 rows give distsgd's rate only: the minimal loop of scripts/bench.py runs in fp32 and
eager, so its ratio there does not compare like with like. Logs: \`$logs\`.
EOF
    exit "$failed"
}
trap summary EXIT
trap 'status[$current]=interrupted; failed=1; exit' TERM INT

# A test module that needs what the GPU machine lacks (an Optuna sweep, say) costs its own tests only.
step pytest "$py" -m pytest -m cuda -v --continue-on-collection-errors "$@"
# name|arguments of scripts/bench.py, as docs/benchmarks.md lists them
benches=(
    "mlp|--device cuda --steps 300"
    "resnet20_bf16|--device cuda --job resnet20 --steps 200 trainer.precision=bf16"
    "resnet20_bf16_compile|--device cuda --job resnet20 --steps 200 trainer.precision=bf16 trainer.compile=true"
)
for bench in "${benches[@]}"; do
    read -r -a args <<< "${bench#*|}"
    step "${bench%%|*}" "$py" scripts/bench.py "${args[@]}" --rounds "$rounds"
done
# GPT-2 small's shape on data=text's embedded corpus; the rates of the last 50 steps (train/* of
# step 299, past the compilation), in the run's closing line. Validation only at the ends.
step gpt_small "$py" -m distsgd.train experiment=gpt_small trainer.device=cuda trainer.max_steps=300 \
    data.global_batch_size=16 trainer.accumulate=1 schedule.warmup_steps=30 trainer.log_every=50 \
    trainer.val_every=1000 trainer.checkpoint_every=0 "hydra.run.dir=$logs/gpt_small_run"
