"""The mesh: membership, the lease election, gossip and steering as sans-IO cores, and the shell that runs them."""
