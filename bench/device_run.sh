#!/usr/bin/env bash
# Issue 5's many-core figures in one call on a lent device machine (the workplace's `device`
# tool: 16 cores), so that a session drawn for one spends its device minutes once.
#
# Here, once per session (the wheels are ignored by git and travel with `carry`; that machine
# has Python 3.12 with numpy, psutil and click, and fetches nothing):
#     echo /.whl/ >> .git/info/exclude
#     bash bench/device_run.sh --fetch-wheels
# Then one device call, ~5 minutes of running (each step is capped; at most 8 files return):
#     run(command="bash bench/device_run.sh", carry=[".whl"], timeout_s=560)
# or other steps: `bash bench/device_run.sh scale scale-off`.  Steps (default: scale, latency,
# durable; in session 11 a run took ~14 s at 16 cores, start and drain included):
#   scale      shmbroker-bench scale 1,2,4,8, columnar, 3 rounds of 6 s (the defaults: the
#              append check thread on, as `auto` gives it with >= 4 CPUs)
#   scale-off  the same with worker_check_thread=off (session 11: on was as fast with one
#              partition and ahead with four)
#   scale-big  the same with 1 MiB batches of 10,000-record send_batch calls
#              (bench/workloads/big-batches.toml's settings; session 12: 1.7x one partition's
#              rate on the 2-core machine, half the CPU a record), 2 rounds
#   latency    bench/broker.py's latency scenario (10k records/s), worker/consumer not spinning
#              and spinning 5 ms, 3 rounds; then latency-10k.toml plain and spinning (the
#              broker's stall warnings, if any, are in device.log)
#   trace      bench/latency_trace.py, 3 rounds plain and 3 with worker and consumer spinning
#              5 ms (and those again with direct reads off): each record's latency cut into
#              stages (send, to the worker, append, to the fetch answer, to the consumer) and
#              the consumer's fetch cycle (~20 s each)
#   tail       latency-10k.toml alone, 3 runs of 8 s: the slowest second of each beside the
#              clients' pauses (garbage collections, late sends) and the broker's stall
#              warnings, to put the p99 tail on a process
#   disk       bench/write_stalls.py: the longest small append of each second on the temp
#              dir's filesystem (and on /dev/shm), with and without an fsync a second; the
#              mounts and the kernel's writeback settings
#   tail-shm   as tail, two runs, with the embedded broker's data dir on /dev/shm (tmpfs)
#   durable    bench/durable.py: the durable-1k workload against dd conv=fdatasync, 2 rounds
#   stalls     the big-batch sweep at 1 and 8 partitions, one round, its workers' stall warnings
#              kept in stalls.log and counted (each names its part: copying, checking, writing
#              the segment files, rolling segments; session 16 found 61-150 ms rolls at 8)
#   compare    shmbroker-bench compare, all five systems, 3 rounds of 5 s: needs the peers'
#              servers and clients carried too (that machine has no apt); here, once:
#                  echo /.peers/ >> .git/info/exclude
#                  bash bench/device_run.sh --fetch-peers
#              (redis-server and nats-server as apt installed them here, with the libraries
#              redis-server loads beyond glibc's, and the redis, hiredis and nats-py wheels),
#              then run(..., carry=[".whl", ".peers"])
# Record what it prints in bench/RESULTS.md with the machine description (machine.txt).
set -euo pipefail

WHEELS=(posix-ipc==1.3.2 orjson==3.13.0 crc32c==2.9.post0 lz4==4.4.5 zstandard==0.25.0)
PEER_WHEELS=(redis hiredis nats-py)
# what redis-server (Debian 12's) loads beyond libc, libm, libstdc++ and libgcc_s
REDIS_LIBS=(libatomic.so.1 liblzf.so.1 libjemalloc.so.2 libsystemd.so.0 libssl.so.3 libcrypto.so.3
            libcap.so.2 libgcrypt.so.20 liblzma.so.5 libzstd.so.1 liblz4.so.1 libgpg-error.so.0)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    exit 0
fi
if [[ "${1:-}" == "--fetch-peers" ]]; then
    mkdir -p .peers/bin .peers/lib .peers/whl
    cp -L "$(command -v redis-server)" .peers/bin/redis-server
    cp -L "$(command -v nats-server || echo /usr/sbin/nats-server)" .peers/bin/nats-server
    for lib in "${REDIS_LIBS[@]}"; do cp -L "/lib/x86_64-linux-gnu/$lib" .peers/lib/; done
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .peers/whl "${PEER_WHEELS[@]}"
    exit 0
fi

