# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo bench mutation clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(PYTHON) -m pytest

# Everything but the tests marked slow (subprocesses, torchrun, whole tables): the loop while changing code.
test-fast: setup
	$(PYTHON) -m pytest -m "not slow"

# The main job on the embedded data: cluttered digits (tools/make_demo_data.py), a tiny CNN teacher (reused when
# $(DEMO_DIR)/teacher holds a finished run), a tiny ViT trained with TokenMix and that teacher, then its top-1.
DEMO_DIR ?= output/demo
DEMO_IMG_SIZE := 32
DEMO_SUMMARY := $(DEMO_DIR)/tokenmix/summary.csv

demo: setup
	@set -e; start=$$(date +%s); \
	if [ ! -f $(DEMO_DIR)/data/objects.json ]; then \
		rm -rf $(DEMO_DIR)/data.partial; \
		$(PYTHON) tools/make_demo_data.py --out $(DEMO_DIR)/data.partial --size $(DEMO_IMG_SIZE) \
			--train-per-class 500 --val-per-class 100 --seed 0; \
		mv $(DEMO_DIR)/data.partial $(DEMO_DIR)/data; \
	fi; \
	if [ -f $(DEMO_DIR)/teacher/model_best.pth.tar ]; then \
		echo "reusing the teacher in $(DEMO_DIR)/teacher"; \
	else \
		rm -rf $(DEMO_DIR)/teacher.partial; \
		$(PYTHON) train.py -c configs/demo_teacher.yaml --data-dir $(DEMO_DIR)/data --output $(DEMO_DIR) \
			--experiment teacher.partial; \
		mv $(DEMO_DIR)/teacher.partial $(DEMO_DIR)/teacher; \
	fi; \
	rm -rf $(DEMO_DIR)/tokenmix; \
	$(PYTHON) train.py -c configs/demo_tokenmix.yaml --data-dir $(DEMO_DIR)/data --output $(DEMO_DIR) \
		--experiment tokenmix --teacher-checkpoint $(DEMO_DIR)/teacher/model_best.pth.tar; \
	$(PYTHON) validate.py --data-dir $(DEMO_DIR)/data --model tokenmix_vit_tiny_p8_64 \
		--checkpoint $(DEMO_DIR)/tokenmix/model_best.pth.tar --img-size $(DEMO_IMG_SIZE); \
	$(PYTHON) -c "import csv; r = list(csv.DictReader(open('$(DEMO_SUMMARY)'))); \
print('demo: ViT + TokenMix top-1 %.1f%% after %s epochs (chance: 10%%)' % (float(r[-1]['eval_top1']), len(r)))"; \
	echo "demo: $$(( $$(date +%s) - start )) s after setup; outputs in $(DEMO_DIR)"

bench: setup
	$(PYTHON) benchmarks/bench_mixup.py

# A recipe's train input pipeline on JPEG files (800 ImageNet-like ones generated into output/bench_loader/ on first
# use): img/s per loader worker core, time per stage, faster decode/augment candidates. docs/benchmarks.md has figures.
.PHONY: bench-loader
bench-loader: setup
	$(PYTHON) benchmarks/bench_loader.py

# Train steps fed by the loader from JPEG files, beside the same steps on batches kept on the device and the loader
# alone (benchmarks/bench_fed.py): a CPU smoke run with the tiny models, about a minute and a half (data, random
# teacher and map store made in output/bench_fed/). The GPU run is part of benchmarks/gpu_check.sh.
.PHONY: bench-fed
bench-fed: setup
	$(PYTHON) benchmarks/bench_fed.py --teacher-model tokenmix_cnn_teacher_64 --images 64 --rounds 3 --steps 8 \
		--threads 1 -- --model tokenmix_vit_tiny_p8_64 --img-size 64 --device cpu --no-amp --no-pin-mem -b 8 --workers 1

# Mutation testing (mutmut, requirements-dev.txt) of the core modules, each with the tests that cover it: prints the
# score per module and writes the surviving mutants to output/mutation/survivors.txt. Not part of `make test`.
mutation: setup
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) tools/mutation.py

clean:
	rm -rf $(VENV) output build *.egg-info
