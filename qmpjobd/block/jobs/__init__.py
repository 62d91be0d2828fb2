"""The block job kinds: each a Job subclass doing its work on block nodes."""
