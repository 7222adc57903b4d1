#!/usr/bin/env bash
# One-time set-up on a fresh Debian 12 machine with rustup: system packages, the ONNX Runtime library
# (from the PyPI onnxruntime==1.31.1 wheel: no CDN needed), and the datasets (scripts/fetch-data.sh).
#
# Usage: scripts/setup.sh [--no-data] [DATASET ...]   (datasets default to all)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
log() { printf '[setup] %s\n' "$*" >&2; }
sudo_if() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- system packages: protoc (candle-onnx's build), a C compiler, Python + pip, npm (datasets), chromium and
# its WebDriver (the test of `generate serve`'s page in a real browser), OpenMPI with libclang and pkg-config
# (the trainer's `mpi` feature: `mpirun -np N trainer fit --distributed`)
need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v cc >/dev/null || need+=(build-essential)
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v npm >/dev/null || need+=(npm)
command -v xz >/dev/null || need+=(xz-utils)
python3 -c "import ensurepip" 2>/dev/null || need+=(python3-venv)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v mpirun >/dev/null || need+=(openmpi-bin)
command -v mpicc >/dev/null || need+=(libopenmpi-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)   # bindgen: libclang and its headers
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  sudo_if apt-get update -q >/dev/null
  sudo_if env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { log "cargo not found: install Rust with rustup (https://rustup.rs) first"; exit 1; }

# --- ONNX Runtime 1.31.1 (CPU) for the runtime crate, into .ort/ (git-ignored)
ORT_VER=1.31.1
ORT_DIR=$ROOT/.ort/cpu-$ORT_VER
if [ ! -f "$ORT_DIR/libonnxruntime.so.$ORT_VER" ]; then
  log "ONNX Runtime $ORT_VER from the PyPI wheel"
  mkdir -p "$ORT_DIR"
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    "onnxruntime==$ORT_VER" -d "$tmp"
  python3 - "$tmp" "$ORT_DIR" <<'PY'
import glob, os, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0]) as z:
    for n in z.namelist():
        b = os.path.basename(n)
        if n.startswith("onnxruntime/capi/lib") and ".so" in b:
            with z.open(n) as src, open(os.path.join(out, b), "wb") as dst:
                dst.write(src.read())
PY
  (cd "$ORT_DIR" && ln -sf "libonnxruntime.so.$ORT_VER" libonnxruntime.so.1 && ln -sf libonnxruntime.so.1 libonnxruntime.so)
fi
log "ONNX Runtime: $ORT_DIR/libonnxruntime.so.$ORT_VER"

# --- Python interop checks (onnx checker + Python onnxruntime), in .venv (git-ignored)
if ! .venv/bin/python -c "import onnx, onnxruntime, numpy" 2>/dev/null; then
  log "Python venv with onnx, onnxruntime==$ORT_VER, numpy"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q "onnx==1.19.0" "onnxruntime==$ORT_VER" "numpy<3"
fi

# --- datasets
if [ "${1:-}" = "--no-data" ]; then
  shift
else
  bash "$ROOT/scripts/fetch-data.sh" "$@"
fi
log "ready"
