# Sourced by run.sh and tests/run.sh: sets $PYTHON to an interpreter that has the project's
# dependencies, creating .venv (and installing the CPU build of torch where none is present) if needed.
_ensure_check='import torch, numpy, nibabel, pywt, scipy, tqdm, torchmetrics, nilearn, safetensors, huggingface_hub, matplotlib, pytest, skimage, tensorboard, guided_diffusion, DWT_IDWT'
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "$_ensure_check" >/dev/null 2>&1; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "$_ensure_check" >/dev/null 2>&1; then
        PYTHON=.venv/bin/python
    elif "$PYTHON" -c 'import torch, numpy, nibabel, pywt, scipy, tqdm, torchmetrics, nilearn, safetensors, huggingface_hub, matplotlib, pytest, skimage, tensorboard' >/dev/null 2>&1; then
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
# The scripts import the project from the repository even when it is not pip-installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
