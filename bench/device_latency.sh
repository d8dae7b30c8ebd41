#!/usr/bin/env bash
# Issue 5's latency goal (p50 <= 50 µs at 10k records/s) on a lent many-core machine, where
# the three processes a record passes (producer, worker, consumer) each have a core and may
# spin instead of sleeping.  Wheels as for bench/device_scale.sh (--fetch-wheels there); then
# one device call, ~4 minutes of running:
#     run(command="bash bench/device_latency.sh", carry=[".whl"], timeout_s=450)
# It prints the machine, the wake-up costs, a sweep of worker_spin_us/poll_spin_us pairs
# (bench/broker.py, 3 rounds) and shmbroker-bench's latency-10k workload without and with
# spinning (alternated, twice); logs and the sweep's JSON under $OUT.  Record them in bench/RESULTS.md.
set -euo pipefail

source bench/device_env.sh  # the wheels, PYTHONPATH, $out and machine.txt
python3 bench/wakeup.py --rounds 3 2>&1 | tee "$out/wakeup.log"
python3 bench/broker.py --modes "" --repeat 3 --latency-records 30000 \
    --spin-sweep 50/0,300/0,50/1000,300/1000,5000/5000 --json "$out/sweep.json" 2>&1 \
    | tee "$out/sweep.log"
for round in 1 2; do
    for spin in 0 5000; do
        options=()
        if [[ $spin != 0 ]]; then options=(--worker-spin-us "$spin" --poll-spin-us "$spin"); fi
        # (no --json per run: at most 8 files come back from a device call)
        python3 -m shmbroker.perf.cli --workload bench/workloads/latency-10k.toml \
            "${options[@]}" 2>&1 | tee -a "$out/latency.log"
    done
done
