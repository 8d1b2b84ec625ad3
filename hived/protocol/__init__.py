"""What nodes, clients and workers say: typed messages, their fields, pickled frames, the control plane."""
