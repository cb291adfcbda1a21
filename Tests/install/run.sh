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
    # The wheel: any Python 3, this platform; its library carries the Swift runtime (no libswift*).
    local wheel; wheel="$(ls "$tmp"/wheel/libkfac-*-py3-none-linux_*.whl)"
    "$PYTHON" -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('libkfac/libkfac.so'))" \
        "$wheel" "$tmp/wheel-libkfac.so"
    if readelf -d "$tmp/wheel-libkfac.so" | grep 'NEEDED.*libswift'; then echo "the wheel's libkfac.so needs the Swift runtime"; exit 1; fi
    "$PYTHON" -m venv --system-site-packages "$tmp/wheel-venv"
    "$tmp/wheel-venv/bin/pip" install -q "$tmp"/wheel/libkfac-*.whl
    (cd "$tmp" && "$tmp/wheel-venv/bin/python" "$root/Tests/install/python_step.py" bundled)
    "$PYTHON" -m venv --system-site-packages "$tmp/editable-venv"
    "$tmp/editable-venv/bin/pip" install -q --no-deps -e "$root/bindings/python"
    (cd "$tmp" && "$tmp/editable-venv/bin/python" "$root/Tests/install/python_step.py" checkout)
}

route_cpp() {
    local prefix="$tmp/prefix"
    make -s -C "$root" install PREFIX="$prefix"
    cmake -S "$root/examples/cpp" -B "$tmp/cpp-build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build "$tmp/cpp-build"
    (cd "$tmp" && "$tmp/cpp-build/train_digits" "$root/data/digits.bin" 3)
    # pkg-config: the wrapper's test (C++) and a C program, compiled against the installed prefix.
    export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
    local rpath="-Wl,-rpath,$(pkg-config --variable=libdir kfac)"
    c++ -std=c++17 -o "$tmp/test_kfac_hpp" "$root/Tests/cpp/test_kfac_hpp.cpp" $(pkg-config --cflags --libs kfac) "$rpath"
    "$tmp/test_kfac_hpp"
    printf '%s\n' '#include <kfac.h>' '#include <stdio.h>' \
        'int main(void) { kfac_optimizer *o; if (kfac_optimizer_create(KFAC_FLOAT64, &o) != KFAC_OK) return 1;' \
        '  kfac_optimizer_free(o); printf("C via pkg-config: libkfac %s\n", kfac_version_string());' \
        '  return kfac_version_number() != KFAC_VERSION_NUMBER; }' > "$tmp/version.c"
    cc -std=c11 -Wall -Werror -o "$tmp/version" "$tmp/version.c" $(pkg-config --cflags --libs kfac) "$rpath"
    "$tmp/version"
    # libkfac_mpi, when `make mpi` built it (make test does): header, library and kfac_mpi.pc.
    if [ -e "$prefix/lib/libkfac_mpi.so" ]; then
        printf '%s\n' '#include <kfac_mpi.h>' '#include <stdio.h>' \
            'int main(int argc, char **argv) { MPI_Init(&argc, &argv); kfac_optimizer *o; int32_t r = -1, n = -1;' \
            '  int s = kfac_optimizer_create(KFAC_FLOAT64, &o) || kfac_mpi_attach(o, MPI_Comm_c2f(MPI_COMM_WORLD))' \
            '          || kfac_distributed_get_world(o, &r, &n);' \
            '  printf("C via pkg-config kfac_mpi: rank %d of %d\n", (int)r, (int)n); kfac_optimizer_free(o);' \
            '  MPI_Finalize(); return s || n != 1; }' > "$tmp/mpi_attach.c"
        cc -std=c11 -Wall -Werror -o "$tmp/mpi_attach" "$tmp/mpi_attach.c" $(pkg-config --cflags --libs kfac_mpi) "$rpath"
        mpirun --allow-run-as-root --oversubscribe -np 1 "$tmp/mpi_attach"
    fi
}

route_swift() {
    # A clean scratch directory: the dependency is resolved and built as a dependent sees it.
    swift build -c release --package-path "$root/examples/swift-package" --scratch-path "$tmp/swift-build"
    (cd "$tmp" && "$tmp/swift-build/release/TrainDigits" "$root/data/digits.bin" 3)
}

for route in "${@:-python cpp swift}"; do
    for r in $route; do
        echo "== install route: $r"
        "route_$r"
    done
done
echo "install routes passed: ${*:-python cpp swift}"
