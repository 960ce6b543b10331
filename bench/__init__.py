"""The benchmark harness behind `make bench` (not a test, not part of the installed package).

Modules: `parse` (pure: wrk/hey/proc output -> numbers), `report` (pure: medians, ratios, markdown),
`procs` (process groups, /proc sampling), `load` (wrk and hey runs), `systems` (direct, consul
connect proxy pair, HAProxy pair, hostmesh pair), `run` (the orchestration and CLI).
"""
