#!/usr/bin/env bash
# Issue 5's scaling table on a lent many-core machine (the workplace's `device` tool, 16 cores),
# prepared so that a session drawn for one spends its device minutes on one call.
#
# Here, once per session (the wheels are ignored by git and travel with `carry`; that machine
# has Python 3.12 with numpy, psutil and click, and fetches nothing):
#     echo /.whl/ >> .git/info/exclude
#     bash bench/device_scale.sh --fetch-wheels
# Then one device call, ~3 minutes of running:
#     run(command="bash bench/device_scale.sh", carry=[".whl"], timeout_s=540)
# It prints the machine and the table, and leaves scale.json and scale.log under $OUT.
# Record the table in bench/RESULTS.md ("Scaling") with the machine description it printed.
set -euo pipefail

WHEELS=(posix-ipc==1.3.2 orjson==3.13.0 crc32c==2.9.post0 lz4==4.4.5 zstandard==0.25.0)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    exit 0
fi

source bench/device_env.sh  # the wheels, PYTHONPATH, $out and machine.txt
# Counts alternate within each round (1 2 4 8 1 2 4 8 ...); medians of 3 rounds of 8 s.
python3 -m shmbroker.perf.cli scale --partitions 1,2,4,8 --rounds 3 --duration-s 8 \
    --json "$out/scale.json" 2>&1 | tee "$out/scale.log"
