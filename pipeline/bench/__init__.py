"""The benchmarks (`atlas bench scan | render | explain | site | capacity`), together."""
