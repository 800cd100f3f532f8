#!/usr/bin/env bash
# The GPU check: the must-show figures first (the training step against the example's loop in fp32, tf32 and
# bf16; triton against cuDNN per cell, eager and CUDA-graphed; the fast step's breakdown at 2x200), then the
# GPU tests, then the rest. Everything lands in OUT_DIR: bench JSON lines (*.jsonl), one log per part
# (*.log), the GPU tests' junit file (gpu-tests.xml), the profiles (profile-*/) and summary.txt (each part's
# outcome and seconds).
#
#   bash bench/gpu_check.sh OUT_DIR             # on a CUDA machine
#   bash bench/gpu_check.sh --dry-run OUT_DIR   # the same parts on CPU at toy sizes, in a minute or two (CI)
#
# The dry run hides any GPU and runs every command of the real run with tiny shapes and few repeats, so a
# flag or a code path the real run needs cannot rot unnoticed. Profiles use Wikitext-2 when
# FASTLM_WIKITEXT2 names it, else fastlm's generated corpus (said so in summary.txt).
# Time: the whole run has a budget (BUDGET_S, 330 s: one run and a shorter second one fit in 15 minutes of
# device time with the machine's start-up), and each part a limit of its own, so that no part can eat the
# parts after it. A part that would start with under 15 s left is skipped, and says so. PARTS="name ..."
# runs only the parts named (a second, shorter run after a fix: e.g. PARTS="gpu-tests bench-cells").
# Exit status: 0 when every part passed, 1 otherwise (the other parts run regardless).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
out="${1:?usage: bash bench/gpu_check.sh [--dry-run] OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
py="${PYTHON:-python}"

if (( dry )); then
    export CUDA_VISIBLE_DEVICES=""
    device=cpu budget=${BUDGET_S:-900} scale=4  # limits x4: the CPU is slow, and CI must not flake on them
    s200=6,3,16,16 s650=6,3,24,24 s1500=6,3,32,32 s1024=6,3,20,20 vocab=50
    timing=(--repeat 2 --warmup 1) cell_timing=(--repeat 2 --warmup 1)
    cell_backends=reference,cudnn  # triton runs interpreted on CPU, without bf16
    step_backends=reference  # the fast step on another backend; fast cudnn steps are in the unit tests
    launches=eager  # CUDA graphs need CUDA
    model=(--emsize 16 --nhid 16 --bptt 6 --batch-size 3) big=(--emsize 24 --nhid 24 --bptt 6 --batch-size 3)
    profile_steps=(--warmup 1 --steps 2 --trace-steps 1)
else
    device=cuda budget=${BUDGET_S:-330} scale=1
    s200=35,20,200,200 s650=35,20,650,650 s1500=35,20,1500,1500 s1024=35,20,1024,1024 vocab=33278
    timing=(--repeat 15 --warmup 5) cell_timing=(--repeat 10 --warmup 3)
    cell_backends=cudnn,triton
    step_backends=cudnn,triton
    launches=eager,graph
    model=(--emsize 200 --nhid 200) big=(--emsize 650 --nhid 650)
    profile_steps=(--warmup 5 --steps 20 --trace-steps 3)
fi
if [[ -n "${FASTLM_WIKITEXT2:-}" && -f "${FASTLM_WIKITEXT2}/train.txt" ]]; then
    data=(--data wikitext-2)
else
    data=(--data generated)
    echo "note: FASTLM_WIKITEXT2 is not set: profiles run on the generated corpus (its vocabulary is small)" \
        | tee -a "$out/summary.txt"
fi

status=0
part() {  # part NAME LIMIT_S COMMAND...: run within min(limit, budget left), log to NAME.log, record the outcome
    local name=$1 limit=$(( $2 * scale )); shift 2
    local start=$SECONDS left=$((budget - SECONDS))
    if [[ -n "${PARTS:-}" && " $PARTS " != *" $name "* ]]; then
        echo "$name: not in PARTS, not run" >> "$out/summary.txt"
        return
    fi
    if (( left < 15 )); then
        echo "$name: skipped, the ${budget} s budget is spent" | tee -a "$out/summary.txt"
        status=1
        return
    fi
    timeout "$(( left < limit ? left : limit ))" "$@" > "$out/$name.log" 2>&1
    local rc=$? outcome
    case $rc in
        0) outcome=passed ;;
        124) outcome="timed out after $(( left < limit ? left : limit )) s" ;;
        *) outcome="failed (exit $rc)" ;;
    esac
    echo "$name: $outcome in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    (( rc == 0 )) || status=1
}

echo "gpu_check $(date -u +%FT%TZ) dry_run=$dry budget=${budget}s git=$(git rev-parse --short HEAD 2>/dev/null || echo none)" \
    | tee -a "$out/summary.txt"
