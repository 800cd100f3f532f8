#!/usr/bin/env bash
# The GPU check: spends a rare, short GPU session on what only a GPU can tell, in that order, and cannot hang.
# A session has 15 minutes of device time for two runs (the machine's start and fastlm's install included):
#   RUN=1 (default, BUDGET_S 330 s): the Triton kernels' GPU tests, persistent first; a smoke run of the
#         persistent kernels on a tiny grid (the first execution of the grid barrier, under a short limit);
#         then the headline figures, with the Triton tiles untuned (FASTLM_TRITON_TUNE=0: the heuristic
#         table): the training step against the example's loop in fp32, tf32 and bf16 at 2x200 and 2x650,
#         triton (per-step, persistent) against cuDNN, eager and graphed, and the fast step's breakdown.
#   RUN=2 (BUDGET_S 240 s): the cells figures again with the tiles tuned, the other GPU tests, the anchor and
#         parity suites on the GPU, then the larger shapes and the other breakdowns as far as time allows.
# Every part's time limit is a share of its run's budget (part NAME PERCENT COMMAND), so each part keeps its
# place whatever the budget, and none eats the parts after it; a part that would start with under 15 s left
# is skipped and says so. A part that hangs is killed at its limit (SIGTERM, SIGKILL 10 s later). Tests run
# verbose (-v: each test's name is logged before it runs, so a killed part still says where it was), one test
# at most TEST_LIMIT_S, with a junit file. If the smoke run fails, the later parts time the per-step kernels
# only (--variant per-step), and summary.txt says so. PARTS="name ..." runs only the parts named (a rerun
# after a fix, in either run). Everything lands in OUT_DIR: bench JSON lines (*.jsonl), one log per part
# (*.log), junit files (*.xml), the profiles (profile-*/) and summary.txt (each part's outcome and seconds).
#
#   bash bench/gpu_check.sh OUT_DIR             # on a CUDA machine; RUN=2 for the second run
#   bash bench/gpu_check.sh --dry-run OUT_DIR   # both runs' parts on CPU at toy sizes, in a few minutes (CI)
#
# The dry run hides any GPU and runs every command of both real runs with tiny shapes and few repeats, so a
# flag or a code path the real runs need cannot rot unnoticed; its parts have 300 s each (a loaded CPU). Profiles use Wikitext-2 when FASTLM_WIKITEXT2
# names it, else fastlm's generated corpus (said so in summary.txt).
# Exit status: 0 when every part passed, 1 otherwise (the other parts run regardless).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
out="${1:?usage: bash bench/gpu_check.sh [--dry-run] OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
py="${PYTHON:-python}"
run=${RUN:-1}
[[ "$run" == 1 || "$run" == 2 ]] || { echo "gpu_check: RUN must be 1 or 2, not '$run'" >&2; exit 2; }

if (( dry )); then
    export CUDA_VISIBLE_DEVICES=""
    device=cpu budget=${BUDGET_S:-1800} dry_limit=300  # CI's patience for both runs' parts, not a GPU's time
    test_limit=${TEST_LIMIT_S:-300}
    s200=6,3,16,16 s650=6,3,24,24 s1500=6,3,32,32 s1024=6,3,20,20 vocab=50 smoke=3,2,16,16
    timing=(--repeat 2 --warmup 1) cell_timing=(--repeat 2 --warmup 1)
    cell_backends=reference,cudnn  # triton runs interpreted on CPU, without bf16
    step_backends=reference  # the fast step on another backend; fast cudnn steps are in the unit tests
    launches=eager  # CUDA graphs need CUDA
    smoke_precisions=fp32  # the interpreter has no bf16 (numpy), and no TF32
    model=(--emsize 16 --nhid 16 --bptt 6 --batch-size 3) big=(--emsize 24 --nhid 24 --bptt 6 --batch-size 3)
    profile_steps=(--warmup 1 --steps 2 --trace-steps 1)
