# Two commands on a fresh machine (Python 3.11, no GPU):
#   make demo   set up .venv, generate the demo data, train + evaluate msrec, print the table,
#               write the run report (runs/msrec/report.html), export the model and score eval with it
#   make test   set up .venv, run the linters (ruff, import-linter) and the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo/data.yaml
DEMO_ROWS ?= 400000
PYTEST_ARGS ?=

.PHONY: setup demo demo-data lint ruff lint-imports test test-all perf compare clean

$(VENV)/.installed: requirements.txt pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==24.3.1
	$(PY) -m pip install -q -r requirements.txt
	# torchrec's metadata asks for the CUDA fbgemm-gpu; fbgemm-gpu-cpu (above) serves it here
	$(PY) -m pip install -q --no-deps torchrec==1.8.0
	# the package (pyproject.toml) with its C++ extension (setup.py), built against the venv's torch;
	# its dependencies are requirements.txt's, installed above
	MSREC_BUILD_CSRC=1 $(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

$(DEMO_DATA): | $(VENV)/.installed
	$(PY) -m msrec_dist.data.synth --out data/demo --rows $(DEMO_ROWS) --shards 8 --seed 0 --eval-rows 150000 --users 2000 --items 1000

demo-data: $(DEMO_DATA)

demo: $(VENV)/.installed $(DEMO_DATA)
	# --overwrite: a second demo moves the first one's runs/msrec aside (runs/msrec.replaced-<time>)
	$(PY) msrec_dist/train.py --config configs/msrec.yaml --overwrite
	# the run report (plots + report.html in the run directory); it prints the page's path
	$(PY) -m msrec_dist.report runs/msrec
	# the weights chosen on val exported for serving, then the eval split scored through the export
	$(PY) -m msrec_dist.export runs/msrec --out runs/msrec_export --overwrite
	$(PY) -m msrec_dist.predict --model runs/msrec_export --data $(DEMO_DATA) --out runs/msrec_export/eval.parquet --metrics --overwrite

ruff: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# The import contracts of pyproject.toml ([tool.importlinter]). lint-imports builds its graph from
# the msrec_dist/ directory it finds on sys.path, where kernels/ is missing (it becomes
# msrec_dist.kernels only through pyproject's package-dir mapping), so the graph is built from a
# tree of links with the installed shape: build/import-graph/msrec_dist/{*, kernels -> kernels/}.
IMPORT_GRAPH := build/import-graph
lint-imports: $(VENV)/.installed
	rm -rf $(IMPORT_GRAPH) && mkdir -p $(IMPORT_GRAPH)/msrec_dist
	for p in msrec_dist/*; do ln -s "$(CURDIR)/$$p" "$(IMPORT_GRAPH)/$$p"; done
	ln -sfn "$(CURDIR)/kernels" $(IMPORT_GRAPH)/msrec_dist/kernels
	cd $(IMPORT_GRAPH) && $(abspath $(VENV))/bin/lint-imports --no-cache --no-logo $(CURDIR)/pyproject.toml

lint: ruff lint-imports

# Includes the perf tests (tests/perf: throughput ratios against benchmarks/baselines/cpu.json,
# measured in a fresh process of their own); `make perf` runs them alone.
test: lint
	MSREC_REQUIRE_CSRC=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

perf: $(VENV)/.installed
	$(PY) -m pytest -q -m perf tests/perf

test-all: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

compare: $(VENV)/.installed $(DEMO_DATA)
	$(PY) -m benchmarks.compare --data $(or $(DATA),$(DEMO_DATA)) --seeds 0 1 2

clean:
	rm -rf runs build *.egg-info msrec_dist/_C*.so .ruff_cache .import_linter_cache
