#!/usr/bin/env bash
# The GPU check: the GPU tests, the bench matrix (cells and the training step, fp32 and bf16) and profile
# breakdowns, in under 8 minutes on one H100. Everything lands in OUT_DIR: bench JSON lines (*.jsonl), one
# log per part (*.log), the profiles (profile-*/) and summary.txt (each part's exit status and seconds).
#
#   bash bench/gpu_check.sh OUT_DIR             # on a CUDA machine
#   bash bench/gpu_check.sh --dry-run OUT_DIR   # the same parts on CPU at toy sizes, in a minute or two (CI)
#
# The dry run hides any GPU and runs every command of the real run with tiny shapes and few repeats, so a
# flag or a code path the real run needs cannot rot unnoticed. Profiles use Wikitext-2 when
# FASTLM_WIKITEXT2 names it, else fastlm's generated corpus (said so in summary.txt). Each part has a time
# limit and the whole run a budget (BUDGET_S, 460 s): a part that would start with under 20 s left is
# skipped, and says so. Exit status: 0 when every part passed, 1 otherwise (the other parts run regardless).
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
    device=cpu limit=300 budget=${BUDGET_S:-900}
    s200=6,3,16,16 s650=6,3,24,24 s1500=6,3,32,32 vocab=50
    timing=(--repeat 2 --warmup 1)
    cell_backends=reference,cudnn,script  # triton runs interpreted on CPU, without bf16
    step_backends=script  # oneDNN's CPU LSTM has no bf16 here; fast cudnn steps are in the unit tests
    model=(--emsize 16 --nhid 16 --bptt 6 --batch-size 3) big=(--emsize 24 --nhid 24 --bptt 6 --batch-size 3)
    profile_steps=(--warmup 1 --steps 2 --trace-steps 1)
else
    device=cuda limit=240 budget=${BUDGET_S:-460}
    s200=35,20,200,200 s650=35,20,650,650 s1500=35,20,1500,1500 vocab=33278
    timing=(--repeat 20 --warmup 5)
    cell_backends=reference,cudnn,script,triton
    step_backends=cudnn,triton
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
part() {  # part NAME COMMAND...: run with a time limit, log to NAME.log, record the outcome in summary.txt
    local name=$1; shift
    local start=$SECONDS left=$((budget - SECONDS))
    if (( left < 20 )); then
        echo "$name: skipped, the ${budget} s budget is spent" | tee -a "$out/summary.txt"
        status=1
        return
    fi
    timeout "$(( left < limit ? left : limit ))" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    (( rc == 0 )) || status=1
}

echo "gpu_check $(date -u +%FT%TZ) dry_run=$dry git=$(git rev-parse --short HEAD 2>/dev/null || echo none)" \
    | tee -a "$out/summary.txt"
part environment bash -c "nvidia-smi || true; $py -c 'import torch, fastlm.cells as c; \
print(torch.__version__, torch.version.cuda, torch.cuda.is_available()); print(c.available())'"

# 1. The training step against the example's loop, first as it gives the headline numbers: 2x200 and
#    2x650 untied, 2x1500 tied, fp32 and bf16.
part bench-step "$py" -m fastlm bench --mode step --cell lstm,gru --backend "$step_backends" \
    --shape "$s200" --shape "$s650" --dtype fp32,bf16 --vocab "$vocab" --device "$device" "${timing[@]}" \
    --out "$out/step.jsonl"
part bench-step-tied "$py" -m fastlm bench --mode step --cell lstm,gru --backend "$step_backends" --tied \
    --shape "$s1500" --dtype fp32,bf16 --vocab "$vocab" --device "$device" "${timing[@]}" \
    --out "$out/step.jsonl"

# 2. The GPU tests (on CPU they all skip, saying why), then the semantic anchor and the whole parity suite on
#    the GPU (every backend against the reference and the example's recipe, on CUDA). -rA lists every test's
#    outcome. The dry run only collects the second part: CI runs those files on CPU anyway.
export FASTLM_REQUIRED_BACKENDS=reference,cudnn,script,triton,compile
part gpu-tests "$py" -m pytest -q -rA -m gpu tests
if (( dry )); then
    part gpu-anchor-parity "$py" -m pytest -q --collect-only tests/test_train_anchor.py tests/test_cells_parity.py
else
    part gpu-anchor-parity "$py" -m pytest -q -rA tests/test_train_anchor.py tests/test_cells_parity.py \
        tests/test_cells_registry.py::test_backends_this_machine_must_have_are_available
fi

# 3. The recurrent stacks: fwd and fwd+bwd against cudnn, fp32 and bf16, the example's three sizes.
part bench-cells "$py" -m fastlm bench --mode fwd,fwdbwd --cell lstm,gru --backend "$cell_backends" \
    --shape "$s200" --shape "$s650" --shape "$s1500" --dtype fp32,bf16 --device "$device" "${timing[@]}" \
    --out "$out/cells.jsonl"

# 4. The adaptive softmax (opt-in, a different model): its step time at 2x200.
part bench-step-adaptive "$py" -m fastlm bench --mode step --cell lstm --backend cudnn --decoder adaptive \
    --shape "$s200" --vocab "$vocab" --device "$device" "${timing[@]}" --out "$out/step-adaptive.jsonl"

# 5. Where the time goes: the fast step (eager, so its phases show) and the example's, at 2x200 and 2x650.
if "$py" -m fastlm profile --help > /dev/null 2>&1; then
    for size in 200 650; do
        if [[ $size == 200 ]]; then dims=("${model[@]}"); else dims=("${big[@]}"); fi
        part "profile-fast-$size" "$py" -m fastlm profile --device "$device" "${data[@]}" "${dims[@]}" \
            --no-cuda-graphs "${profile_steps[@]}" --out "$out/profile-fast-$size"
        part "profile-example-$size" "$py" -m fastlm profile --device "$device" "${data[@]}" "${dims[@]}" \
            --step example "${profile_steps[@]}" --out "$out/profile-example-$size"
    done
else
    echo "profile: skipped, this checkout has no 'fastlm profile'" | tee -a "$out/summary.txt"
fi

echo "gpu_check finished with status $status in $SECONDS s" | tee -a "$out/summary.txt"
exit $status
