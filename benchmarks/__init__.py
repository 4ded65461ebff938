"""Side-by-side benchmarks against reference implementations; results go to benchmarks/results/*.json."""
