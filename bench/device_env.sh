# Sourced by bench/device_run.sh on a lent device machine: installs the carried wheels (.whl,
# fetched here with `bash bench/device_run.sh --fetch-wheels`) and prints the machine.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
out="${OUT:-.}"
{
    echo "cores: $(nproc); $(python3 --version); $(uname -srm)"
    grep -m1 'model name' /proc/cpuinfo || true
    python3 -c 'import numpy, psutil; print("numpy", numpy.__version__, "psutil",
                psutil.__version__)'
} | tee "$out/machine.txt"
