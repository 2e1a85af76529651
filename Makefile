# The two quickstart commands: `make main` (the main job on the offline default) and `make test`.
# Both set up .venv first: pinned CPU torch, the package with its C++ extension.
PY := .venv/bin/python
TORCH := torch==2.13.0
SOURCES := setup.py pyproject.toml csrc/build.cfg $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/include/mmvae_fast/*.h)

.PHONY: main poly test lint format clean cuda-check gpu-check

.venv/.deps:
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) numpy pytest tqdm matplotlib scikit-learn triton==3.9.0
	touch $@

.venv/.built: .venv/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# The main job: DReG on the looser bound (the library's default objective and gradient) with the
# offline digits default's recipe (16x16 grey + colour digits, MLPs, K=10, batch 64, 10 epochs),
# then its evaluation (digit classifiers trained on first use, coherence table, log-likelihood on
# 500 test items).
MAIN_RUN := runs/main
MAIN_TRAIN := --experiment digits --obj dreg --looser
MAIN_EVAL := --classifiers runs/classifiers

main: .venv/.built
	$(PY) -m mmvae_fast.cli train $(MAIN_TRAIN) --out $(MAIN_RUN) --overwrite
	$(PY) -m mmvae_fast.cli evaluate $(MAIN_RUN) $(MAIN_EVAL)

# The five-modality default (polydigits: five PolyMNIST-style styled digits, 3x12x12 each), DReG
# looser bound, K = 10 per expert, then coherence from every subset of modalities by subset size.
# `make poly POLY_MISSING=0.5` trains on data with half the modalities missing at random.
POLY_MISSING ?= 0
POLY_RUN := runs/poly-missing$(POLY_MISSING)
POLY_TRAIN := --experiment polydigits --obj dreg --looser --K 10 --epochs 6 --batch-size 64 --limit 2560 --test-n 256 \
	--missing-ratio $(POLY_MISSING)
POLY_EVAL := --classifiers runs/classifiers --ll-K 100 --ll-n 50 --n-joint 2000 --limit 500

poly: .venv/.built
	$(PY) -m mmvae_fast.cli train $(POLY_TRAIN) --out $(POLY_RUN) --overwrite
	$(PY) -m mmvae_fast.cli evaluate $(POLY_RUN) $(POLY_EVAL)

# The Triton kernels run under Triton's interpreter in a process of their own (the `triton`-marked
# tests of every tests/test_<op>.py): TRITON_INTERPRET must hold before anything (e.g.
# torch.compile's inductor) brings triton up in a process.
test: .venv/.built
	$(PY) -m pytest -q tests -m "not triton"
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton tests

# ruff (pyproject.toml) over the Python, clang-format (.clang-format) over csrc/; `make format` fixes
RUFF := ruff==0.8.6
CLANG_FORMAT := clang-format==19.1.7
CSRC := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')

.venv/.lint: .venv/.deps
	$(PY) -m pip install -q $(RUFF) $(CLANG_FORMAT)
	touch $@

lint: .venv/.lint
	.venv/bin/ruff check .
	.venv/bin/clang-format --dry-run --Werror $(CSRC)

format: .venv/.lint
	.venv/bin/ruff check --fix .
	.venv/bin/clang-format -i $(CSRC)

# every csrc/cuda/*.cu through nvcc for sm_80 and sm_90 (no GPU needed; skipped without nvcc)
cuda-check: .venv/.deps
	PYTHON=$(PY) scripts/check_cuda_compile.sh

# On a machine with a CUDA GPU (its python with CUDA torch and triton, not .venv's CPU torch): build
# the CUDA kernels in place, the GPU tests and the GPU benchmark; logs in gpu-check/
gpu-check:
	scripts/gpu_check.sh

clean:
	rm -rf .venv build *.egg-info mmvae_fast/*.so
