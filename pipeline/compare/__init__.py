"""`atlas compare`: the comparison (runner), sampling a common image set (sample), its site pages (site)."""
