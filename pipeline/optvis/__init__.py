"""Feature visualization by gradient ascent, split the way Lucid's optvis is.

* ``objectives``: what to maximise, a function of the model's activations, composable with + - and *;
* ``param``: image parameterizations, each returning ``(params, image_fn)``;
* ``transforms``: random, differentiable robustness transforms applied before every forward pass;
* ``presets``: the regularisation recipes of Yosinski et al. (2015) and Olah et al. (2017), as data that
  builds its parts (parameterization, transforms, step rule);
* ``steps``: the step rules (Adam on the objective; Yosinski's regularized normalised ascent);
* ``render``: the optimisation loop, batched over units (batch dimension = units), seeded.
"""
