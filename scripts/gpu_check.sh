#!/usr/bin/env bash
# The GPU checks in one command: the CUDA tests (pytest -m cuda) and the GPU benchmarks of
# docs/benchmarks.md (the MLP step-time ratio on one GPU; ResNet-20 bf16 samples/s without and
# with trainer.compile), ending with a Markdown summary to paste into docs/benchmarks.md.
# Extra arguments go to pytest. BENCH_ROUNDS (default 16) sets the benchmarks' rounds.
# Exit status: 0 when everything passed, 1 when a test or benchmark failed, 2 without a GPU.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
set +e  # a failed step is reported in the summary, not by stopping here

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU: torch $(python -c 'import torch; print(torch.__version__)') in $repo/.venv" \
         "sees none (torch.cuda.is_available() is false). On a GPU machine, install a CUDA build of torch" \
         "into .venv first; scripts/setup.sh keeps it." >&2
    exit 2
fi

logs="$(mktemp -d "${TMPDIR:-/tmp}/distsgd-gpu-check.XXXXXX")"
rounds="${BENCH_ROUNDS:-16}"
failed=0

echo "== pytest -m cuda (log: $logs/pytest.log)"
python -m pytest -m cuda -v "$@" 2>&1 | tee "$logs/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
tests="$(grep -E '^=+ .*(passed|failed|skipped|error).* in [0-9.]+s' "$logs/pytest.log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')"

# name|arguments of scripts/bench.py, as docs/benchmarks.md lists them
benches=(
    "mlp|--device cuda --steps 300"
    "resnet20_bf16|--device cuda --job resnet20 --steps 200 trainer.precision=bf16"
    "resnet20_bf16_compile|--device cuda --job resnet20 --steps 200 trainer.precision=bf16 trainer.compile=true"
)
for bench in "${benches[@]}"; do
    name="${bench%%|*}"
    read -r -a args <<< "${bench#*|}"
    echo "== scripts/bench.py ${args[*]} --rounds $rounds (log: $logs/$name.log)"
    python scripts/bench.py "${args[@]}" --rounds "$rounds" 2>&1 | tee "$logs/$name.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
done

# The lines bench.py ends with; "(failed: see the log)" where a run did not get that far.
result() {  # result LOG PATTERN SED-EXPRESSION
    local line
    line="$(grep -E "$2" "$logs/$1.log" | tail -n 1)"
    if [ -n "$line" ]; then sed -E "$3" <<< "$line"; else echo "(failed: see $logs/$1.log)"; fi
}
ratio="$(result mlp '^distsgd/minimal: ' 's/^distsgd\/minimal: //')"
mlp_rate="$(result mlp '^samples/s \(global\)' 's/^samples\/s \(global\): //')"
distsgd_rate='s/^samples\/s \(global\): distsgd ([0-9,]*[0-9]).*/\1/'
plain="$(result resnet20_bf16 '^samples/s \(global\)' "$distsgd_rate")"
compiled="$(result resnet20_bf16_compile '^samples/s \(global\)' "$distsgd_rate")"

gpu="$(python -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB)")')"
versions="$(python -c 'import platform, torch; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), Python {platform.python_version()}")')"
driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
if commit="$(git rev-parse --short HEAD 2>/dev/null)"; then
    git diff --quiet HEAD || commit="$commit + local changes"
else
    commit=unknown
fi

cat <<EOF

## Results: GPU

Machine: $gpu${driver:+, driver $driver}; $versions. distsgd at commit \`$commit\` ($(date +%Y-%m-%d)).
Produced by \`scripts/gpu_check.sh\` ($rounds rounds per benchmark).

| check | result |
| --- | --- |
| \`pytest -m cuda\` | ${tests:-(no summary: see $logs/pytest.log)} |
| MLP, 1 GPU, 300 steps: distsgd/minimal step time | $ratio |
| MLP, 1 GPU: samples/s (global) | $mlp_rate |
| ResNet-20, bf16, 1 GPU: distsgd samples/s | $plain |
| ResNet-20, bf16, \`trainer.compile=true\`, 1 GPU: distsgd samples/s | $compiled |

The ResNet-20 rows give distsgd's rate only: the minimal loop of scripts/bench.py runs in fp32 and
eager, so its ratio there does not compare like with like. Logs: \`$logs\`.
EOF
exit "$failed"