else
    device=cuda budget=${BUDGET_S:-$(( run == 1 ? 330 : 240 ))} dry_limit=0
    test_limit=${TEST_LIMIT_S:-60}
    s200=35,20,200,200 s650=35,20,650,650 s1500=35,20,1500,1500 s1024=35,20,1024,1024 vocab=33278
    smoke=4,2,32,32  # H = 32: two programs, so three grid barriers a direction
    timing=(--repeat 10 --warmup 3) cell_timing=(--repeat 10 --warmup 3)
    cell_backends=cudnn,triton
    step_backends=cudnn,triton
    launches=eager,graph
    smoke_precisions=fp32,tf32,bf16
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
part() {  # part NAME PERCENT COMMAND...: run within PERCENT of the budget (never past it), log to NAME.log
    local name=$1 limit=$(( dry ? dry_limit : budget * $2 / 100 )); shift 2
    local start=$SECONDS left=$(( budget - SECONDS ))
    if [[ -n "${PARTS:-}" && " $PARTS " != *" $name "* ]]; then
        echo "$name: not in PARTS, not run" >> "$out/summary.txt"
        return
    fi
    if (( left < 15 )); then
        echo "$name: skipped, the ${budget} s budget is spent" | tee -a "$out/summary.txt"
        status=1
        return
    fi
    (( limit > left )) && limit=$left
    timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$? outcome
    case $rc in
        0) outcome=passed ;;
        124|137) outcome="timed out after $limit s" ;;
        *) outcome="failed (exit $rc)" ;;
    esac
    echo "$name: $outcome in $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/summary.txt"
    (( rc == 0 )) || status=1
    return $rc
}
per_test=()  # pytest-timeout ends a hung test (and, by thread, its process) with the stacks in the log
if "$py" -c "import pytest_timeout" 2>/dev/null; then
    per_test=(--timeout "$test_limit" --timeout-method thread)
else
    echo "note: pytest-timeout is not installed: a hung test ends only at its part's limit" | tee -a "$out/summary.txt"
fi
gpu_tests() {  # gpu_tests NAME PERCENT PYTEST_ARGS...: the tests named, verbose, each within test_limit
    local name=$1 share=$2; shift 2
    part "$name" "$share" "$py" -m pytest -v -p no:cacheprovider "${per_test[@]}" --junitxml="$out/$name.xml" "$@"
}

sha=$(git rev-parse --short HEAD 2>/dev/null || echo none)
echo "gpu_check $(date -u +%FT%TZ) run=$run dry_run=$dry budget=${budget}s git=$sha" | tee -a "$out/summary.txt"
export FASTLM_REQUIRED_BACKENDS=reference,cudnn,script,triton,compile
triton_tests=(tests/test_triton_persistent.py tests/test_triton_kernels.py)
variants=per-step,persistent step_variant=auto  # what the figures time; per-step only if the smoke run fails

if (( dry || run == 1 )); then
    export FASTLM_TRITON_TUNE=0  # run 1: the heuristic tiles, no tuning compiles (run 2 tunes)
    part environment 3 bash -c "nvidia-smi || true; $py -c 'import torch, triton, fastlm.cells as c; \
print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.backends.cudnn.version(), \
triton.__version__); print(c.available())'"

    # 1. What only a GPU can tell about the Triton kernels, first: their GPU tests, the persistent ones first
    #    (multi-program parity, the barrier, the fallback, CUDA graphs). On CPU they all skip, saying why.
    gpu_tests gpu-tests-triton 24 -m gpu "${triton_tests[@]}"

    # 2. The persistent kernels once on a tiny grid, before any figure relies on them (auto picks them).
    if ! part smoke-persistent 8 "$py" -m fastlm bench --mode fwdbwd --cell lstm,gru --backend triton \
            --variant persistent --shape "$smoke" --precision "$smoke_precisions" --launch eager --repeat 1 \
            --warmup 0 --device "$device" --out "$out/smoke.jsonl"; then
        variants=per-step step_variant=per-step
        echo "note: the persistent smoke run failed: the later parts time the per-step kernels only" \
            | tee -a "$out/summary.txt"
    fi

    # 3. The headline: the training step against the example's loop (exact fp32), the fast step in fp32, tf32
    #    and bf16 at 2x200 and 2x650 untied; the stacks, triton against cuDNN; where the fast step's time goes.
    part bench-step 23 "$py" -m fastlm bench --mode step --cell lstm,gru --backend "$step_backends" \
        --variant "$step_variant" --shape "$s200" --shape "$s650" --precision fp32,tf32,bf16 --vocab "$vocab" \
        --device "$device" "${timing[@]}" --out "$out/step.jsonl"
    part bench-cells 26 "$py" -m fastlm bench --mode fwd,fwdbwd --cell lstm,gru --backend "$cell_backends" \
        --variant "$variants" --shape "$s200" --shape "$s650" --precision fp32,bf16 --launch "$launches" \
        --device "$device" "${cell_timing[@]}" --out "$out/cells.jsonl"
    part profile-fast-200 10 "$py" -m fastlm profile --device "$device" "${data[@]}" "${model[@]}" \
        --no-cuda-graphs "${profile_steps[@]}" --out "$out/profile-fast-200"
    unset FASTLM_TRITON_TUNE
