"""Block nodes and the block job kinds."""
