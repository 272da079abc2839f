"""The benchmarks (`atlas bench scan | host | scale | startup | render | explain | site | capacity`), together."""

from dataclasses import replace

# MobileNetV2's layers the scan benchmarks record (early, middle, late); here so the CLI can name the default
# without importing torch.
BENCH_LAYERS = "features.3,features.7,features.14"

# main when issue 25 was filed, before any of its work: the revision its "host time at least 4x lower than
# today's main" is measured against (`atlas bench host`: `git archive` of it, so the baseline is that code).
ISSUE_25_MAIN = "f302966"


def bench_scan_run(model, data: str, out: str, layers: str, batch_size: int, **options) -> dict:
    """`atlas scan` as the benchmarks run it (k 16, the previous run overwritten, no progress bar); `options`:
    any other ScanConfig field (executor, device, flush_images). Returns the manifest."""
    from pipeline.scan.runner import ScanConfig, run_scan

    config = ScanConfig(
        model=model, data=data, out=out, layers=layers, k=16, batch_size=batch_size, overwrite=True, progress=False
    )
    return run_scan(replace(config, **options))
