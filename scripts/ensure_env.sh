# Sourced by run.sh and tests/run.sh: sets $PYTHON to an interpreter that has the project with its
# dependencies and the extras that run.sh and the tests use (pip install -e .[test], which includes
# the demo, figures and seg extras), creating .venv (with the CPU build of torch where there is no GPU)
# if needed.
_ensure_modules='torch numpy nibabel scipy tqdm torchmetrics safetensors huggingface_hub tensorboard nilearn matplotlib monai pytest skimage pywt scoringrules'
_ensure_has() {  # _ensure_has PYTHON MODULES...: all of them import
    local python=$1; shift
    local modules="$*"
    "$python" -c "import ${modules// /, }" >/dev/null 2>&1
}
PYTHON="${PYTHON:-python3}"
if ! _ensure_has "$PYTHON" $_ensure_modules guided_diffusion DWT_IDWT; then
    if [ -x .venv/bin/python ] && _ensure_has .venv/bin/python $_ensure_modules guided_diffusion DWT_IDWT; then
        PYTHON=.venv/bin/python
    elif _ensure_has "$PYTHON" $_ensure_modules; then
        echo "[setup] installing the project into the active environment (pip install -e .)" >&2
        "$PYTHON" -m pip install -q --no-deps -e . >&2
    else
        echo "[setup] creating .venv and installing the project (pip install -e .[test])" >&2
        "$PYTHON" -m venv .venv
        PYTHON=.venv/bin/python
        "$PYTHON" -m pip install -q --upgrade pip >&2
        # A plain torch requirement would pull a multi-GB CUDA build; prefer the CPU build when no GPU.
        if ! command -v nvidia-smi >/dev/null 2>&1; then
            "$PYTHON" -m pip install -q "torch==${FASTCWDM_CPU_TORCH:-2.13.0}" >&2 \
                || "$PYTHON" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu >&2
        fi
        "$PYTHON" -m pip install -q -e ".[test]" >&2
    fi
fi
export PYTHON