part environment 30 bash -c "nvidia-smi || true; $py -c 'import torch, fastlm.cells as c; \
print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.backends.cudnn.version()); \
print(c.available())'"

# 1. The headline: the training step against the example's loop (exact fp32), the fast step in fp32, tf32
#    and bf16, at 2x200 and 2x650 untied, then 2x1500 tied.
part bench-step 110 "$py" -m fastlm bench --mode step --cell lstm,gru --backend "$step_backends" \
    --shape "$s200" --shape "$s650" --precision fp32,tf32,bf16 --vocab "$vocab" --device "$device" "${timing[@]}" \
    --out "$out/step.jsonl"

# 2. The recurrent stacks: triton (per-step and persistent) against cuDNN, fwd and fwd+bwd, fp32 and bf16,
#    eager and as a CUDA graph (the graph's time is the kernels'; eager adds the host's launches).
part bench-cells 120 "$py" -m fastlm bench --mode fwd,fwdbwd --cell lstm,gru --backend "$cell_backends" \
    --variant per-step,persistent --shape "$s200" --shape "$s650" --precision fp32,bf16 --launch "$launches" \
    --device "$device" "${cell_timing[@]}" --out "$out/cells.jsonl"

# 3. Where the fast step's time goes at 2x200 (eager, so its phases show).
part profile-fast-200 45 "$py" -m fastlm profile --device "$device" "${data[@]}" "${model[@]}" \
    --no-cuda-graphs "${profile_steps[@]}" --out "$out/profile-fast-200"

# 4. The GPU tests (on CPU they all skip, saying why), each one's outcome listed (-rA) and in junit XML. The
#    Triton tile tuning is off in the test parts (FASTLM_TRITON_TUNE=0): each new shape would compile every
#    candidate, and parity does not depend on the tiles; the bench parts above tuned what users get.
export FASTLM_REQUIRED_BACKENDS=reference,cudnn,script,triton,compile
FASTLM_TRITON_TUNE=0 part gpu-tests 150 "$py" -m pytest -q -rA -p no:cacheprovider -m gpu --junitxml="$out/gpu-tests.xml" tests

# 5. Then what is left: the 2x1500 tied step, the semantic anchor and the whole parity suite on the GPU, the
#    adaptive decoder, and the other profiles. The dry run only collects the anchor and parity tests: CI runs
#    them on CPU anyway.
part bench-cells-large 60 "$py" -m fastlm bench --mode fwd,fwdbwd --cell lstm,gru --backend "$cell_backends" \
    --variant per-step,persistent --shape "$s1500" --precision fp32,bf16 --device "$device" "${cell_timing[@]}" \
    --out "$out/cells.jsonl"
part bench-cells-1x1024 45 "$py" -m fastlm bench --mode fwd,fwdbwd --cell lstm,gru --backend "$cell_backends" \
    --variant per-step,persistent --nlayers 1 --shape "$s1024" --precision fp32,bf16 --device "$device" \
    "${cell_timing[@]}" --out "$out/cells.jsonl"
part bench-step-tied 60 "$py" -m fastlm bench --mode step --cell lstm,gru --backend "$step_backends" --tied \
    --shape "$s1500" --precision fp32,tf32,bf16 --vocab "$vocab" --device "$device" "${timing[@]}" \
    --out "$out/step.jsonl"
if (( dry )); then
    part gpu-anchor-parity 60 "$py" -m pytest -q --collect-only tests/test_train_anchor.py tests/test_cells_parity.py
else
    FASTLM_TRITON_TUNE=0 part gpu-anchor-parity 120 "$py" -m pytest -q -rA -p no:cacheprovider --junitxml="$out/gpu-anchor-parity.xml" \
        tests/test_train_anchor.py tests/test_cells_parity.py \
        tests/test_cells_registry.py::test_backends_this_machine_must_have_are_available
fi
part bench-step-adaptive 30 "$py" -m fastlm bench --mode step --cell lstm --backend cudnn --decoder adaptive \
    --shape "$s200" --vocab "$vocab" --device "$device" "${timing[@]}" --out "$out/step-adaptive.jsonl"
part profile-example-200 45 "$py" -m fastlm profile --device "$device" "${data[@]}" "${model[@]}" \
    --step example "${profile_steps[@]}" --out "$out/profile-example-200"
part profile-fast-650 45 "$py" -m fastlm profile --device "$device" "${data[@]}" "${big[@]}" \
    --no-cuda-graphs "${profile_steps[@]}" --out "$out/profile-fast-650"
part profile-example-650 45 "$py" -m fastlm profile --device "$device" "${data[@]}" "${big[@]}" \
    --step example "${profile_steps[@]}" --out "$out/profile-example-650"

echo "gpu_check finished with status $status in $SECONDS s" | tee -a "$out/summary.txt"
exit $status
