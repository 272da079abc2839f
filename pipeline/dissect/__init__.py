"""`atlas dissect`: what concept each unit detects, measured (network dissection, Bau et al. 2017) on a probe
of images with per-pixel concept masks, and how selective each unit is for the data set's own labels.
See docs/dissect.md."""
