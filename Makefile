# taxonet: set up, run the demo, run the tests. Everything installs into .venv (Python 3.11).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test test-fast bench lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision pinned as measured in ENVIRONMENT.md (CUDA build; runs on CPU too)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# System tools the tests use: Debian's `prometheus` package (the Prometheus server for the metrics end-to-end test,
# promtool for the alert-rule tests in tests/k8s; needs root), `chromium` + `chromium-driver` (the review page's
# browser test and docs screenshots drive Debian's Chromium through Selenium) and `firefox-esr` (the same story in
# Firefox, over the WebDriver BiDi protocol Firefox speaks itself; no geckodriver). Nothing is downloaded. kubectl
# (kustomize) ships with the machine image; it is only checked here, since Debian's kubernetes-client is too old for
# the overlays.
system-deps:
	@if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "prometheus/promtool not installed: sudo apt-get install prometheus (tests need them)"; exit 1; fi; \
	fi
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver \
	      >/dev/null; \
	  else echo "chromium/chromedriver not installed: sudo apt-get install chromium chromium-driver (tests need them)"; \
	    exit 1; fi; \
	fi
	@if ! command -v firefox-esr >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends firefox-esr >/dev/null; \
	  else echo "firefox-esr not installed: sudo apt-get install firefox-esr (tests need it)"; exit 1; fi; \
	fi
	@command -v kubectl >/dev/null 2>&1 || { echo "kubectl not found: tests/k8s render k8s/ with kubectl kustomize"; exit 1; }

# The main job on the embedded default: synthetic data -> prepare -> train (2 Ray CPU workers) -> evaluate -> serve.
demo: setup
	$(VENV)/bin/taxonet demo

# Three pytest processes: tests/e2e starts its own `ray start --head` cluster (and ends it by the mark its
# processes carry), which must not meet the in-process Ray that the other tests share; tests/integration (Ray Train,
# experiments) gets a fresh driver because, after the data tests' Ray Data reads, a task the same driver submitted
# later was three times never scheduled (Ray 2.60; docs/training.md), while the same tests pass in a process of their
# own.
# All three run even when one fails (so one red run reports everything); the target fails if any did.
test: setup system-deps
	status=0; \
	$(PY) -m pytest --ignore=tests/e2e --ignore=tests/integration $(PYTEST_ARGS) || status=1; \
	$(PY) -m pytest tests/integration $(PYTEST_ARGS) || status=1; \
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS) || status=1; \
	exit $$status

test-fast: setup
	$(PY) -m pytest -m "unit or data" $(PYTEST_ARGS)

bench: setup
	$(PY) tests/bench/bench_data.py
	$(PY) tests/bench/bench_train.py
	$(PY) tests/bench/bench_serve.py

clean:
	rm -rf $(VENV) runs taxonet-demo .pytest_cache
