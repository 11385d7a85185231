# convkernels: `make test` and `make bench` do all set-up on a fresh clone.
#
#   make test    venv + torch + build (CPU and, with nvcc, CUDA) + pytest
#   make bench   the benchmarks on this machine's default device
#   make gpu     on a GPU machine with torch installed: build, GPU tests and GPU
#                benchmarks (time-boxed to fit one 10-minute command), results under $(OUT)

VENV      ?= .venv
PYTHON    ?= $(VENV)/bin/python
TORCH     ?= torch==2.14.1 torchvision==0.29.1
# The tests compare against torchvision and timm, run ONNX files in onnxruntime
# and train on scikit-learn's digits; the model benchmark also measures OpenVINO.
# pytest < 9.2: pytest-xdist 3.8's --dist loadgroup tags test ids in a way that
# pytest 9.2's structured ids ignore (tests/conftest.py stops the run if so).
TEST_DEPS  = 'pytest<9.2' pytest-xdist matplotlib tqdm timm onnx onnxscript onnxruntime \
             scikit-learn
BENCH_DEPS = openvino
OUT       ?= benchmarks/results
export MAX_JOBS ?= 2
# torch's cpp_extension finds the toolkit through CUDA_HOME.
export CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)

.PHONY: test bench gpu build clean

# torch and what building _C needs; a change here rebuilds _C.
$(VENV)/.deps:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install --quiet $(TORCH) ninja setuptools wheel numpy
	touch $@

# The test dependencies' stamp is named after their list, so that a changed
# list (a pin, a new package) is installed into an existing venv too, without
# rebuilding _C.
TEST_STAMP = $(VENV)/.test-deps-$(shell printf '%s' "$(TEST_DEPS)" | cksum | cut -d' ' -f1)
$(TEST_STAMP): $(VENV)/.deps
	$(VENV)/bin/pip install --quiet $(TEST_DEPS)
	rm -f $(VENV)/.test-deps-*
	touch $@

$(VENV)/.bench-deps: $(TEST_STAMP)
	$(VENV)/bin/pip install --quiet $(BENCH_DEPS)
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

# Most tests are small and single-threaded: one pytest worker per core
# (pytest-xdist; tests/conftest.py gives each its share of torch's threads), with
# the tests that share an expensive module fixture grouped on one worker; the
# log ends with the 30 slowest (what to trim when the run nears 30 minutes).
TEST_WORKERS ?= $(shell nproc)
test: build $(TEST_STAMP)
	$(PYTHON) -m convkernels info
	$(PYTHON) -m pytest tests -q -n $(TEST_WORKERS) --dist loadgroup --durations=30

bench: build $(VENV)/.bench-deps
	$(PYTHON) benchmarks/run_all.py --out $(OUT)

# The lent GPU machine has torch but no package registry and no venv, and runs
# one command for at most 10 minutes: every step is time-boxed (GPU_TEST_S,
# GPU_CONTRACT_S, GPU_BENCH_S seconds) so that `make gpu OUT=$OUT` fits, and a
# step cut short keeps what it wrote (benchmark rows are written as they are
# measured). The tests are the cuda and triton targets' (not the sm_80/sm_90
# cross-compiles, which `make test` runs anywhere; tests/test_models_cuda.py runs
# one model of each family on each GPU backend), then the model contract suite;
# the GPU benches skip torch.compile (the GPU goals compare against eager) and
# the DenseNet bench its compile and channels_last torchvision variants. Raise
# the time boxes, or run `benchmarks/run_all.py --full` by hand, on a longer lease.
GPU_TEST_S     ?= 240
# Several test processes share the one GPU (its 16 cores idle otherwise); each
# failure goes to gpu-failures.txt as it happens (tests/conftest.py), since an
# interrupted xdist run loses its summary. The build is for the H200's sm_90 only; with it
# the build took about 95 s and 8 workers ran 1484 of the ~2080 GPU tests in 150 s.
GPU_PYTEST     ?= -n 8 --dist loadgroup -rfE --tb=short
GPU_CONTRACT_S ?= 60
GPU_BENCH_S    ?= 80
gpu:
	MAX_JOBS=$$(nproc) TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} \
		python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
	python3 -m convkernels info | tee $(OUT)/info.txt
	-CONVKERNELS_FAILURE_LOG=$(OUT)/gpu-failures.txt timeout -s INT -k 20 $(GPU_TEST_S) \
		python3 -m pytest tests -q $(GPU_PYTEST) -k "(cuda or triton) and not test_compiles" \
		2>&1 | tee $(OUT)/gpu-tests.txt | tail -30
	-CONVKERNELS_FAILURE_LOG=$(OUT)/gpu-failures.txt timeout -s INT -k 20 $(GPU_CONTRACT_S) \
		python3 -m pytest tests/test_model_contract.py -q $(GPU_PYTEST) 2>&1 \
		| tee $(OUT)/gpu-contract.txt | tail -5
	-timeout $(GPU_BENCH_S) python3 benchmarks/run_all.py --benches conv_bn_act,bn_act \
		--no-compile --out $(OUT)
	-timeout $(GPU_BENCH_S) python3 benchmarks/run_all.py --benches densenet --out $(OUT) \
		--dn-variants torchvision,torchvision-memeff,convkernels,convkernels-memeff
	-python3 benchmarks/run_all.py --plot-only --out $(OUT)

clean:
	rm -rf build *.egg-info convkernels/_C*.so $(VENV)/.built
