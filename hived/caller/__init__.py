"""The caller's side: `hived.connect()`, one map as the caller sees it, and the link to a node."""
