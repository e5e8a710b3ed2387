# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
STAMP := .deps-installed

.PHONY: install demo test bench lint tiny clean

# Installs the pinned requirements once; reruns only when requirements.txt changes.
install: $(STAMP)
$(STAMP): requirements.txt
	$(PYTHON) -m pip install -q -r requirements.txt
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
	$(PYTHON) bench/bench_eval_throughput.py
	$(PYTHON) bench/bench_scorer_agreement.py
	$(PYTHON) bench/bench_scorer_speed.py
	$(PYTHON) bench/bench_sft_packing.py
	$(PYTHON) bench/bench_ppo.py
	$(PYTHON) bench/bench_lora.py

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

clean:
	rm -rf demo_out tiny_models $(STAMP)
