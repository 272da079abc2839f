"""The benchmarks (`atlas bench scan | startup | render | explain | site | capacity`), together."""

# MobileNetV2's layers the scan benchmarks record (early, middle, late); here so the CLI can name the default
# without importing torch.
BENCH_LAYERS = "features.3,features.7,features.14"
