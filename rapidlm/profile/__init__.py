"""Cost model and profiler: what a step of a model costs (FLOPs, bytes, time) and where the time goes."""
