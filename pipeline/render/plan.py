"""What a render draws: which units get which kinds, resolved from what was asked (pure: no files, no model).

Three scopes, so a request renders what it names and nothing else (docs/rendering.md):

- **pictures**: the top-``pictures`` crops and heat overlays of every live unit of every recorded layer (cheap:
  one forward pass per image; the picture every unit shows on the site);
- **units asked for** (``layers`` x ``units``): crops, overlays and reconstructions of every top image, and a
  feature visualization (costly: gradient ascent, one backward pass per image);
- **classes**: class visualizations of the output layer, only when ``classes`` is given or the output layer is
  among the named ``layers`` (then the classes are its ``units``, or all of them).

``RenderOptions()`` asks for every unit of every recorded layer (the full atlas) and no classes; the CLI and job
files map "nothing named" to pictures only (``units=frozenset()``, ``pictures=DEFAULT_PICTURES``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence

from pipeline.ranges import check_range

ALL = "all"
# Top images per unit drawn as pictures by default: the thumbnail (rank 0) and a few more for the unit page.
# Measured in docs/rendering.md ("A picture for every unit").
DEFAULT_PICTURES = 1


# The unit objectives `--objective` and job files name (pipeline.optvis.objectives.UNIT_OBJECTIVES implements
# each): the channel's maximum over positions, or the unit at the centre position (Olah et al.'s "neuron").
OBJECTIVES = ("channel", "neuron")


@dataclass(frozen=True)
class VisSettings:
    """What determines a feature visualization; a finished PNG records these and is redone if they change."""

    preset: str = "lucid"
    steps: int | None = None  # None: the preset's
    size: int = 128
    seed: int = 0
    objective: str = "channel"

    def validate(self) -> None:
        from pipeline.optvis.presets import get_preset

        check_range("steps", self.steps)
        check_range("size", self.size, "feature-visualization size")
        get_preset(self.preset, self.steps)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")

    def resolved(self) -> dict:
        from pipeline.optvis.presets import get_preset

        return {**asdict(self), "steps": get_preset(self.preset, self.steps).steps}


@dataclass(frozen=True)
class RenderOptions:
    layers: tuple[str, ...] | None = None  # None: every recorded layer
    units: frozenset[int] | None = None  # of `layers`; None: every live unit; empty: none
    # Output-layer classes to visualize: ALL, a set (empty: none), or None: the output layer's `units` when
    # `layers` names it, else none.
    classes: frozenset[int] | Literal["all"] | None = None
    pictures: int = 0  # top-N crops + overlays of every live unit of every recorded layer
    vis: VisSettings = VisSettings()
    featvis: bool = True
    views: bool = True
    units_per_task: int = 16
    address: str | None = None
    actors: int | None = None
    device: str = "auto"  # as the scan's: 'auto' | 'cuda' (even before an autoscaler added GPUs) | 'cpu'
    # 'local': in this process, no Ray; 'ray'; 'auto': local where Ray would run one actor on this machine anyway
    # (no cluster named or running, under 16 CPUs or one GPU; pipeline.render.runner.choose_executor)
    executor: str = "auto"
    progress: bool = True

    @classmethod
    def from_settings(
        cls,
        *,
        layers: str | Sequence[str] | None,
        units: str | None,
        classes: str | None,
        pictures: int | None,
        preset: str,
        steps: int | None,
        size: int,
        seed: int,
        objective: str,
        featvis: bool = True,
        views: bool = True,
        units_per_task: int = 16,
        address: str | None = None,
        actors: int | None = None,
        device: str = "auto",
        executor: str = "auto",
        progress: bool = True,
    ) -> RenderOptions:
        """The options from settings as users write them, the one place for the CLI's flags and a job file's
        [render] section: layers as a comma list or a list, units and classes as '0-7,12' | 'all' | 'none',
        the selection by `requested`'s rule."""
        if isinstance(layers, str):
            layers = [name.strip() for name in layers.split(",") if name.strip()]
        return cls(
            **requested(layers, units, classes, pictures),
            vis=VisSettings(preset=preset, steps=steps, size=size, seed=seed, objective=objective),
            featvis=featvis,
            views=views,
            units_per_task=units_per_task,
            address=address,
            actors=actors,
            device=device,
            executor=executor,
            progress=progress,
        )


