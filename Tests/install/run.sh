#!/usr/bin/env bash
# Install checks, one per route, each from a clean temporary directory outside the checkout
# (removed afterwards). Run by `make test-install` (and CI) after `make lib`: the builds below
# reuse the checkout's .build instead of compiling the library again.
#   python  fresh venv: pip install ./bindings/python, a training step (numpy) from outside the
#           checkout with no KFAC_LIBRARY; pip wheel, installed into a second venv (PyTorch step
#           when the system has torch); an editable install finding .build/release
#   cpp     make install PREFIX=<tmp>; examples/cpp built with CMake against it (find_package) and
#           run, its wrapper error test; a C program compiled with pkg-config
#   swift   examples/swift-package (depends on this package by path) built and run
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
unset KFAC_LIBRARY

route_python() {
    "$PYTHON" -m venv "$tmp/venv"
    "$tmp/venv/bin/pip" install -q "$root/bindings/python"
    (cd "$tmp" && "$tmp/venv/bin/python" "$root/Tests/install/python_step.py" bundled)
    "$tmp/venv/bin/pip" wheel -q --no-deps -w "$tmp/wheel" "$root/bindings/python"
    "$PYTHON" -m venv --system-site-packages "$tmp/wheel-venv"
    "$tmp/wheel-venv/bin/pip" install -q "$tmp"/wheel/libkfac-*.whl
    (cd "$tmp" && "$tmp/wheel-venv/bin/python" "$root/Tests/install/python_step.py" bundled)
    "$PYTHON" -m venv --system-site-packages "$tmp/editable-venv"
    "$tmp/editable-venv/bin/pip" install -q --no-deps -e "$root/bindings/python"
    (cd "$tmp" && "$tmp/editable-venv/bin/python" "$root/Tests/install/python_step.py" checkout)
}

for route in "${@:-python cpp swift}"; do
    for r in $route; do
        echo "== install route: $r"
        "route_$r"
    done
done
echo "install routes passed: ${*:-python cpp swift}"
