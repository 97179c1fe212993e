#!/usr/bin/env bash
# Runs each fuzz target for SECONDS against its committed seed corpus (README "Fuzzing").
#   fuzz/run.sh BINARY SECONDS WORKDIR TARGET...
# New inputs go to WORKDIR/corpus/<target> (not the committed seeds), crashes to
# WORKDIR/artifacts/<target>/, the log to WORKDIR/logs/<target>.log. Exits non-zero if any
# target crashed, hung or ran out of memory; every target runs regardless.
set -u
binary=$1 seconds=$2 work=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
failed=()
printf '%-8s %10s %8s %8s %6s %s\n' target execs exec/s cov ft result
for target in "$@"; do
    mkdir -p "$work/corpus/$target" "$work/artifacts/$target" "$work/logs"
    log="$work/logs/$target.log"
    # The Swift runtime's backtracer would answer a trap before libFuzzer can save the input.
    HOLDFAST_FUZZ_TARGET=$target SWIFT_BACKTRACE=enable=no \
    ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:handle_abort=1} \
        "$binary" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -max_len=8192 \
        -print_final_stats=1 -artifact_prefix="$work/artifacts/$target/" -dict="$here/dict/$target.dict" \
        "$work/corpus/$target" "$here/corpus/$target" >"$log" 2>&1
    status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    if [ $status -eq 0 ]; then result=ok; else result="FAILED (exit $status; see $log)"; failed+=("$target"); fi
    printf '%-8s %10s %8s %8s %6s %s\n' "$target" "${execs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}" "$result"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found problems in: ${failed[*]} (inputs in $work/artifacts/)"
    for target in "${failed[@]}"; do ls "$work/artifacts/$target"; grep -m3 -E 'Fatal error|ERROR: |SUMMARY' "$work/logs/$target.log"; done
    exit 1
fi
