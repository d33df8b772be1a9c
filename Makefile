# `make demo` runs the main job offline end to end; `make test` runs the test suite. Both set everything up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel that lies on the development machines; on a GPU box use e.g. `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= outputs/demo
# `make bench` runs every benchmark in its CPU-sized --quick mode; on a GPU: make bench BENCH_ARGS=
BENCH_ARGS ?= --quick

.PHONY: install demo test bench lint clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,train,mini,demo]"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/di-star demo --out $(DEMO_OUT)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/toy_2d.py --quick --out $(DEMO_OUT)/toy
	printf "a cat wearing sunglasses\na fox in a snowy forest\na red chair\n" > $(DEMO_OUT)/prompts.txt
	HF_HUB_OFFLINE=1 $(BIN)/python examples/train_di_star_sdxl.py --pretrained_model_name_or_path $(DEMO_OUT)/tiny-sdxl \
		--train_data_file $(DEMO_OUT)/prompts.txt --resolution 64 --max_train_steps 3 --reward_scale 0 \
		--report_to tensorboard --overwrite_output_dir --output_dir $(DEMO_OUT)/di-star-tiny
	HF_HUB_OFFLINE=1 $(BIN)/di-star generate --model $(DEMO_OUT)/di-star-tiny --prompt "a cat wearing sunglasses" \
		--height 64 --width 64 --out $(DEMO_OUT)/di-star-tiny-images
	HF_HUB_OFFLINE=1 $(BIN)/python examples/mini_digits/run.py --quick --out $(DEMO_OUT)/mini_digits

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/di-star bench $(BENCH_ARGS) --out outputs/bench

lint: install
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check src tests examples benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache
