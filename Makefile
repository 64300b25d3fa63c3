# craft_ray developer commands. `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
export OMP_WAIT_POLICY := PASSIVE
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test test-fast bench lint clean

# Re-installs only when pyproject.toml changed since the last install.
install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The embedded default: SFT then CRAFT on phantom chest x-rays with the tiny models, local Ray,
# judges on Ray Serve, MLflow in ./mlflow.db; ends with the SFT-vs-CRAFT table (about 5 minutes on 2 cores).
demo: install
	$(PY) -m craft_ray
	$(PY) -m craft_ray.train name=demo-$$(date +%Y%m%d-%H%M%S)

# pytest exit code 5 means "no tests collected": report it instead of failing the build.
test: install
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

bench: install
	@for f in bench/*.py; do \
	  case $$f in *_gpu.py) echo "== $$f: needs a CUDA GPU, skipped (run it on a GPU machine)"; continue;; esac; \
	  echo "== $$f"; $(PY) $$f || exit 1; done

lint: install
	$(VENV)/bin/ruff check craft_ray tests bench clusters

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs .craft_cache sweeps_out ray_results test-artifacts