source bench/device_env.sh  # the wheels, PYTHONPATH, $out and machine.txt
steps=("$@")
if [[ ${#steps[@]} == 0 ]]; then steps=(scale latency durable); fi
log="$out/device.log"
bench=(python3 -m shmbroker.perf.cli)

for step in "${steps[@]}"; do
    echo "=== $step $(date -u +%T)" | tee -a "$log"
    case "$step" in
    scale)
        timeout 260 "${bench[@]}" scale --partitions 1,2,4,8 --rounds 3 --duration-s 6 \
            --json "$out/scale.json" 2>&1 | tee -a "$log" || true ;;
    scale-off)
        timeout 260 "${bench[@]}" scale --partitions 1,2,4,8 --rounds 3 --duration-s 6 \
            --broker-setting worker_check_thread=off --json "$out/scale-off.json" 2>&1 \
            | tee -a "$log" || true ;;
    scale-big)
        timeout 200 "${bench[@]}" scale --partitions 1,2,4,8 --rounds 2 --duration-s 6 \
            --batch-size-bytes 1048576 --chunk-records 10000 --json "$out/scale-big.json" 2>&1 \
            | tee -a "$log" || true ;;
    latency)
        timeout 80 python3 bench/broker.py --modes "" --repeat 3 --latency-records 30000 \
            --spin-sweep 50/0,5000/5000 --json "$out/sweep.json" 2>&1 | tee -a "$log" || true
        for spin in 0 5000; do
            options=()
            if [[ $spin != 0 ]]; then options=(--worker-spin-us "$spin" --poll-spin-us "$spin"); fi
            # (each second's worst latency is in the JSON: latency_max_per_s)
            timeout 40 "${bench[@]}" --workload bench/workloads/latency-10k.toml --duration-s 6 \
                "${options[@]}" --json "$out/latency-spin$spin.json" 2>&1 | tee -a "$log" || true
        done ;;
    trace)
        # where a record's latency goes, stage by stage (the worker's step trace)
        timeout 60 python3 bench/latency_trace.py --rounds 3 --json "$out/trace.json" 2>&1 \
            | tee -a "$log" || true
        timeout 60 python3 bench/latency_trace.py --rounds 3 --worker-spin-us 5000 \
            --poll-spin-us 5000 --json "$out/trace-spin.json" 2>&1 | tee -a "$log" || true
        # the same, the consumer fetching everything through the worker (no direct reads)
        timeout 60 python3 bench/latency_trace.py --rounds 3 --worker-spin-us 5000 \
            --poll-spin-us 5000 --no-direct-reads --json "$out/trace-spin-fetch.json" 2>&1 \
            | tee -a "$log" || true ;;
    tail)
        for run in 1 2 3; do
            timeout 40 "${bench[@]}" --workload bench/workloads/latency-10k.toml --duration-s 8 \
                --json "$out/tail-$run.json" 2>&1 | tee -a "$log" || true
        done ;;
    disk)
        {
            findmnt -T "${TMPDIR:-/tmp}" || true
            findmnt -T /dev/shm || true
            grep -H . /proc/sys/vm/dirty_* || true
        } 2>&1 | tee -a "$log"
        for where in "${TMPDIR:-/tmp}" /dev/shm; do
            for every in 0 1; do
                timeout 30 python3 bench/write_stalls.py --dir "$where" --seconds 12 \
                    --fsync-every-s "$every" 2>&1 | tee -a "$log" || true
            done
        done ;;
    tail-shm)
        for run in 1 2; do
            TMPDIR=/dev/shm timeout 40 "${bench[@]}" --workload bench/workloads/latency-10k.toml \
                --duration-s 8 --json "$out/tail-shm-$run.json" 2>&1 | tee -a "$log" || true
        done ;;
    compare)
        timeout 240 "${bench[@]}" compare --rounds 3 --duration-s 5 \
            --json "$out/compare.json" 2>&1 | tee -a "$log" || true ;;
    durable)
        timeout 120 python3 bench/durable.py --rounds 2 --duration-s 4 \
            --json "$out/durable.json" 2>&1 | tee -a "$log" || true ;;
    stalls)
        timeout 90 "${bench[@]}" scale --partitions 1,8 --rounds 1 --duration-s 6 \
            --batch-size-bytes 1048576 --chunk-records 10000 --json "$out/stalls.json" \
            > "$out/stalls.log" 2>&1 || true
        grep -v "kept it busy" "$out/stalls.log" | tee -a "$log" || true
        grep "kept it busy" "$out/stalls.log" | head -5 | tee -a "$log" || true
        echo "stall warnings: $(grep -c "kept it busy" "$out/stalls.log" || true)" \
            | tee -a "$log" ;;
    *)
        echo "unknown step $step (scale, scale-off, scale-big, latency, trace, tail, tail-shm, disk, durable, stalls, compare)" >&2; exit 2 ;;
    esac
done
echo "=== done $(date -u +%T)" | tee -a "$log"
