# Two entry points that work on a fresh machine: `make demo` and `make test`.
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := python3 -m uv
endif

.PHONY: setup demo test lint bench system-deps

setup:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen --all-groups --extra spark --extra integray --extra ray

demo: setup
	rm -rf examples/quickstart/.stepwell
	@echo "== first run: everything is new"
	$(UV) run stepwell run examples/quickstart
	@echo "== second run: only the new batch of orders is enriched"
	$(UV) run stepwell run examples/quickstart
	$(UV) run stepwell table examples/quickstart customer_totals
	$(UV) run stepwell runs examples/quickstart --limit 6

system-deps:
	bash scripts/system-deps.sh

test: setup system-deps
	$(UV) run pytest -q

lint: setup
	$(UV) run ruff check src tests benchmarks

bench: setup
	$(UV) run python benchmarks/node_bulk.py
	$(UV) run python benchmarks/node_stream.py
	$(UV) run python benchmarks/processor_rows.py
	$(UV) run python benchmarks/processor_runs.py
	$(UV) run python benchmarks/connector_refresh.py
	$(UV) run python benchmarks/webhook_load.py
	$(UV) run python benchmarks/action_latency.py
	$(UV) run python benchmarks/plugin_calls.py
	$(UV) run --extra bench python benchmarks/step_overhead.py
