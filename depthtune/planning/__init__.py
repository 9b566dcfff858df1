"""Planning, before anything trains: the exact parameter audit per layer with its closed-form check and memory /
FLOPs estimates, `depthtune plan` (the largest batch that fits), and the predicted training time."""
