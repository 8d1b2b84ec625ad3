"""A node's work: the owner's book of jobs, the exchange of ranges across the mesh, the pool and its workers."""
