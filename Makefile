# make demo: set up, then run the main job on the embedded default.   make test: set up, then test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-quick bench gpu-check clean

install: $(STAMP)

# (Re)install only when the venv is missing or pyproject.toml changed since the last install.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m glit_ray.summary
	$(BIN)/python -m glit_ray.search --level high --out runs/demo/search-high
	$(BIN)/python -m glit_ray.report runs/demo/search-high

test: install
	$(BIN)/python -m pytest

# The edit loop's tier: every test that starts neither Ray nor a Python process nor exports to ONNX (about a minute);
# CI runs `make test`.
test-quick: install
	$(BIN)/python -m pytest -m "not ray and not subprocess and not onnx"

# The README's 224-px trial search (glit_pico, high level), which P13p and P13t audit on their folders
PICO_SEARCH = $(BIN)/python -m glit_ray.search --level high --space glit_pico \
	--population 16 --generations 5 --topk 4 --mutations 8 --crossovers 8 --calib-batches 4

# P13b's, P13p's and P13t's searches as they were measured: the uniform supernet of 30 epochs, the default before
# fair sampling (the levers compare fair sampling with it)
UNIFORM_SUPERNET = --supernet-sampling uniform --supernet-epochs 30

# Benchmarks P1-P8, P6b, P10-P14, P13r, P13b, P13p, P13t and P13bt (see BENCHMARKS.md; P10-P11 here are the CPU's), run one after another on a quiet machine; each rewrites its figures there.
bench: install
	$(BIN)/python bench/supernet_step.py --record
	$(BIN)/python bench/scoring_cost.py --record
	$(BIN)/python bench/orchestration.py --record
	$(BIN)/python bench/scaling.py --record
	$(BIN)/python bench/search_quality.py --setting demo --record
	$(BIN)/python bench/search_quality.py --setting pico --record
	$(BIN)/python bench/input_pipeline.py --record
	$(BIN)/python bench/loader_cpu.py --record
	$(BIN)/python bench/training_feed.py --allow-cpu --batch 16 --cpus 2,1 --steps 10 --warmup 3 --record
	$(BIN)/python bench/grad_checkpointing.py --record
	$(BIN)/python bench/evaluator_warmup.py --record
	$(BIN)/python bench/ranking_stability.py --record
	$(BIN)/python bench/recipe_fit.py --record
	$(BIN)/python bench/audit_value.py --record
	# P13b's ground truth: the demo's search as P13 first audited it (uniform supernet, ranked by top-1, seed 0) and its
	# 3-seed audit
	$(BIN)/python -m glit_ray.search --level high --objective top1 $(UNIFORM_SUPERNET) --out runs/bench-levers/demo
	$(BIN)/python -m glit_ray.audit runs/bench-levers/demo --seeds 3
	$(BIN)/python bench/audit_levers.py --run runs/bench-levers/demo --record
	# P13p: P13 at 224 px, glit_pico's search on the tests' generated folder (10 classes x 40 training images)
	test -d runs/bench-pico/folder224 || $(BIN)/python -m glit_ray.synthetic runs/bench-pico/folder224 --classes 10 --train-per-class 40 --val-per-class 10
	$(PICO_SEARCH) $(UNIFORM_SUPERNET) --data imagefolder:runs/bench-pico/folder224 --out runs/bench-pico/search-high
	$(BIN)/python bench/audit_value.py --run runs/bench-pico/search-high --epochs 10 --batch-size 32 --id P13p --record
	# P13t: P13 on the README's 224-px trial (50 classes x 40 training images), its search as the README gave it
	# before fair sampling (uniform); P13bt's fair8-loss is the trial at today's defaults
	test -d runs/readme-pico/folder224 || $(BIN)/python -m glit_ray.synthetic runs/readme-pico/folder224
	$(PICO_SEARCH) $(UNIFORM_SUPERNET) --data imagefolder:runs/readme-pico/folder224 --out runs/readme-pico/uniform-high
	rm -rf runs/readme-pico/p13t runs/readme-pico/levers
	$(BIN)/python bench/audit_value.py --run runs/readme-pico/uniform-high --sample 18 --seeds 3 --ranking-seeds 1 --epochs 10 --batch-size 32 --cpus-per-worker 1 --keep runs/readme-pico/p13t --id P13t --record
	# P13bt: P13b's levers against P13t's audit (kept by --keep)
	$(BIN)/python bench/audit_levers.py --run runs/readme-pico/p13t/search-high --levers loss,fair8,fair8-loss --work runs/readme-pico/levers --id P13bt --record
	# P14: latency predicted from a table against whole networks under ONNX Runtime (about 15 minutes)
	$(BIN)/python bench/latency_table.py --spaces glit_micro,glit_pico --archs 30 --record

# The real 224-px path (P10 and P11, supernet training, scoring, search, retrain) on one GPU with bfloat16, with its
# figures; then P12, GLiT-Base's peak memory with and without gradient checkpointing on that GPU.
gpu-check: install
	$(BIN)/python bench/gpu_check.py
	$(BIN)/python bench/grad_checkpointing.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
