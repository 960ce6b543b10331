"""The benchmark harness behind `make bench` (not a test, not part of the installed package).

Modules: `parse` (pure: wrk/pace/hey/proc output -> numbers), `report` (pure: medians, ratios,
markdown), `procs` (process groups, /proc sampling), `load` (wrk and fixed-rate runs: `pace.c`, built
by `cbuild`), `systems` (direct, consul connect proxy pair, HAProxy pair, hostmesh pair), `run` (the
orchestration and CLI), `pacecheck` (hey against pace.c on the same systems).
"""
