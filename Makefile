# kdcli: `make install`, `make test`, then `make smoke` or `make paper`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
KDCLI   = $(BIN)/kdcli
# torch/torchvision versions the suite is tested with; override for another platform
TORCH  ?= torch==2.14.1 torchvision==0.29.1
SEEDS  ?= 1
# The shared data folder of this project's machines, when present; else kdcli's own lookup
# ($$KDCLI_DATA_DIR, then the cache, then torchvision's downloader).
ifneq ($(wildcard ../shared/data/mnist),)
export KDCLI_DATA_DIR ?= $(abspath ../shared/data)
endif

.PHONY: install test smoke bench paper teacher student distill tsweep data3pct report clean

install: $(BIN)/kdcli
$(BIN)/kdcli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH) -e '.[test]'

test:
	$(BIN)/pytest tests

# every command end to end on tiny experiments (about a minute on CPU)
smoke:
	$(KDCLI) train-teacher -c experiments/smoke/teacher.yaml --force
	$(KDCLI) train-teacher -c experiments/smoke/student.yaml --force
	$(KDCLI) distill -c experiments/smoke/distill.yaml --force
	$(KDCLI) train-ensemble -c experiments/smoke/ensemble.yaml --force
	$(KDCLI) eval runs/smoke-distill

bench:
	$(KDCLI) bench

clean:
	rm -rf runs/smoke-*