def parse_units(text: str | None) -> set[int] | None:
    """'0-7,12' -> {0..7, 12}; None or 'all' -> None (all units); 'none' -> empty set."""
    if not text or text.strip() == "all":
        return None
    if text.strip() == "none":
        return set()
    units: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"expected unit numbers and ranges like 0-7,12 (or all, none); got {part!r}")
        units.update(range(int(first), int(last or first) + 1))
    return units


def parse_classes(text: str | None) -> frozenset[int] | Literal["all"] | None:
    """--classes / render.classes: None (not given) -> None; 'all' -> ALL; 'none' -> empty; '0-9,207' -> set."""
    if text is None:
        return None
    if text.strip() == "all":
        return ALL
    return frozenset(parse_units(text) or ())


def requested(
    layers: list[str] | tuple[str, ...] | None, units: str | None, classes: str | None, pictures: int | None
) -> dict:
    """RenderOptions' selection from what a user named (`atlas render` flags, a job file's [render] keys), the
    one rule: naming layers, units or classes renders them and nothing else; naming nothing draws the pictures
    of every unit (DEFAULT_PICTURES each). Units not given are every live unit of the named layers, or none
    when no layer is named; `units="all"` is every live unit of every recorded layer (the full atlas).
    Returns the keyword arguments layers, units, classes, pictures."""
    chosen_classes = parse_classes(classes)
    named = layers is not None or units is not None or bool(chosen_classes)
    if units is not None:
        chosen_units = parse_units(units)
    else:
        chosen_units = None if layers is not None else set()
    return {
        "layers": tuple(layers) if layers is not None else None,
        "units": frozenset(chosen_units) if chosen_units is not None else None,
        "classes": chosen_classes,
        "pictures": pictures if pictures is not None else (0 if named else DEFAULT_PICTURES),
    }


@dataclass
class RenderPlan:
    """Per layer, the units each scope covers (before subtracting what is already on disk)."""

    pictures_top: int
    pictures: dict[str, list[int]] = field(default_factory=dict)  # layer -> live units
    views: dict[str, list[int]] = field(default_factory=dict)  # layer -> units asked for (every top image)
    featvis: dict[str, list[int]] = field(default_factory=dict)  # layer -> units asked for
    classes: list[int] = field(default_factory=list)
    output_layer: str | None = None


def resolve_plan(
    recorded: list[str],
    live: dict[str, list[int]],
    output_layer: str | None,
    n_classes: int | None,
    options: RenderOptions,
) -> RenderPlan:
    """The plan for `options` over a run whose recorded layers are `recorded` (in depth order) with live units
    `live[layer]`; `output_layer` / `n_classes`: the model's logits module and its class count (None if none).
    ValueError for a layer that was not recorded (the output layer may be named without being recorded: it
    then asks for class visualizations only) or a class out of range."""
    check_range("pictures", options.pictures)
    named = list(options.layers) if options.layers is not None else None
    unknown = [name for name in named or [] if name not in recorded and name != output_layer]
    if unknown:
        raise ValueError(f"layer(s) {', '.join(unknown)} were not recorded; recorded: {', '.join(recorded)}")
    plan = RenderPlan(pictures_top=options.pictures, output_layer=output_layer)
    if options.pictures:
        plan.pictures = {layer: list(live.get(layer, [])) for layer in recorded if live.get(layer)}
    for layer in named if named is not None else recorded:
        units = [u for u in live.get(layer, []) if options.units is None or u in options.units]
        if not units:
            continue
        if options.views and layer in recorded:
            plan.views[layer] = units
        if options.featvis and layer != output_layer:
            plan.featvis[layer] = units
    classes = options.classes
    if classes is None and named is not None and output_layer in named and n_classes:
        # The output layer's units (those it has: --units may name units of a wider layer too).
        classes = ALL if options.units is None else frozenset(u for u in options.units if u < n_classes)
    if classes is not None and options.featvis and output_layer is not None and n_classes:
        wanted = list(range(n_classes)) if classes == ALL else sorted(classes)
        bad = [c for c in wanted if not 0 <= c < n_classes]
        if bad:
            raise ValueError(
                f"class(es) {bad[:5]} out of range: the output layer {output_layer} has {n_classes} classes"
            )
        plan.classes = wanted
    return plan


