# portwatch — every target runs from the repository root, as root.
PY      := $(CURDIR)/.venv/bin/python
PYTEST  := $(PY) -m pytest

.PHONY: setup run test demo bench bench-smoke lint clean

setup:            ## idempotent install: Debian packages, kernel headers fallback, bpffs, .venv
	bash scripts/setup.sh

run: setup        ## set up, then collect + evaluate on the default-route interface in the foreground
	$(PY) -m app run

test: setup       ## the whole test suite (what .ci/run calls)
	$(PYTEST) -q tests

demo: setup       ## a self-contained lab in network namespaces: traffic, attack, evaluation, report
	$(PY) -m app.demo

bench: setup      ## benchmarks, printing ratio tables; exits 1 when a figure cannot be right
	$(PY) bench/run_all.py

bench-smoke:      ## the benchmarks' small variants and their checks, under a minute (.ci/run, after make test)
	$(PY) bench/run_all.py --smoke

clean:
	rm -rf .pytest_cache build *.egg-info
