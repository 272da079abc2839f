"""Jobs and clusters: job files (config), `atlas run` (job), object-store run directories (remote), `atlas submit` (submit)."""
