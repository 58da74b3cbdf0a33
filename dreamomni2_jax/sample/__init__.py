"""Multi-reference sampling: the pipeline and the FlowMatch Euler schedule."""
