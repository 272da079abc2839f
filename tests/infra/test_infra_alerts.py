"""The alert rules of infra/monitoring/prometheusrule.yaml under Prometheus' own rule engine: `promtool check rules`
and `promtool test rules` with infra/monitoring/prometheusrule.test.yaml, whose input series must page (a Job whose
condition Failed is true, a RayJob in ValidationFailed or Failed, a latest.json older than 30 h, a RayCronJob that
never ticks, a missing dead-man's-switch metric) or must not (a Job whose pod failed but whose retry succeeded, a
fresh latest.json, a suspended RayCronJob). promtool comes from Debian's `prometheus` package, which `make test`
installs; without it these tests are skipped with that reason."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from repo_paths import REPO_PATH

MONITORING = REPO_PATH / "infra" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`; `make test` installs it)"
)


def write_rule_file(directory: Path) -> None:
    """The PrometheusRule's groups as a plain Prometheus rule file (what the Prometheus Operator hands Prometheus).
    Annotations are dropped: promtool's alert tests compare them too, and they are prose, not behaviour."""
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    groups = rule["spec"]["groups"]
    for group in groups:
        for r in group["rules"]:
            r.pop("annotations", None)
    (directory / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    shutil.copy(MONITORING / "prometheusrule.test.yaml", directory / "prometheusrule.test.yaml")


def promtool(directory: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=directory, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_alert_rules_pass_promtools_unit_tests(tmp_path):
    write_rule_file(tmp_path)
    checked = promtool(tmp_path, "check", "rules", "rules.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool(tmp_path, "test", "rules", "prometheusrule.test.yaml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


@needs_promtool
def test_the_old_failed_job_rule_would_page_on_a_job_that_succeeded(tmp_path):
    """Proves the unit test can fail: main's rule (kube_job_status_failed > 0, failed pods) fires for the Job
    whose first pod failed and whose retry succeeded, which prometheusrule.test.yaml says must not page."""
    write_rule_file(tmp_path)
    rules = yaml.safe_load((tmp_path / "rules.yaml").read_text())
    for group in rules["groups"]:
        for r in group["rules"]:
            if r.get("alert") == "NeuronAtlasSubmitJobFailed":
                r["expr"] = (
                    'max by (namespace, job_name) (kube_job_status_failed{job_name=~"neuron-atlas-imagenet-resnet50-submit-.*"}) > 0'
                )
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    tested = promtool(tmp_path, "test", "rules", "prometheusrule.test.yaml")
    assert tested.returncode != 0
    assert "NeuronAtlasSubmitJobFailed" in tested.stdout + tested.stderr


def test_kube_state_metrics_config_exports_what_the_cronjob_rule_reads():
    config = yaml.safe_load((MONITORING / "kube-state-metrics-raycronjob.yaml").read_text())
    (resource,) = config["spec"]["resources"]
    assert resource["groupVersionKind"] == {"group": "ray.io", "version": "v1", "kind": "RayCronJob"}
    # kube-state-metrics names them kube_customresource_<name> (the default metricNamePrefix).
    exported = {f"kube_customresource_{m['name']}": m["each"]["gauge"]["path"] for m in resource["metrics"]}
    assert exported["kube_customresource_raycronjob_last_schedule_time"] == ["status", "lastScheduleTime"]
    rule_text = (MONITORING / "prometheusrule.yaml").read_text()
    used = set(re.findall(r"kube_customresource_[a-z_]+", rule_text))
    assert used and used <= set(exported), f"rules read {used}, kube-state-metrics exports {set(exported)}"
    assert set(resource["labelsFromPath"]) == {"name", "namespace"}


def test_docs_name_every_alert_and_the_dead_mans_switch_metric():
    """infra/README.md's alert table lists exactly the PrometheusRule's alerts; docs/jobs.md names the metric."""
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    alerts = {r["alert"] for group in rule["spec"]["groups"] for r in group["rules"]}
    readme = (MONITORING.parent / "README.md").read_text()
    table = set(re.findall(r"^\| `(NeuronAtlas\w+)`", readme, flags=re.M))
    assert table == alerts, f"README table {sorted(table)} vs rules {sorted(alerts)}"
    jobs = (MONITORING.parents[1] / "docs" / "jobs.md").read_text()
    assert "neuron_atlas_latest_published_timestamp_seconds" in jobs and "Pushgateway" in jobs
    assert "**Default: `cronjob-submit.yaml`**" in readme and "PreRelease: Alpha" in readme
