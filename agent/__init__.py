"""hostmesh.agent."""
