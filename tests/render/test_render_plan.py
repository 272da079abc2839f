"""The render plan: what a request draws (pure; no run, no model). The end-to-end CLI checks are in test_render.py."""

from __future__ import annotations

import pytest

from pipeline.render.plan import (
    ALL,
    DEFAULT_PICTURES,
    Estimate,
    RenderOptions,
    describe,
    parse_classes,
    requested,
    resolve_plan,
)

RECORDED = ["conv1", "conv2", "fc"]
LIVE = {"conv1": [0, 1, 3], "conv2": list(range(8)), "fc": [0, 1, 2, 4]}  # conv1 unit 2, fc class 3: dead


def plan_for(
    layers=None, units=None, classes=None, pictures=None, recorded=RECORDED, output="fc", n_classes=5, **options
):
    return resolve_plan(
        recorded, LIVE, output, n_classes, RenderOptions(**requested(layers, units, classes, pictures), **options)
    )


def test_naming_layers_and_units_renders_them_and_nothing_else():
    """The issue's case: `--layers features.7 --units 0-7` must not also visualize every class."""
    plan = plan_for(layers=["conv2"], units="0-7")
    assert plan.views == {"conv2": list(range(8))} and plan.featvis == {"conv2": list(range(8))}
    assert plan.classes == [] and plan.pictures == {}


def test_naming_nothing_draws_a_picture_for_every_live_unit_and_nothing_costly():
    plan = plan_for()
    assert plan.pictures == LIVE and plan.pictures_top == DEFAULT_PICTURES
    assert plan.views == {} and plan.featvis == {} and plan.classes == []


def test_classes_come_only_when_asked_for():
    assert plan_for(classes="0,3").classes == [0, 3]  # a dead class still gets its visualization
    assert plan_for(classes="0,3").views == {} and plan_for(classes="0,3").pictures == {}
    assert plan_for(classes="all").classes == [0, 1, 2, 3, 4]
    assert plan_for(classes="none").pictures == LIVE  # asking for no classes names nothing
    # Naming the output layer asks for its units' classes (all of them without --units) and their views.
    named = plan_for(layers=["fc"], units="1-2")
    assert named.classes == [1, 2] and named.views == {"fc": [1, 2]} and named.featvis == {}
    assert plan_for(layers=["fc"]).classes == list(range(5))
    assert plan_for(layers=["conv2", "fc"], units="0", classes="none").classes == []


def test_units_all_is_the_full_atlas_and_pictures_add_to_a_named_request():
    full = plan_for(units="all")
    assert full.views == LIVE and full.featvis == {"conv1": [0, 1, 3], "conv2": list(range(8))}
    assert full.classes == []
    assert plan_for(layers=["conv1"], pictures=2).pictures == LIVE
    assert plan_for(pictures=0).pictures == {}
    assert plan_for(layers=["conv2"], units="1", featvis=False).featvis == {}
    assert plan_for(layers=["conv2"], units="1", views=False).views == {}


def test_the_output_layer_can_be_named_without_being_recorded():
    plan = plan_for(layers=["fc"], recorded=["conv1", "conv2"])
    assert plan.classes == list(range(5)) and plan.views == {} and plan.featvis == {}


def test_bad_requests_fail_before_any_work():
    with pytest.raises(ValueError, match="conv9 were not recorded"):
        plan_for(layers=["conv9"])
    with pytest.raises(ValueError, match=r"class\(es\) \[5, 7\] out of range: the output layer fc has 5"):
        plan_for(classes="4-5,7")
    with pytest.raises(ValueError, match="pictures must be between 0 and"):
        plan_for(pictures=-1)
    with pytest.raises(ValueError, match="expected unit numbers"):
        requested(None, "3-x", None, None)
    assert parse_classes(None) is None and parse_classes("all") == ALL and parse_classes("none") == frozenset()


def test_the_plan_says_per_kind_what_will_be_drawn():
    plan = plan_for(layers=["conv2", "fc"], units="0-3,6", pictures=1)  # fc: no unit 6, class 3 dead
    lines = describe(
        plan,
        todo={"pictures": 10, "views": 4, "featvis": 5, "classvis": 0},
        present={"pictures": 1, "views": 4, "featvis": 0, "classvis": 4},
    )
    text = "\n".join(lines)
    assert "pictures (top-1 crops + heat overlays): 15 unit(s) (conv1 0-1,3, conv2 0-7, fc 0-2,4)" in text
    assert "every top image's crop, overlay, deconvnet and guided backprop: 8 unit(s) (conv2 0-3,6, fc 0-2)" in text
    assert "feature visualizations: 5 unit(s) (conv2 0-3,6)" in text
    assert "class visualizations of fc: 4 class(es) (0-3)" in text
    assert (
        "to draw now: pictures 10, every top image 4, feature visualizations 5, class visualizations 0; "
        "already present: pictures 1, every top image 4, feature visualizations 0, class visualizations 4"
    ) in text
    assert describe(plan_for(pictures=0), {}, {}) == [
        "nothing asked for (name --layers, --units or --classes, or --pictures N)"
    ]


def test_the_estimate_extrapolates_each_kind_from_its_first_task():
    estimate = Estimate()
    assert estimate.add("pictures", 100, 2.0) is True  # 0.02 s per view
    assert estimate.add("pictures", 100, 9.0) is False  # only the first task of a kind sets its rate
    assert estimate.left({"pictures": 500, "units": 16}, actors=2) == (pytest.approx(5.0), ["units"])
    assert estimate.add("units", 8, 40.0) is True  # 5 s per unit
    assert estimate.left({"pictures": 500, "units": 16}, actors=2) == (pytest.approx(45.0), [])
    assert estimate.left({"pictures": 0, "units": 0}, actors=1) == (0.0, [])
