#!/usr/bin/env bash
# One run of everything fastlora checks on a GPU machine, under one time budget:
#
#   layout    the checkout has what the steps run
#   install   wheels the machine lacks (bitsandbytes), from .whl/ into .site/ (no network needed)
#   versions  python, torch, triton, bitsandbytes, peft, transformers, GPU, driver, commit
#   tests     the GPU-only tests: tests/test_gpu.py, and the GPU tests of test_host_path.py,
#             test_tuning.py and test_gpu_targets.py (pytest -rA, junit XML)
#   check     python -m fastlora check: numerics against PEFT + bitsandbytes and fp64, speed vs PEFT
#   tune      python -m fastlora tune --verify: first-use tuning of the Llama-3-8B projections from an
#             empty cache (its cost), each pick measured again against its candidates (within 5%?)
#   gemv      python -m benchmarks.bench_gemv: the frozen 4-bit product at M <= 16, GPU time of the GEMV
#             kernel, the tensor-core kernel, dequantize + cuBLAS, bitsandbytes and the bf16 floor
#   breakdown python -m benchmarks.host_breakdown: where a real eager layer call's host time goes
#   host      python -m benchmarks host: host µs per layer call, stubbed and on the real GPU; then per
#             layer of 8 chained layers (--stack 8)
#   bench     python -m benchmarks layer at the Llama-3-8B projections, every provider (what is left)
#
# Usage (from anywhere; it works in the repository root):
#   bash benchmarks/gpu_run.sh                 # on a GPU machine
#   bash benchmarks/gpu_run.sh --dry           # on any machine: each step in a form that needs no GPU
#   bash benchmarks/gpu_run.sh --out DIR --budget 540
#   bash benchmarks/gpu_run.sh --tar FILE      # also pack the output folder into FILE (.tgz) at the end
#
# Output folder: --out DIR, else benchmarks/results/gpu-<date>-<short commit>/ (a dry run:
# $TMPDIR/fastlora-gpu-dry-<date>-<short commit>/). Files: summary.md, setup.log, tests.log,
# tests.xml, check.log, check.jsonl, tune.log, gemv.log, gemv.jsonl, breakdown.log, host_breakdown.jsonl, host.log, host.jsonl, bench.log, layer.jsonl. summary.md
# is rewritten after every step, so a run cut short still says how far it got. Where $OUT is set and
# no --out is given (the GPU machine's folder, which returns eight files at most), the folder is a
# temporary one, packed at the end into $OUT/gpu-run.tgz, with summary.md beside it; --tar FILE packs
# it into FILE in any case.
#
# Time: the steps share --budget seconds (default $GPU_RUN_BUDGET, else 540); each runs under
# `timeout` with the smaller of its own cap and what is left, a step that runs out is recorded as
# "timeout" and the next one starts; a step is not started with less than MIN_STEP_S left.
#
# Environment: GPU_RUN_STEPS (comma list of the steps after versions to run; default
# tests,check,tune,gemv,breakdown,host,bench), GPU_RUN_WORKERS (pytest-xdist workers for the tests
# step where xdist is installed; default 8), PYTHON (default python3), GPU_RUN_WHEELS (default .whl), GPU_RUN_SITE (default .site),
# BENCH_M (default 16,512,2048,8192), BENCH_AUTOCAST (default bf16,off), TUNE_M (default 16,2048), GEMV_M (default
# 1,4,8,16), FASTLORA_COMMIT (the
# commit to record where the checkout has no .git; default: git rev-parse HEAD).
#
# Exit status: 0 when every step passed (or was skipped because nothing needed doing), else 1;
# 2 for a usage error.

set -uo pipefail

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2

dry=0
out_arg=""
tar_arg=""
budget="${GPU_RUN_BUDGET:-540}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry) dry=1 ;;
        --out) [ $# -ge 2 ] || { echo "gpu_run: --out needs a folder" >&2; exit 2; }; out_arg="$2"; shift ;;
        --out=*) out_arg="${1#--out=}" ;;
        --tar) [ $# -ge 2 ] || { echo "gpu_run: --tar needs a file" >&2; exit 2; }; tar_arg="$2"; shift ;;
        --tar=*) tar_arg="${1#--tar=}" ;;
        --budget) [ $# -ge 2 ] || { echo "gpu_run: --budget needs seconds" >&2; exit 2; }; budget="$2"; shift ;;
        --budget=*) budget="${1#--budget=}" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_run: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
