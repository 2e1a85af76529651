# The two quickstart commands: `make main` (the main job on the offline default) and `make test`.
# Both set up .venv first: pinned CPU torch, the package with its C++ extension.
PY := .venv/bin/python
TORCH := torch==2.13.0
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/include/mmvae_fast/*.h)

.PHONY: main test bench clean cuda-check

.venv/.deps:
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) numpy pytest tqdm matplotlib scikit-learn triton==3.9.0
	touch $@

.venv/.built: .venv/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

main: .venv/.built
	$(PY) -m mmvae_fast.demo

test: .venv/.built
	$(PY) -m pytest -q tests

# every csrc/cuda/*.cu through nvcc for sm_80 and sm_90 (no GPU needed; skipped without nvcc)
cuda-check: .venv/.deps
	PYTHON=$(PY) scripts/check_cuda_compile.sh

clean:
	rm -rf .venv build *.egg-info mmvae_fast/*.so
