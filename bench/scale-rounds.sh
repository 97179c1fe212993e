#!/bin/bash
# Interleaved rounds, before and after; a run during which another heavy process ran is marked dirty.
# Usage: bench/scale-rounds.sh BEFORE_RELEASE_DIR AFTER_RELEASE_DIR [LOG]   (as root; BENCHMARKS.md)
BEFORE=${1:?release build directory of the "before" commit}
AFTER=${2:?release build directory of the "after" commit}
out=${3:-bench/out/scale-rounds.txt}
mkdir -p "$(dirname "$out")"
: > $out
for round in 1 2 3 4 5 6; do
  if [ $((round % 2)) = 1 ]; then order="after before"; else order="before after"; fi
  for kind in scale single; do
  for which in $order; do
    if [ $which = before ]; then build=$BEFORE; else build=$AFTER; fi
    if [ $kind = scale ]; then args="--processes 1000 --busy 100 --bytes 33554432 --reference-cpu-per-gib 0.28"; else args="--processes 1 --busy 1 --bytes 2147483648 --reference-cpu-per-gib 0.28"; fi
    ( while true; do ps -eo pid=,args= | grep -E "swift-frontend|swift-build|swift-test|xctest|clang|ld\.gold|ld\.lld|swift-driver|dpkg|python3|holdfast-soak|runc " | grep -v grep | grep -v holdfast-bench | head -1; sleep 0.5; done ) > /tmp/watch.$$ 2>&1 &
    watcher=$!
    result=$(cd /tmp && "$build"/holdfast-bench scale $args 2>&1)
    kill $watcher; wait $watcher 2>/dev/null
    if [ -s /tmp/watch.$$ ]; then state=dirty; else state=clean; fi
    echo "=== round $round $kind $which $state $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)" >> $out
    [ $state = dirty ] && head -2 /tmp/watch.$$ >> $out
    echo "$result" | grep -E "aggregate throughput|broker CPU per GiB relayed|broker RSS|launching|bytes through" >> $out
    rm -f /tmp/watch.$$
  done
  done
done
echo DONE >> $out
