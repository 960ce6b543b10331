"""hostmesh.registry."""
