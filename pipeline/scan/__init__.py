"""The scan: model workers (recorder), the driver (runner), durable progress (flushes)."""
