# hostmesh — developer entry points. `make test` is what CI runs (.ci/run).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PKGS    := agent registry ca
BUILD   := setup.py packaging/backend packaging/compiled_wheel.py

.PHONY: test lint typecheck unit fleet consul ansible-newest demo bench profile clean deb systemd-boot

test: lint typecheck unit fleet

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	HOSTMESH_COMPILE=0 $(BIN)/pip install -q -e '.[dev]'  # pure Python: tests run the source tree
	touch $@

venv: $(STAMP)

consul:
	@./scripts/install-consul.sh >/dev/null

# The newest ansible-core line a Python 3.11 controller runs (2.19), beside the venv's 2.18 (the dev
# extra's, cheaper per role run): the site playbook's tests run on it (tests/test_ansible.py,
# NEWEST_ANSIBLE). Its dependencies are the venv's.
NEWEST_ANSIBLE := .cache/ansible-newest
$(NEWEST_ANSIBLE)/.installed: $(STAMP)
	rm -rf $(NEWEST_ANSIBLE)
	$(BIN)/pip install -q --no-deps --target $(NEWEST_ANSIBLE) 'ansible-core>=2.19,<2.20'
	touch $@

ansible-newest: $(NEWEST_ANSIBLE)/.installed

lint: $(STAMP)
	$(BIN)/ruff check $(PKGS) $(BUILD) tests bench scripts
	$(BIN)/ruff format --check $(PKGS) $(BUILD) tests bench scripts

# mypy cannot follow setuptools' editable finder, so it checks a tree of links that mirrors the
# installed layout: .typecheck/hostmesh/{agent,registry,ca} -> the source folders.
typecheck: $(STAMP)
	@mkdir -p .typecheck/hostmesh
	@for p in $(PKGS); do ln -sfn ../../$$p .typecheck/hostmesh/$$p; done
	$(BIN)/mypy -p hostmesh.agent -p hostmesh.registry -p hostmesh.ca

# Five pytest-xdist workers: much of the tier's time is waiting (agents starting, Consul answering,
# timers running out): with two, a 2-core machine was still idle 36 % of the tier (a fresh clone's run
# of f4ce477, /proc/stat each second); with three, the tier took 1,128 s on a quiet 2-core host, with
# four 988-1,083 s, using ~1.8 of the 2 cores (fresh clones of 9c001b1, 4eade48, d2faac3 and 96eaf53,
# 2026-12-07), with five 994 s (427483b); each module stays on one worker (tests/conftest.py).
# UNIT_WORKERS=0 runs it in this process. -rfEs: the summary names each skipped test and why, beside
# the failures and errors, so a log shows what a run did not test.
# --durations=30: a CI log names the tests the tier's time goes to (its budget: `make test` < 20 min).
UNIT_WORKERS ?= 5
unit: $(STAMP) consul ansible-newest
	CONSUL_BIN=$$(./scripts/install-consul.sh) $(BIN)/pytest -q -rfEs -p no:cacheprovider -n $(UNIT_WORKERS) --dist loadgroup -m "not fleet" --durations=30 $(PYTEST_ARGS)

# The fleet tier (tests/fleet/): hosts as network namespaces, a 3-server Consul cluster, hostmesh from
# its wheel. Needs root (CI is) and iproute2, installed here when missing; skips without root.
# -s and --durations: the measurements each test prints (restart times, leader election), the
# fleet's bring-up time, each test's duration; pytest's last line is the tier's run time. -rfEs as unit's.
fleet: $(STAMP) consul
	@[ "$$(id -u)" != 0 ] || ./packaging/ensure-tools.sh ip
	CONSUL_BIN=$$(./scripts/install-consul.sh) $(BIN)/pytest -q -rfEs -p no:cacheprovider -m fleet -s --durations=0 tests/fleet $(PYTEST_ARGS)

demo: $(STAMP) consul
	CONSUL_BIN=$$(./scripts/install-consul.sh) $(BIN)/python -m hostmesh.agent.demo

# Bytecode compiled first, as an installed package has it: an agent must not compile its sources at start.
# The agents run the compiled build (bench/compiled.py, built into .cache/compiled on first use).
bench: $(STAMP) consul
	$(BIN)/python -m compileall -q $(PKGS)
	CONSUL_BIN=$$(./scripts/install-consul.sh) $(BIN)/python bench/run.py $(BENCH_ARGS)

# Per-request Python calls, allocator calls and syscalls of an L7 and an L4 pair, per side (counts,
# not times: valid on a loaded machine). bench/README.md.
profile: $(STAMP) consul
	$(BIN)/python -m compileall -q $(PKGS)
	CONSUL_BIN=$$(./scripts/install-consul.sh) $(BIN)/python bench/profile_l7.py $(PROFILE_ARGS)

# dist/hostmesh-<v>.tar.gz, the pure and the compiled wheel, and dist/hostmesh_<v>_<arch>.deb (venv in
# /opt/hostmesh) with the compiled one (README "The compiled build"; HOSTMESH_COMPILE=0: the pure one).
deb: $(STAMP)
	PYTHON=$(BIN)/python ./packaging/build-deb.sh

# Opt-in, not part of `test`: both units under a real systemd (a Debian 12 tree booted with
# systemd-nspawn, the .deb installed in it). Root; docs/systemd-boot-test.md.
systemd-boot: $(STAMP) consul
	HOSTMESH_SYSTEMD_BOOT=1 CONSUL_BIN=$$(./scripts/install-consul.sh) $(BIN)/pytest -q -p no:cacheprovider -s tests/test_systemd_boot.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .typecheck build dist *.egg-info
