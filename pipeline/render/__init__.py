"""`atlas render`: the runner (planning, actors, the index), the worker, deconvnet/guided backprop, crops, reading originals back."""