case "$budget" in
    ''|*[!0-9]*) echo "gpu_run: --budget must be whole seconds, got '$budget'" >&2; exit 2 ;;
esac

PY="${PYTHON:-python3}"
wheels="${GPU_RUN_WHEELS:-$root/.whl}"
site="${GPU_RUN_SITE:-$root/.site}"
bench_m="${BENCH_M:-16,512,2048,8192}"
tune_m="${TUNE_M:-16,2048}"
bench_autocast="${BENCH_AUTOCAST:-bf16,off}"

# per-step caps (seconds); later steps get what is left of the budget
CAP_SETUP=120
CAP_TESTS=200
CAP_CHECK=120
CAP_TUNE=110
CAP_HOST=80
CAP_HOST_STACK=60    # the host step's second run: per layer of 8 chained layers
CAP_BREAKDOWN=90
CAP_GEMV=120
MIN_STEP_S=20
KILL_AFTER_S=15      # a step that ignores SIGTERM is killed this long after its limit

# the GPU tests outside tests/test_gpu.py, by node id (a renamed test fails the dry run's collection)
GPU_TESTS=(
    tests/test_gpu.py
    tests/test_host_path.py::test_split_k_in_kernel_sum_is_deterministic_on_gpu
    tests/test_host_path.py::test_cuda_graph_capture_replays_like_eager
    tests/test_host_path.py::test_host_seed_reproduced_under_checkpoint_rng_restore
    tests/test_partials.py::test_gpu_capture_allocates_its_own_and_merged_equals_alone
    tests/test_tuning.py::test_gpu_pick_is_within_5_percent_of_the_best_measured_again
    tests/test_tuning.py::test_gpu_first_call_tunes_and_writes_the_cache
    tests/test_gpu_targets.py::test_compiled_for_own_target_equals_real_launch
    tests/test_offload.py::test_gpu_pinned_copies_and_lower_peak
    tests/test_offload.py::test_survives_later_gradient_checkpointing_enable
    tests/test_patch.py::test_fallback_bf16_below_sm80
    tests/test_patch.py::test_fallback_fp32_products_on_sm100_with_old_triton
    tests/test_lora_linear.py::test_bf16_below_sm80_is_a_clear_error
    tests/test_check.py::test_speed_rows_and_table
    tests/test_device_guard.py::test_launchers_name_their_tensors_device
    tests/test_gemv.py
    tests/test_nibble_decode.py
    tests/test_lora_linear.py::test_tokens
    tests/test_lora_linear.py::test_dropout_and_bias
)
steps="${GPU_RUN_STEPS:-tests,check,tune,gemv,breakdown,host,bench}"
wants() { case ",$steps," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
workers="${GPU_RUN_WORKERS:-8}"

commit="${FASTLORA_COMMIT:-}"
dirty=""
if [ -z "$commit" ]; then
    commit="$(git -C "$root" rev-parse HEAD 2>/dev/null || true)"
    if [ -n "$commit" ] && [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        dirty=" (uncommitted changes)"
    fi
fi
commit="${commit:-unknown}"
[ "$commit" = unknown ] || export FASTLORA_COMMIT="$commit"   # fastlora's records read it
short="${commit:0:7}"
stamp="$(date -u +%Y%m%d-%H%M%S)"

if [ -n "$out_arg" ]; then
    out="$out_arg"
elif [ -n "${OUT:-}" ]; then
    out="$(mktemp -d "${TMPDIR:-/tmp}/fastlora-gpu-run.XXXXXX")/gpu-$stamp-$short"
    [ -n "$tar_arg" ] || tar_arg="$OUT/gpu-run.tgz"
elif [ "$dry" = 1 ]; then
    out="${TMPDIR:-/tmp}/fastlora-gpu-dry-$stamp-$short"
else
    out="$root/benchmarks/results/gpu-$stamp-$short"
fi
mkdir -p "$out" || exit 2
out="$(cd "$out" && pwd)"

mode="gpu"
if [ "$dry" = 1 ]; then
    mode="dry (no GPU needed: each step in its CPU form)"
else
    unset TRITON_INTERPRET      # compiled kernels: the interpreter is for machines without a GPU
fi
start=$SECONDS
started_at="$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
versions_md="(not read yet)"
names=() statuses=() secs=() logs=() notes=()

export PYTHONUNBUFFERED=1
cache_dir="$(mktemp -d "${TMPDIR:-/tmp}/fastlora-gpu-cache.XXXXXX")"   # fastlora's tuning cache, this run's
tune_cache="$(mktemp -d "${TMPDIR:-/tmp}/fastlora-gpu-tune.XXXXXX")"   # empty: the tune step's first-use cost
finish() {
    rm -rf "$cache_dir" "$tune_cache"
    if [ -n "$tar_arg" ]; then
        mkdir -p "$(dirname "$tar_arg")" && tar czf "$tar_arg" -C "$(dirname "$out")" "$(basename "$out")" \
            && cp "$out/summary.md" "$(dirname "$tar_arg")/" 2>/dev/null
    fi
}
trap finish EXIT

say() { printf '%s\n' "$*" | tee -a "$out/setup.log"; }

left() { echo $(( budget - (SECONDS - start) )); }

write_summary() {
    local i
    {
        echo "# fastlora GPU run"
        echo
        echo "- started: $started_at"
        echo "- mode: $mode"
        echo "- commit: $commit$dirty"
        echo "- budget: ${budget} s, used: $(( SECONDS - start )) s"
        echo "- output: $out"
        echo
        echo "## Device and versions"
        echo
        echo "$versions_md"
        echo
        echo "## Steps"
        echo
        echo "| step | status | seconds | files | notes |"
        echo "|---|---|---|---|---|"
        for i in "${!names[@]}"; do
            echo "| ${names[$i]} | ${statuses[$i]} | ${secs[$i]} | ${logs[$i]} | ${notes[$i]//|/\\|} |"
        done
    } > "$out/summary.md"
}

record() {   # record NAME STATUS SECONDS FILES NOTES
    names+=("$1") statuses+=("$2") secs+=("$3") logs+=("$4") notes+=("${5:-}")
    printf '%s\n' "-- $1: $2 (${3}s)"
    write_summary
}

# run_step NAME CAP LOG CMD...: CMD under `timeout`, its output appended to LOG (and shown); sets
# step_rc and step_status; records nothing (the caller adds notes and records)
run_step() {
    local name="$1" cap="$2" log="$3" remaining limit t0
    shift 3
    remaining=$(( $(left) - KILL_AFTER_S ))
    limit=$cap
    [ "$remaining" -lt "$limit" ] && limit=$remaining
    step_secs=0
    if [ "$limit" -lt "$MIN_STEP_S" ]; then
        step_rc=125
        step_status="skipped: budget spent ($(left) s left)"
        printf '== %s: %s\n' "$name" "$step_status" >> "$out/$log"
        return
    fi
    printf '\n== %s (limit %d s): %s\n' "$name" "$limit" "$*" | tee -a "$out/$log"
    t0=$SECONDS
    timeout --kill-after="$KILL_AFTER_S" "$limit" "$@" 2>&1 | tee -a "$out/$log"
    step_rc=${PIPESTATUS[0]}
    step_secs=$(( SECONDS - t0 ))
    case "$step_rc" in
        0) step_status="ok" ;;
        124|137) step_status="timeout (${limit} s)" ;;
        *) step_status="failed (exit $step_rc)" ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# layout: the files the steps run, the tools they need
