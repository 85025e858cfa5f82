# Sourced by the launchers and tests/run.sh: `ftl_python` prints a Python that has the project's dependencies.
# It uses, in order: $FTL_PYTHON; the current python3 when FTL_NO_VENV=1 (you manage the environment); the
# repo's .venv (created and installed on first use, reinstalled when setup.cfg or the constraints change).
FTL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

ftl_has_deps() {
    "$1" - <<'PY' 2>/dev/null
import importlib.util, sys
need = ["torch", "transformers", "peft", "deepspeed", "diffusers", "PIL", "jsonschema", "yaml", "tensorboard",
        "matplotlib"]
sys.exit(0 if all(importlib.util.find_spec(m) for m in need) else 1)
PY
}

ftl_install_stamp() {
    cat "$FTL_ROOT/setup.cfg" "$FTL_ROOT/constraints-cpu.txt" | cksum | cut -d' ' -f1
}

ftl_bootstrap_venv() {
    local venv="$FTL_ROOT/.venv" base="${FTL_BASE_PYTHON:-python3}"
    echo "[finetune-launcher] installing dependencies into $venv (first run: about a minute; set FTL_NO_VENV=1 to use your own environment)" >&2
    [ -x "$venv/bin/python" ] || "$base" -m venv "$venv" >&2
    "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel >&2
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "$venv/bin/python" -m pip install -q -e "$FTL_ROOT[gpu,dev]" >&2
    else
        # CPU machine: the pinned CPU torch first, so nothing pulls a multi-GB CUDA build.
        "$venv/bin/python" -m pip install -q -c "$FTL_ROOT/constraints-cpu.txt" torch >&2
        "$venv/bin/python" -m pip install -q -c "$FTL_ROOT/constraints-cpu.txt" -e "$FTL_ROOT[dev]" >&2
    fi
    ftl_install_stamp > "$venv/.ftl-installed"
}

ftl_python() {
    if [ -n "${FTL_PYTHON:-}" ]; then echo "$FTL_PYTHON"; return; fi
    if [ "${FTL_NO_VENV:-0}" = "1" ]; then
        local py; py="$(command -v python3 || command -v python)"
        if ! ftl_has_deps "$py"; then
            echo "[finetune-launcher] FTL_NO_VENV=1 but $py lacks the dependencies: pip install -e '$FTL_ROOT[dev]'" >&2
            return 1
        fi
        echo "$py"; return
    fi
    local venv="$FTL_ROOT/.venv"
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.ftl-installed" 2>/dev/null)" != "$(ftl_install_stamp)" ] \
        || ! ftl_has_deps "$venv/bin/python"; then
        ftl_bootstrap_venv || { echo "[finetune-launcher] installing into $venv failed (see above)" >&2; return 1; }
    fi
    echo "$venv/bin/python"
}
