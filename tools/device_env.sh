# Sourced by the device-call scripts: carried wheels, the project's import names on
# PYTHONPATH (the GPU image has torch/triton; nothing is pip-installed there), $OUT.
OUT=${OUT:-/tmp/nsa_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    # once per machine: later calls (and re-sourcing) find the same wheels already installed
    stamp=/tmp/site/.nsa_wheels
    if [ "$(ls .whl)" != "$(cat $stamp 2>/dev/null)" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl && ls .whl > $stamp
    fi
    [[ ":$PYTHONPATH:" == *":/tmp/site:"* ]] || export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
NSA_PKGS=${NSA_PKGS:-/tmp/nsa_pkgs}
mkdir -p "$NSA_PKGS"
for pair in nsa_kernels:kernels nsa_megatron:nsa_megatron nsa_tools:tools nsa_launch:launch; do
    ln -sfn "$PWD/${pair#*:}" "$NSA_PKGS/${pair%%:*}"
done
export PYTHONPATH=$NSA_PKGS:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