# ---------------------------------------------------------------------------------------------
check_layout() {
    local f missing=0
    for f in tests/conftest.py tests/helpers.py tests/test_gpu.py tests/test_host_path.py tests/test_tuning.py \
             tests/test_gpu_targets.py fastlora/__init__.py fastlora/check.py kernels/lora_matmul.py \
             benchmarks/__main__.py benchmarks/bench_layer.py; do
        if [ ! -f "$root/$f" ]; then echo "missing: $f"; missing=1; fi
    done
    for f in timeout tee "$PY"; do
        if ! command -v "$f" >/dev/null 2>&1; then echo "missing command: $f"; missing=1; fi
    done
    echo "root: $root"
    echo "python: $(command -v "$PY") ($("$PY" --version 2>&1))"
    return "$missing"
}

t0=$SECONDS
say "== layout"
if check_layout >> "$out/setup.log" 2>&1; then
    record layout ok $(( SECONDS - t0 )) setup.log
else
    record layout "failed: see setup.log" $(( SECONDS - t0 )) setup.log
    tail -n 20 "$out/setup.log"
    exit 1
fi

# ---------------------------------------------------------------------------------------------
# install: the wheels carried in .whl/ (a dry run points at an empty folder: nothing to install)
# ---------------------------------------------------------------------------------------------
if [ "$dry" = 1 ]; then
    wheels="$(mktemp -d "${TMPDIR:-/tmp}/fastlora-gpu-nowheels.XXXXXX")"
