# Sourced by bench/device_run.sh on a lent device machine: installs the carried wheels (.whl,
# fetched here with `bash bench/device_run.sh --fetch-wheels`) and prints the machine.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
if [[ -d .peers ]]; then  # the peers' servers and clients (device_run.sh --fetch-peers)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .peers/whl/*.whl
    export PATH="$PWD/.peers/bin:$PATH" LD_LIBRARY_PATH="$PWD/.peers/lib"
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
out="${OUT:-.}"
{
    echo "cores: $(nproc); $(python3 --version); $(uname -srm)"
    grep -m1 'model name' /proc/cpuinfo || true
    # cores and their hyperthread siblings (processes that spin on siblings slow each other)
    lscpu 2>/dev/null | grep -E '^(Thread|Core|Socket|NUMA node)' || true
    python3 -c 'import numpy, psutil; print("numpy", numpy.__version__, "psutil",
                psutil.__version__)'
    # transparent huge pages (a fault or a collapse of one can stall the thread that meets it)
    grep -H . /sys/kernel/mm/transparent_hugepage/enabled \
        /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null || true
    if [[ -d .peers ]]; then
        redis-server --version || true
        nats-server --version || true
    fi
} | tee "$out/machine.txt"
