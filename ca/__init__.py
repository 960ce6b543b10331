"""hostmesh.ca."""