def describe(plan: RenderPlan, todo: dict[str, int], present: dict[str, int]) -> list[str]:
    """The plan as lines for the log: per kind, the units (classes) asked for, how many are to draw now and how
    many are already on disk. `todo` / `present`: kind -> unit (class) counts, as the runner found them."""

    def units(by_layer: dict[str, list[int]]) -> str:
        total = sum(len(u) for u in by_layer.values())
        layers = ", ".join(f"{layer} {_ranges(u)}" for layer, u in by_layer.items())
        return f"{total:,} unit(s)" + (
            f" ({layers})" if layers and len(by_layer) <= 4 else f" in {len(by_layer)} layers" if by_layer else ""
        )

    lines = []
    if plan.pictures:
        lines.append(f"pictures (top-{plan.pictures_top} crops + heat overlays): {units(plan.pictures)}")
    if plan.views:
        lines.append(f"every top image's crop, overlay, deconvnet and guided backprop: {units(plan.views)}")
    if plan.featvis:
        lines.append(f"feature visualizations: {units(plan.featvis)}")
    if plan.classes:
        lines.append(
            f"class visualizations of {plan.output_layer}: {len(plan.classes):,} class(es) ({_ranges(plan.classes)})"
        )
    if not lines:
        return ["nothing asked for (name --layers, --units or --classes, or --pictures N)"]
    key = {
        "pictures": "pictures",
        "views": "every top image",
        "featvis": "feature visualizations",
        "classvis": "class visualizations",
    }
    lines.append(
        "to draw now: "
        + ", ".join(f"{key[kind]} {todo.get(kind, 0):,}" for kind in key if kind in todo or kind in present)
        + "; already present: "
        + ", ".join(f"{key[kind]} {present.get(kind, 0):,}" for kind in key if kind in todo or kind in present)
    )
    return lines


def _ranges(values: list[int] | frozenset[int], limit: int = 6) -> str:
    """[0, 1, 2, 3, 7] -> '0-3,7' (at most `limit` runs, then '...')."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    text = ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs[:limit])
    return text + (",..." if len(runs) > limit else "")


class Estimate:
    """Time left, extrapolated per kind of task from the first task of that kind to finish.

    Work is counted in units (pictures: views); ``add(kind, work, seconds)`` records a finished task,
    ``left(remaining, actors)`` gives seconds for the remaining work per kind, None for a kind not measured
    yet (its first task has not finished)."""

    def __init__(self) -> None:
        self.rate: dict[str, float] = {}  # kind -> seconds per unit of work, from its first task

    def add(self, kind: str, work: int, seconds: float) -> bool:
        """Record a finished task; True when it was the first of its kind (the estimate changed)."""
        if kind in self.rate or work <= 0:
            return False
        self.rate[kind] = seconds / work
        return True

    def left(self, remaining: dict[str, int], actors: int) -> tuple[float, list[str]]:
        """(seconds for the measured kinds' remaining work on `actors` actors, kinds not measured yet)."""
        seconds = sum(self.rate[kind] * work for kind, work in remaining.items() if kind in self.rate)
        return seconds / max(actors, 1), sorted(
            kind for kind, work in remaining.items() if work and kind not in self.rate
        )
