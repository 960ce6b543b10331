"""The L4 data path: TCP between services over mutual TLS 1.3, intentions enforced.

    app -> outbound.py (one listener per upstream) ==mTLS, wire.py frames==> inbound.py -> app
                         pool.py reuses mTLS connections      pump.py moves the bytes both ways

Modules: `wire` (frame codec, sans-IO), `pump` (ends, pipe, backpressure, half-close), `pool`
(handshake amortization and its security argument), `outbound`, `inbound`, and `stacks`, where
each direction's stack (accept -> identify -> authorize -> route -> balance -> forward) is assembled
in one function. Everything reads the config only through `SnapshotHolder.current`, once per
downstream connection; nothing here talks to Consul.
"""