fi

if (( dry || run == 2 )); then
    # 4. The stacks again with the per-step tiles tuned (each shape compiles its candidates once; rows record
    #    the tiles, "tuned"), then the other GPU tests, then what is left, as far as the budget goes.
    part bench-cells-tuned 40 "$py" -m fastlm bench --mode fwd,fwdbwd --cell lstm,gru --backend "$cell_backends" \
        --variant per-step --shape "$s200" --shape "$s650" --precision fp32,bf16 --launch "$launches" \
        --device "$device" "${cell_timing[@]}" --out "$out/cells-tuned.jsonl"
    export FASTLM_TRITON_TUNE=0  # the tests' parity does not depend on the tiles
    gpu_tests gpu-tests 20 -m gpu --continue-on-collection-errors tests \
        $(printf -- '--ignore %s ' "${triton_tests[@]}")
    if (( dry )); then  # CI runs these suites on CPU anyway: only collect them
        part gpu-anchor-parity 15 "$py" -m pytest -q --collect-only tests/test_train_anchor.py \
            tests/test_cells_parity.py
    else
        gpu_tests gpu-anchor-parity 15 tests/test_train_anchor.py tests/test_cells_parity.py \
            tests/test_cells_registry.py::test_backends_this_machine_must_have_are_available
    fi
    unset FASTLM_TRITON_TUNE
    part profile-example-200 6 "$py" -m fastlm profile --device "$device" "${data[@]}" "${model[@]}" \
        --step example "${profile_steps[@]}" --out "$out/profile-example-200"
    part bench-cells-1x1024 6 "$py" -m fastlm bench --mode fwd,fwdbwd --cell lstm,gru --backend "$cell_backends" \
        --variant "$variants" --nlayers 1 --shape "$s1024" --precision fp32,bf16 --device "$device" \
        "${cell_timing[@]}" --out "$out/cells.jsonl"
    part bench-cells-large 5 "$py" -m fastlm bench --mode fwd,fwdbwd --cell lstm,gru --backend "$cell_backends" \
        --variant "$variants" --shape "$s1500" --precision fp32,bf16 --device "$device" "${cell_timing[@]}" \
        --out "$out/cells.jsonl"
    part bench-step-tied 5 "$py" -m fastlm bench --mode step --cell lstm,gru --backend "$step_backends" --tied \
        --shape "$s1500" --precision fp32,tf32,bf16 --vocab "$vocab" --device "$device" "${timing[@]}" \
        --out "$out/step.jsonl"
    part profile-fast-650 4 "$py" -m fastlm profile --device "$device" "${data[@]}" "${big[@]}" \
        --no-cuda-graphs "${profile_steps[@]}" --out "$out/profile-fast-650"
    part profile-example-650 4 "$py" -m fastlm profile --device "$device" "${data[@]}" "${big[@]}" \
        --step example "${profile_steps[@]}" --out "$out/profile-example-650"
    part bench-step-adaptive 3 "$py" -m fastlm bench --mode step --cell lstm --backend cudnn --decoder adaptive \
        --shape "$s200" --vocab "$vocab" --device "$device" "${timing[@]}" --out "$out/step-adaptive.jsonl"
fi

echo "gpu_check finished with status $status in $SECONDS s" | tee -a "$out/summary.txt"
exit $status
