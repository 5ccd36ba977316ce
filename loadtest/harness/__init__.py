"""Server processes and load generators shared by tests, the demo and the benchmarks."""
