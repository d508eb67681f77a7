#!/usr/bin/env bash
# The test suite, on a fresh machine: installs what the tests use besides the
# Rust toolchain (if missing), then runs every test of the workspace.
#   - Chromium (Debian package): the regulator's ledger report is checked in a
#     real headless browser.
#   - PyNaCl (PyPI): scripts/verify_ledger.py, the independent ledger verifier
#     written from docs/ledger-format.md, uses it for Ed25519.
#   - safetensors, NumPy and onnxruntime (PyPI): an exported model is loaded
#     as an ML team would, and its predictions compared with Tessera's own.
#   - PostgreSQL (Debian package): a site's warehouse source is read from a
#     real server, a throw-away cluster the test creates (initdb) and stops.
#   - dockerfile-parse, PyYAML (PyPI) and systemd (Debian package): the
#     deployment units are parsed and `systemd-analyze verify`-ed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d ../shared/data/heart-disease ]; then
  echo "error: ../shared/data/heart-disease is missing (the data lives in ../shared beside the repo)" >&2
  exit 1
fi
if ! command -v chromium >/dev/null; then
  echo "installing chromium (apt) for the ledger report test" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "installing postgresql (apt) for the warehouse source test" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
if ! python3 -c "import nacl" 2>/dev/null; then
  echo "installing pynacl (pip) for scripts/verify_ledger.py" >&2
  python3 -m pip install --quiet pynacl
fi
if ! python3 -c "import safetensors.numpy, numpy, onnxruntime" 2>/dev/null; then
  echo "installing safetensors, numpy and onnxruntime (pip) for the model export test" >&2
  python3 -m pip install --quiet safetensors numpy onnxruntime
fi
if ! python3 -c "import dp_accounting" 2>/dev/null; then
  echo "installing dp-accounting (pip) for the privacy accountant cross-check" >&2
  python3 -m pip install --quiet dp-accounting
fi
if ! python3 -c "import dockerfile_parse, yaml" 2>/dev/null; then
  echo "installing dockerfile-parse and PyYAML (pip) for the deployment units test" >&2
  python3 -m pip install --quiet dockerfile-parse pyyaml
fi
if ! command -v systemd-analyze >/dev/null; then
  echo "installing systemd (apt) for the deployment units test (systemd-analyze verify)" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi
cargo test --workspace "$@"
