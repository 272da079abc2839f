"""Cascading model-parameter randomization (Adebayo et al. 2018, "Sanity checks for saliency maps", 3.1).

An explanation of a model's decision must change when the model's weights are destroyed. Starting from the
top (the logits), the weights of one more block at a time are re-initialised, cumulatively, down to the
first layer; after each step the method's map of the SAME images for the SAME target classes is computed
again and compared with the trained model's map by Spearman's rank correlation (ties get their average
rank). A method whose maps stay highly correlated after the whole network was randomised does not depend on
what the model learned (the paper found this for guided backprop and guided Grad-CAM; an edge detector, which
ignores the model, stays at 1): it is flagged.

Blocks are the modules `--layers all` records (a torchvision block, a conv's rectifying ReLU) plus the
output layer; parameterised modules outside every block (a ResNet's stem conv and batch norm) are blocks of
their own. Re-initialisation is each module's own ``reset_parameters()`` (PyTorch's default initialisation;
batch norm: scale 1, shift 0, running statistics reset) under a fixed seed, on a copy: the caller's model is
never modified. Cost: one map per block per method (MobileNetV2: 20 blocks), on top of the trained map.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

from pipeline.models import _NORMS, conv_block_outputs, layer_shapes, output_layer

logger = logging.getLogger(__name__)

# A method whose map after randomizing every block still has this rank correlation with the trained model's
# is flagged: it barely depends on the model's weights.
FLAG_SPEARMAN = 0.5

ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, inputs, targets) -> maps


def rank_average(values: torch.Tensor) -> torch.Tensor:
    """(N, P) -> (N, P) float64 ranks 1..P along dim 1, tied values sharing their average rank."""
    n, p = values.shape
    order = torch.sort(values.double(), dim=1, stable=True)
    sorted_values, indices = order.values, order.indices
    ranks = torch.empty(n, p, dtype=torch.float64, device=values.device)
    for i in range(n):
        # Start of each run of equal values, and the run each sorted position belongs to.
        new_run = torch.ones(p, dtype=torch.bool, device=values.device)
        new_run[1:] = sorted_values[i, 1:] != sorted_values[i, :-1]
        run = torch.cumsum(new_run.long(), 0) - 1
        starts = torch.nonzero(new_run).flatten()
        ends = torch.cat([starts[1:], torch.tensor([p], device=values.device)])
        average = (starts + ends - 1).double() / 2 + 1  # mean of ranks start+1 .. end
        ranks[i, indices[i]] = average[run]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, ...) x (N, ...) -> (N,) Spearman rank correlation per row (Pearson of average ranks); 0 where a
    map is constant (no ranking to correlate)."""
    ra, rb = rank_average(a.reshape(len(a), -1)), rank_average(b.reshape(len(b), -1))
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    denominator = ra.norm(dim=1) * rb.norm(dim=1)
    rho = (ra * rb).sum(dim=1) / denominator.clamp(min=1e-300)
    return torch.where(denominator > 0, rho, torch.zeros_like(rho)).float()


def cascade_blocks(model: nn.Module, image_size: int) -> list[tuple[str, list[str]]]:
    """(block, its parameterised module names), TOP first: the order in which the cascade re-initialises them."""
    names = [info.name for info in layer_shapes(model, image_size)]
    blocks = conv_block_outputs(model, names)
    logits = output_layer(model)
    if logits and logits not in blocks:
        blocks.append(logits)
    groups: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not name or not any(True for _ in module.parameters(recurse=False)):
            continue
        owner = next((block for block in blocks if name == block or name.startswith(block + ".")), None)
        # A conv (and its norm) whose block is represented by its ReLU (VGG: features.0 -> features.1).
        owner = owner or _rectified_by(model, name, blocks) or name
        groups.setdefault(owner, []).append(name)
    return list(reversed(list(groups.items())))


def _rectified_by(model: nn.Module, name: str, blocks: list[str]) -> str | None:
    """The block that stands for a bare conv: the activation after it (past norms), as `--layers all` picks."""
    parent, _, child = name.rpartition(".")
    container = model.get_submodule(parent) if parent else model
    siblings = [n for n, _ in container.named_children()]
    if child not in siblings or not isinstance(container.get_submodule(child), (nn.Conv2d, *_NORMS)):
        return None
    for sibling in siblings[siblings.index(child) + 1 :]:
        qualified = f"{parent}.{sibling}" if parent else sibling
        if qualified in blocks:
            return qualified
        if not isinstance(container.get_submodule(sibling), _NORMS):
            return None
    return None


def reinitialize(model: nn.Module, names: list[str], seed: int) -> None:
    """Reset every parameterised module of `names` (and their children) in place, reproducibly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            for module in model.get_submodule(name).modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                if hasattr(module, "reset_running_stats"):
                    module.reset_running_stats()


def cascading_randomization(
    model: nn.Module,
    explain: ExplainFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    image_size: int,
    seed: int = 0,
    trained: torch.Tensor | None = None,
) -> tuple[list[str], torch.Tensor]:
    """(the block re-initialised at each step, (N, steps) Spearman correlation with the trained model's map).

    `explain(model, inputs, targets) -> (N, H, W)` must build its method on the model it is given (hooks and
    traced graphs of the trained model would not see the randomised copy). `trained`: the trained model's
    maps if already computed.
    """
    targets = torch.as_tensor(targets, device=inputs.device).long().view(len(inputs))
    reference = explain(model, inputs, targets) if trained is None else trained
    randomized = copy.deepcopy(model).eval()
    labels, columns = [], []
    for step, (block, names) in enumerate(cascade_blocks(model, image_size)):
        reinitialize(randomized, names, seed + step)
        maps = explain(randomized, inputs, targets)
        labels.append(block)
        columns.append(spearman(reference.detach().cpu(), maps.detach().cpu()))
    return labels, torch.stack(columns, dim=1)
