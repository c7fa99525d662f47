# ControlNet Suite. Each target does its own set-up on a fresh machine.
.PHONY: test run bench demo toy-retrain clean

test:  ## set up .venv (torch, ComfyUI host, oracles) and run the test suite
	bash scripts/test.sh $(PYTEST_ARGS)

run:  ## start ComfyUI with this extension on 127.0.0.1:8188
	bash scripts/run_comfyui.sh

bench:  ## run the benchmarks in bench/ (slow; full SD1.5 shapes)
	bash scripts/setup_test_env.sh
	.venv/bin/python bench/bench_load_memory.py
	.venv/bin/python bench/bench_flux_load_memory.py
	.venv/bin/python bench/bench_step.py
	.venv/bin/python bench/bench_dit_step.py
	.venv/bin/python bench/bench_ksampler.py
	.venv/bin/python bench/bench_annotators.py
	.venv/bin/python bench/bench_annotator_flops.py
	.venv/bin/python bench/bench_train.py --compare diffusers
	.venv/bin/python bench/bench_train.py --compare scopes
	.venv/bin/python bench/bench_server_load.py

demo:  ## sample the shipped toy base + toy ControlNet; writes demo/out/toy_demo.png and prints the controllability
	bash scripts/setup_demo_env.sh
	$${VENV:-.venv}/bin/python experiments/demo.py

toy-retrain:  ## retrain the toy models from scratch, rerun the experiments, redraw experiments/plots (30-40 min on 2 cores)
	bash scripts/setup_demo_env.sh
	$${VENV:-.venv}/bin/python experiments/retrain.py

clean:
	rm -rf .venv .venv-new .comfyui .pytest_cache
