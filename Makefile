# The two commands: `make demo` and `make test`. Both create .venv from nothing when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := token
# Every cache and store (built bases, DeepSpeed's compiled ops, demo data) in the checkout's .clsvc; outside make the
# default is ~/.cache/clsvc (cl_service/_home.py).
export CLSVC_HOME ?= $(CURDIR)/.clsvc
export TORCH_EXTENSIONS_DIR := $(CLSVC_HOME)/torch_extensions
export DS_BUILD_OPS := 0
export TOKENIZERS_PARALLELISM := false

DEMO_DATA ?= $(CLSVC_HOME)/data/dcl-mini

.PHONY: demo demo-acl demo-data study table table-acl test test-long test-unit test-ray test-wheel venv clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU torch first and pinned: an unpinned torch pulls GBs of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	# tracking-mlflow: the MLflow tracker is tested against the real package (a run's FAILED/KILLED status)
	$(PY) -m pip install -q -c constraints.txt -e ".[ray,dev,deepspeed,tracking-mlflow]"
	@touch $@

venv: $(STAMP)

# The main job: a local Ray head on loopback, the DCL mini run submitted with `ray job submit`,
# the metrics table and report path printed, Ray stopped. Rerunning resumes (finished stages are skipped).
demo: $(STAMP)
	bash cluster/local_demo.sh

demo-acl: $(STAMP)
	CONFIG=workloads/configs/acl_mini.yaml OUT=runs/acl-mini bash cluster/local_demo.sh

# A study of the demo's run: 3 task orders x 2 seeds of mrlora, mrlora_knn, lora_ft and oracle, submitted with
# `ray job submit` like the demo; each expert is trained once per seed for the 3 orders. Rerunning resumes cell by cell.
STUDY_OUT ?= runs/study-dcl-mini
study: $(STAMP)
	DEMO_JOB="workloads/run_study.py --config workloads/configs/study_dcl_mini.yaml --orders 3 --seeds 2 --out $(STUDY_OUT)" \
	  REPORT=0 DEMO_TIMEOUT=$${DEMO_TIMEOUT:-10800} bash cluster/local_demo.sh
	sed -n '/^## Metrics/,/^Intervals/p' $(STUDY_OUT)/report.md
	@echo "report: $(STUDY_OUT)/report.md"

# The MLLM-CL table: every method of the benchmark's comparison, each with replay where the table has both, on
# the mini streams (the configs' own methods lists). Longer than the demo: see README for the wall times.
table: $(STAMP)
	CONFIG=workloads/configs/dcl_table.yaml OUT=runs/dcl-table METHODS= DEMO_TIMEOUT=14400 bash cluster/local_demo.sh

table-acl: $(STAMP)
	CONFIG=workloads/configs/acl_table.yaml OUT=runs/acl-table METHODS= DEMO_TIMEOUT=14400 bash cluster/local_demo.sh

demo-data: $(STAMP)
	$(VENV)/bin/clsvc data synth --benchmark dcl-mini --out $(DEMO_DATA) --overwrite
	$(VENV)/bin/clsvc data inspect $(DEMO_DATA)

test: $(STAMP)
	$(PY) -m pytest -q tests/unit tests/ray -m "not long" --ignore=tests/unit/serve/test_wheel_install.py --durations=15

# The Ray tests of over 100 s each on 2 cores (two local nodes, an interrupted sweep, ZeRO-2 with resume, a run cut
# by a stall then by a driver kill): kept out of `make test` so that it stays near 15 minutes; CI runs them after it.
test-long: $(STAMP)
	$(PY) -m pytest -q tests/ray -m long --durations=5

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit --ignore=tests/unit/serve/test_wheel_install.py

test-ray: $(STAMP)
	$(PY) -m pytest -q tests/ray

# The wheel installed with its dependencies into a fresh venv (CPU torch pinned first, as above): needs the package
# index (or pip's cache) and minutes, so it is not part of `make test`; CI runs both.
test-wheel: $(STAMP)
	$(PY) -m pytest -q tests/unit/serve/test_wheel_install.py

clean:
	rm -rf .clsvc build *.egg-info