fi
shopt -s nullglob
whls=("$wheels"/*.whl)
shopt -u nullglob
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if [ "${#whls[@]}" -eq 0 ]; then
    say "== install: no wheels in $wheels"
    record install "skipped: no wheels in $wheels" 0 setup.log "$([ "$dry" = 1 ] && echo "dry run: an empty folder")"
else
    run_step install "$CAP_SETUP" setup.log "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$site" "${whls[@]}"
    if [ "$step_rc" = 0 ]; then
        export PYTHONPATH="$site:$PYTHONPATH"
    fi
    record install "$step_status" "$step_secs" setup.log "${#whls[@]} wheel(s) into $site"
fi
[ "$dry" = 1 ] && rmdir "$wheels" 2>/dev/null

# ---------------------------------------------------------------------------------------------
# versions
# ---------------------------------------------------------------------------------------------
VERSIONS_PY='
import importlib, importlib.metadata as md, os, platform, sys
print(f"- python: {platform.python_version()} ({sys.executable}), {platform.machine()}")
for name in ("torch", "triton", "bitsandbytes", "peft", "transformers"):
    try:
        line = md.version(name)
    except md.PackageNotFoundError:
        line = "not installed"
    if os.environ.get("IMPORT_CHECK") == "1" and line != "not installed":
        try:
            importlib.import_module(name)
        except Exception as exc:
            line += f", but not importable ({type(exc).__name__}: {exc})"
    print(f"- {name}: {line}")
import torch
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"- gpu {i}: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2**30:.1f} GiB; CUDA runtime {torch.version.cuda}")
else:
    print("- gpu: none (torch.cuda.is_available() is False)")
'
t0=$SECONDS
say "== versions"
# on the GPU machine each package is imported too (a wheel that installed but cannot load shows here)
versions_md="$(IMPORT_CHECK=$(( 1 - dry )) timeout "$CAP_SETUP" "$PY" -c "$VERSIONS_PY" 2>&1)"
vrc=$?
driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
versions_md="$versions_md
- driver: ${driver:-n/a (no nvidia-smi)}"
say "$versions_md"
say "- commit: $commit$dirty"
if [ "$vrc" = 0 ]; then
    record versions ok $(( SECONDS - t0 )) setup.log
else
    record versions "failed (exit $vrc)" $(( SECONDS - t0 )) setup.log
fi

if [ "$dry" = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    record gpu "failed: no CUDA device (use --dry on a machine without a GPU)" 0 setup.log
    exit 1
fi

# ---------------------------------------------------------------------------------------------
# tests: the GPU-only tests (a dry run collects them: every node id must exist)
# ---------------------------------------------------------------------------------------------
if ! wants tests; then
    record tests "skipped (GPU_RUN_STEPS)" 0 -
else
    if [ "$dry" = 1 ]; then
        run_step tests "$CAP_TESTS" tests.log "$PY" -m pytest --collect-only -q "${GPU_TESTS[@]}"
        note="$(grep -E '^[0-9]+ tests? collected' "$out/tests.log" | tail -n 1)"
        record tests "$step_status" "$step_secs" tests.log "collect-only: ${note:-no count}"
    else
        rm -f "$out/tests.xml"
        xdist=()
        if [ "$workers" -gt 1 ] && "$PY" -c 'import xdist' 2>/dev/null; then
            xdist=(-n "$workers")
        fi
        run_step tests "$CAP_TESTS" tests.log "$PY" -m pytest -rA --durations=25 --junitxml="$out/tests.xml" \
            "${xdist[@]}" "${GPU_TESTS[@]}"
        note=""
        if [ -f "$out/tests.xml" ]; then
            note="$("$PY" - "$out/tests.xml" 2>/dev/null <<'PY'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")
PY
)"
        fi
        record tests "$step_status" "$step_secs" "tests.log, tests.xml" "${note:-no junit XML}"
    fi
fi

# ---------------------------------------------------------------------------------------------
# check: fastlora check (numerics vs PEFT + bitsandbytes and fp64; on a GPU, speed vs PEFT)
# ---------------------------------------------------------------------------------------------
if ! wants check; then
    record check "skipped (GPU_RUN_STEPS)" 0 -
else
    if [ "$dry" = 1 ]; then
        run_step check "$CAP_CHECK" check.log "$PY" -m fastlora check --help
        record check "$step_status" "$step_secs" check.log "--help only"
    else
        FASTLORA_CACHE_DIR="$cache_dir" run_step check "$CAP_CHECK" check.log "$PY" -m fastlora check --out "$out"
        note="$(grep -E '^verdict:' "$out/check.log" | tail -n 1)"
        record check "$step_status" "$step_secs" "check.log, check.jsonl" "${note:-no verdict line}"
    fi
fi

# ---------------------------------------------------------------------------------------------
# tune: fastlora tune from an empty cache at the Llama-3-8B projections (what first use costs), then
# every entry's candidates measured again: is the pick within 5% of the best?
# ---------------------------------------------------------------------------------------------
if ! wants tune; then
    record tune "skipped (GPU_RUN_STEPS)" 0 -
else
    if [ "$dry" = 1 ]; then
        run_step tune "$CAP_TUNE" tune.log "$PY" -m fastlora tune --dry-run --model llama3-8b --m "$tune_m"
        record tune "$step_status" "$step_secs" tune.log "--dry-run: the candidates for sm_90"
    else
        FASTLORA_CACHE_DIR="$tune_cache" run_step tune "$CAP_TUNE" tune.log "$PY" -m fastlora tune --model llama3-8b \
            --m "$tune_m" --verify 0.5
        note="$(grep -E 'entries in|^verify:' "$out/tune.log" | tr '\n' ' ')"
        record tune "$step_status" "$step_secs" tune.log "${note:-no summary line}"
    fi
fi

# ---------------------------------------------------------------------------------------------
# gemv: the frozen 4-bit product at a few tokens, every way to compute it, GPU time side by side
# ---------------------------------------------------------------------------------------------
if ! wants gemv; then
    record gemv "skipped (GPU_RUN_STEPS)" 0 -
elif [ "$dry" = 1 ]; then
    run_step gemv "$CAP_GEMV" gemv.log "$PY" -m benchmarks.bench_gemv --help
    record gemv "$step_status" "$step_secs" gemv.log "--help only"
else
    FASTLORA_CACHE_DIR="$cache_dir" run_step gemv "$CAP_GEMV" gemv.log "$PY" -m benchmarks.bench_gemv \
        --m "${GEMV_M:-1,4,8,16}" --out "$out"
    record gemv "$step_status" "$step_secs" "gemv.log, gemv.jsonl"
fi

# ---------------------------------------------------------------------------------------------
# breakdown: where a real eager layer call's host time goes (by subtraction: launches as no-ops,
# autograd's device thread off, each launch alone, single pieces)
# ---------------------------------------------------------------------------------------------
if ! wants breakdown; then
    record breakdown "skipped (GPU_RUN_STEPS)" 0 -
elif [ "$dry" = 1 ]; then
    run_step breakdown "$CAP_BREAKDOWN" breakdown.log "$PY" -m benchmarks.host_breakdown --help
    record breakdown "$step_status" "$step_secs" breakdown.log "--help only"
else
    FASTLORA_CACHE_DIR="$cache_dir" run_step breakdown "$CAP_BREAKDOWN" breakdown.log "$PY" -m \
        benchmarks.host_breakdown --m 1,16 --reps 200 --out "$out"
    record breakdown "$step_status" "$step_secs" "breakdown.log, host_breakdown.jsonl"
fi

# ---------------------------------------------------------------------------------------------
# host: host µs per layer call, fastlora and PEFT side by side (stubbed launches on meta tensors for
# this GPU's target, then the real eager call on the GPU)
# ---------------------------------------------------------------------------------------------
if ! wants host; then
    record host "skipped (GPU_RUN_STEPS)" 0 -
else
    if [ "$dry" = 1 ]; then
        run_step host "$CAP_HOST" host.log "$PY" -m benchmarks host --help
        record host "$step_status" "$step_secs" host.log "--help only"
    else
        arch="$("$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"sm_{p.major}{p.minor}")' 2>/dev/null)"
        FASTLORA_CACHE_DIR="$cache_dir" run_step host "$CAP_HOST" host.log "$PY" -m benchmarks host --m 16 \
            --strategy auto --reps 100 --target "${arch:-sm_90}" --out "$out"
        host_status="$step_status" host_secs="$step_secs"
        # the same per layer of 8 chained layers (one backward for all, as in a model), appended
        FASTLORA_CACHE_DIR="$cache_dir" run_step host "$CAP_HOST_STACK" host.log "$PY" -m benchmarks host --m 1,16 \
            --stack 8 --adapters autocast --strategy auto --reps 50 --target "${arch:-sm_90}" --out "$out"
        record host "$host_status; stack 8: $step_status" "$(( host_secs + step_secs ))" "host.log, host.jsonl" \
            "target ${arch:-sm_90}"
    fi
fi

# ---------------------------------------------------------------------------------------------
# bench: the layer benchmark at the Llama-3-8B projections (every provider, r = 16, dropout 0.05,
# the adapters under bf16 autocast first); its own budget stops it starting cases in time for the
# case in hand and the model's records to finish inside the step's limit
# ---------------------------------------------------------------------------------------------
if ! wants bench; then
    record bench "skipped (GPU_RUN_STEPS)" 0 -
else
    records_before=0
    [ -f "$out/layer.jsonl" ] && records_before="$(wc -l < "$out/layer.jsonl" | tr -d ' ')"
    if [ "$dry" = 1 ]; then
        run_step bench 300 bench.log "$PY" -m benchmarks layer --smoke --family tiny --proj q_proj --m 16 --r 4 \
            --autocast bf16 --providers fastlora-fused --modes forward+backward --no-model --out "$out"
    else
        bench_limit=$(( $(left) - KILL_AFTER_S ))
        bench_budget=$(( bench_limit - 60 ))
        [ "$bench_budget" -lt 10 ] && bench_budget=10
        FASTLORA_CACHE_DIR="$cache_dir" run_step bench "$bench_limit" bench.log "$PY" -m benchmarks layer \
            --family llama3-8b --m "$bench_m" --r 16 --dropout 0.05 --autocast "$bench_autocast" \
            --budget-seconds "$bench_budget" --out "$out"
    fi
    records=0
    [ -f "$out/layer.jsonl" ] && records="$(wc -l < "$out/layer.jsonl" | tr -d ' ')"
    note="$(( records - records_before )) new records in layer.jsonl"
    [ "$dry" = 1 ] && note="smoke (CPU interpreter): $note"
    record bench "$step_status" "$step_secs" "bench.log, layer.jsonl" "$note"
fi

# ---------------------------------------------------------------------------------------------
write_summary
echo
cat "$out/summary.md"
for st in "${statuses[@]}"; do
    case "$st" in
        ok|skipped:\ no\ wheels*|skipped\ \(GPU_RUN_STEPS\)) ;;
        *) exit 1 ;;
    esac
done
exit 0
