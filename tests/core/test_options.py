"""One declaration per option (issue 28 item 1): for every declared scan option, `atlas scan`'s flag, the job
file's [scan] key and ScanConfig's field exist under their pinned spellings and take the declaration's default;
a value outside the declared range or choices is refused by all three doors with the same words."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.cli import build_parser
from pipeline.cluster.config import ConfigError, ScanSection
from pipeline.scan.runner import ScanConfig
from pipeline.scan.settings import SCAN_OPTION, SCAN_OPTIONS

# The spellings users type, written out by hand (docs/usage.md, docs/jobs.md): a declaration may not rename them.
FLAGS = {
    "layers": "--layers",
    "k": "--k",
    "bottom_k": "--bottom-k",
    "record": "--record",
    "batch_size": "--batch-size",
    "actors": "--actors",
    "threads": "--threads",
    "device": "--device",
    "flush_images": "--flush-images",
    "precision": "--precision",
    "channels_last": "--channels-last",
    "decode": "--decode",
    "executor": "--executor",
    "stall_seconds": "--stall-seconds",
}
JOB_KEYS = set(FLAGS) - {"executor"}


def _scan_parser():
    parser = build_parser()
    action = next(a for a in parser._subparsers._group_actions if "scan" in a.choices)
    return action.choices["scan"]


def test_every_scan_option_is_declared_once_and_reaches_every_door():
    assert {o.name for o in SCAN_OPTIONS} == set(FLAGS)
    parser = _scan_parser()
    flags = {flag: action for action in parser._actions for flag in action.option_strings}
    args = parser.parse_args(["--model", "m", "--data", "d", "--out", "o"])
    config_defaults = {f.name: f.default for f in dataclasses.fields(ScanConfig)}
    section_defaults = {f.name: f.default for f in dataclasses.fields(ScanSection)}
    for name, flag in FLAGS.items():
        assert flag in flags, flag
        assert getattr(args, name) == SCAN_OPTION[name].default == config_defaults[name], name
        if name in JOB_KEYS:
            assert section_defaults[name] == SCAN_OPTION[name].default, name
    assert JOB_KEYS <= set(section_defaults) and "executor" not in section_defaults
    assert SCAN_OPTION["flush_images"].default == 50_000 and SCAN_OPTION["stall_seconds"].default == 600.0


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("k", 0, "k must be between 1 and 10,000, got 0"),
        ("flush_images", 0, "flush_images must be between 1 and 1,000,000,000, got 0"),
        ("record", "some", "record must be 'topk' or 'all', got 'some'"),
        ("precision", "fp8", "precision must be one of fp32, tf32, bf16, fp16, got 'fp8'"),
        ("device", "tpu", "device must be one of auto, cuda, cpu, got 'tpu'"),
    ],
)
def test_a_value_out_of_bounds_is_refused_alike_by_config_and_job_file(name, value, words):
    with pytest.raises(ValueError) as refused:
        ScanConfig(model=None, data="d", out="o", **{name: value}).validate()
    assert str(refused.value) == words
    with pytest.raises(ConfigError) as refused:
        ScanSection(**{name: value}).check()
    assert str(refused.value) == f"scan.{words}"


def test_every_dissect_option_reaches_every_door():
    from pipeline.cluster.config import DissectSection
    from pipeline.dissect.runner import DissectConfig
    from pipeline.dissect.settings import DISSECT_OPTION, DISSECT_OPTIONS

    flags_by_name = {"probe": "--probe", "batch_size": "--batch-size", "actors": "--actors", "threads": "--threads"}
    flags_by_name["device"] = "--device"
    assert {o.name for o in DISSECT_OPTIONS} == set(flags_by_name)
    parser = build_parser()
    action = next(a for a in parser._subparsers._group_actions if "dissect" in a.choices)
    dissect = action.choices["dissect"]
    flags = {flag for a in dissect._actions for flag in a.option_strings}
    args = dissect.parse_args(["RUN"])
    config_defaults = {f.name: f.default for f in dataclasses.fields(DissectConfig)}
    section_defaults = {f.name: f.default for f in dataclasses.fields(DissectSection)}
    for name, flag in flags_by_name.items():
        assert flag in flags
        assert getattr(args, name) == DISSECT_OPTION[name].default == config_defaults[name], name
        if name != "threads":  # not a job-file key
            assert section_defaults[name] == DISSECT_OPTION[name].default, name
    assert DISSECT_OPTION["batch_size"].default == 16
    with pytest.raises(ConfigError, match=r"^dissect.device must be one of auto, cuda, cpu, got 'tpu'$"):
        DissectSection(device="tpu").check()
    with pytest.raises(ValueError, match=r"^batch_size must be between 1 and 4,096, got 0$"):
        DissectConfig(run="r", batch_size=0).validate()


def _subparser(command: str):
    parser = build_parser()
    action = next(a for a in parser._subparsers._group_actions if command in a.choices)
    return action.choices[command]


def test_every_score_option_reaches_every_door():
    from pipeline.cluster.config import ScoreSection
    from pipeline.score.runner import ScoreConfig
    from pipeline.score.settings import SCORE_OPTION, SCORE_OPTIONS

    # Hand-written (docs/score.md, docs/jobs.md): the flags and the [score] keys users type.
    flags_by_name = {
        "similarity": "--similarity",
        "similarity_weights": "--similarity-weights",
        "image_size": "--image-size",
        "references": "--references",
        "tasks": "--tasks",
        "temperature": "--temperature",
        "batch_size": "--batch-size",
        "executor": "--executor",
        "actors": "--actors",
        "threads": "--threads",
        "device": "--device",
    }
    job_keys = {"similarity", "references", "tasks", "actors", "device"}
    assert {o.name for o in SCORE_OPTIONS} == set(flags_by_name)
    score = _subparser("score")
    flags = {flag for a in score._actions for flag in a.option_strings}
    assert {"--layers", "--kinds", "--dreamsim-cache"} <= flags  # not options of the config's own: kept by hand
    args = score.parse_args(["RUN"])
    config_defaults = {f.name: f.default for f in dataclasses.fields(ScoreConfig)}
    section_fields = {f.name: f for f in dataclasses.fields(ScoreSection)}
    for name, flag in flags_by_name.items():
        assert flag in flags, flag
        assert getattr(args, name) == SCORE_OPTION[name].default == config_defaults[name], name
        if name in job_keys:
            assert section_fields[name].default == SCORE_OPTION[name].default, name
    assert set(section_fields) == job_keys | {"enabled", "kinds"}
    assert ScoreSection().kinds == ["whole", "crop"] and args.kinds == "whole,crop"
    assert (SCORE_OPTION["references"].default, SCORE_OPTION["tasks"].default) == (9, 20)
    with pytest.raises(ConfigError, match=r"^score.similarity must be 'pooled' or 'dreamsim', got 'lpips'$"):
        ScoreSection(similarity="lpips").check()
    with pytest.raises(ConfigError, match=r"^score.references must be between 1 and 10,000, got 0$"):
        ScoreSection(references=0).check()
    with pytest.raises(ValueError, match=r"^references must be between 1 and 10,000, got 0$"):
        ScoreConfig(run="r", references=0).validate()
    with pytest.raises(ValueError, match=r"^executor must be 'ray' or 'local', got 'dask'$"):
        ScoreConfig(run="r", executor="dask").validate()


def test_every_explain_option_reaches_the_flag_and_the_config():
    from pipeline.cli.explain import _explain_config
    from pipeline.explain.explainer import ExplainConfig
    from pipeline.explain.settings import EXPLAIN_OPTION, EXPLAIN_OPTIONS

    flags_by_name = {
        "target": "--target",
        "methods": "--methods",
        "layer": "--layer",
        "window": "--window",
        "stride": "--stride",
        "fill": "--fill",
        "chunk": "--chunk",
        "smoothgrad": "--smoothgrad",
        "percentile": "--percentile",
        "metrics": "--metrics",
        "metric_steps": "--metric-steps",
    }
    assert {o.name for o in EXPLAIN_OPTIONS} == set(flags_by_name)
    explain = _subparser("explain")
    flags = {flag for a in explain._actions for flag in a.option_strings}
    assert set(flags_by_name.values()) <= flags
    args = explain.parse_args(["--model", "m", "img.jpg"])
    for name in flags_by_name:
        assert getattr(args, name) == EXPLAIN_OPTION[name].default, name
    config = _explain_config(args)
    # The command line's defaults are the config's own (comma lists as tuples), written out by hand here.
    expected = {
        "methods": ("saliency", "occlusion", "cam", "gradcam"),
        "target": "auto",
        "layer": None,
        "window": 32,
        "stride": 16,
        "fill": "dataset_mean",
        "chunk": None,
        "smoothgrad": 0,
        "percentile": 95.0,
        "metrics": (),
        "metric_steps": 50,
    }
    config_defaults = {f.name: f.default for f in dataclasses.fields(ExplainConfig)}
    for name, value in expected.items():
        assert getattr(config, name) == value == config_defaults[name], name
    given = explain.parse_args(
        ["--model", "m", "x.jpg", "--methods", "cam, saliency", "--metrics", "deletion", "--percentile", "-1"]
    )
    config = _explain_config(given)
    assert (config.methods, config.metrics, config.percentile) == (("cam", "saliency"), ("deletion",), None)


def test_every_compare_option_reaches_every_door():
    from pipeline.cluster.config import CompareSection
    from pipeline.compare.runner import compare_runs
    from pipeline.compare.settings import COMPARE_OPTION, COMPARE_OPTIONS
    import inspect

    assert {o.name for o in COMPARE_OPTIONS} == {"previous", "sample", "seed"}
    compare = _subparser("compare")
    flags = {flag for a in compare._actions for flag in a.option_strings}
    assert {"--sample", "--seed", "--out"} <= flags and "--previous" not in flags  # RUN_A is positional
    args = compare.parse_args(["A", "B", "--out", "o"])
    defaults = {name: p.default for name, p in inspect.signature(compare_runs).parameters.items()}
    for name in ("sample", "seed"):
        assert getattr(args, name) == COMPARE_OPTION[name].default == defaults[name], name
    assert [f.name for f in dataclasses.fields(CompareSection)] == ["previous"]
    assert CompareSection().previous is None
    with pytest.raises(ConfigError, match=r"^compare.previous must be a local run directory, got 's3://b/r'$"):
        CompareSection(previous="s3://b/r").check()
