# make main   — ML-100K -> DuoRec -> retrieval-augmented fine-tuning -> index -> service on :8000
#               (creates .venv on first use; prints a sample recommendation; serves until Ctrl-C)
# make test   — run the whole test suite (creates .venv on first use); CI runs this
# make test-fast — everything not marked slow (under a minute)
# make stack-smoke — build the images, run the compose stack on loopback, fault checks (root, docker.io; ~15 min)
.PHONY: main test test-fast env lint bench-train bench-index clean stack-smoke

main:
	bash scripts/main.sh

test:
	bash scripts/test.sh

test-fast:
	bash scripts/test.sh -m "not slow"

stack-smoke:
	bash scripts/stack_smoke.sh

env:
	bash scripts/setup_env.sh

lint:
	bash scripts/setup_env.sh && .venv/bin/ruff check .

bench-train:
	bash scripts/setup_env.sh && .venv/bin/python bench/train_speed.py

bench-index:
	bash scripts/setup_env.sh && .venv/bin/python bench/index_scale.py

clean:
	rm -rf .venv .pytest_cache .ruff_cache
