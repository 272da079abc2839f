"""Our KubeRay manifests against KubeRay v1.7.0's own validation (tests/support/kuberay_rules.py ports it from
ray-operator/controllers/ray/utils/validation.go): each rule is shown live on a deliberately broken copy of one
of our manifests, and our manifests pass all of them. Pure Python, well under a second."""

from __future__ import annotations

import copy
import functools

import pytest
import yaml
from repo_paths import REPO_PATH
from kuberay_rules import kuberay_errors, parse_standard_cron

KUBERAY = REPO_PATH / "infra" / "kuberay"
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}


@functools.cache
def _parsed(name: str) -> dict:
    (only,) = [
        d
        for d in yaml.load_all((KUBERAY / name).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if d
    ]
    return only


def doc(name: str) -> dict:
    return copy.deepcopy(_parsed(name))


def job_spec(manifest: dict) -> dict:
    return manifest["spec"]["jobTemplate"] if manifest["kind"] == "RayCronJob" else manifest["spec"]


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"] if manifest["kind"] == "RayCluster" else job_spec(manifest)["rayClusterSpec"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "raycronjob.yaml"])
def test_our_manifests_pass_kuberay_1_7_validation(name):
    """What main shipped failed here: rayjob.yaml and raycronjob.yaml combined DeleteWorkers deletion rules with
    enableInTreeAutoscaling (validateDeletionRules), so the RayJob went ValidationFailed and the RayCronJob made
    no RayJob at all."""
    manifest = doc(name)
    assert manifest["kind"] in RAY_KINDS
    assert kuberay_errors(manifest) == []


def _mutate(name, change):
    manifest = copy.deepcopy(doc(name))
    change(manifest)
    return manifest


def _set(path_fn, key, value):
    def change(m):
        path_fn(m)[key] = value

    return change


def _add_rule(rule):
    return lambda m: job_spec(m)["deletionStrategy"]["deletionRules"].append(rule)


# (rule ported (Go function), manifest, mutation, fragment of KubeRay's message)
BROKEN = [
    (
        "validateDeletionRules: DeleteWorkers with autoscaling (the bug main shipped)",
        "raycronjob.yaml",
        _add_rule({"policy": "DeleteWorkers", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 0}}),
        "'DeleteWorkers' not supported with autoscaling enabled",
    ),
    (
        "validateDeletionRules: DeleteWorkers with autoscaling, RayJob",
        "rayjob.yaml",
        _add_rule({"policy": "DeleteWorkers", "condition": {"jobStatus": "FAILED", "ttlSeconds": 0}}),
        "'DeleteWorkers' not supported with autoscaling enabled",
    ),
    (
        "validateDeletionRules: duplicate (JobStatus, policy)",
        "rayjob.yaml",
        _add_rule({"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 7200}}),
        "duplicate rule for DeletionPolicyType 'DeleteCluster'",
    ),
    (
        "validateTTLConsistency: DeleteSelf before DeleteCluster",
        "rayjob.yaml",
        lambda m: job_spec(m)["deletionStrategy"]["deletionRules"][1]["condition"].update(ttlSeconds=60),
        "DeleteSelf TTL (60) must be >= DeleteCluster TTL (3600)",
    ),
    (
        "validateDeletionCondition: both jobStatus and jobDeploymentStatus",
        "raycronjob.yaml",
        lambda m: job_spec(m)["deletionStrategy"]["deletionRules"][0]["condition"].update(jobDeploymentStatus="Failed"),
        "cannot set both JobStatus and JobDeploymentStatus",
    ),
    (
        "validateDeletionCondition: negative TTL",
        "rayjob.yaml",
        lambda m: job_spec(m)["deletionStrategy"]["deletionRules"][0]["condition"].update(ttlSeconds=-1),
        "TTLSeconds must be non-negative",
    ),
    (
        "validateDeletionConfiguration: deletionRules with shutdownAfterJobFinishes",
        "rayjob.yaml",
        lambda m: job_spec(m).update(shutdownAfterJobFinishes=True),
        "mutually exclusive",
    ),
    (
        "validateDeletionConfiguration: TTL without shutdownAfterJobFinishes",
        "raycronjob.yaml",
        lambda m: job_spec(m).update(ttlSecondsAfterFinished=3600),
        "cannot have TTLSecondsAfterFinished",
    ),
    (
        "validateDeletionConfiguration: legacy onSuccess mixed with deletionRules",
        "rayjob.yaml",
        lambda m: job_spec(m)["deletionStrategy"].update(onSuccess={"policy": "DeleteCluster"}),
        "Cannot use both legacy",
    ),
    (
        "validateLegacyDeletionPolicies: DeleteWorkers with autoscaling",
        "rayjob.yaml",
        lambda m: job_spec(m).update(
            deletionStrategy={"onSuccess": {"policy": "DeleteWorkers"}, "onFailure": {"policy": "DeleteCluster"}}
        ),
        "DeleteWorkers currently does not support RayCluster with autoscaling",
    ),
    (
        "ValidateRayJobSpec: suspend without shutdownAfterJobFinishes",
        "rayjob.yaml",
        lambda m: job_spec(m).update(suspend=True),
        "not allowed to be suspended",
    ),
    (
        "ValidateRayJobSpec: InteractiveMode with backoffLimit",
        "rayjob.yaml",
        lambda m: job_spec(m).update(submissionMode="InteractiveMode"),
        "BackoffLimit is incompatible with InteractiveMode",
    ),
    (
        "ValidateRayJobSpec: SidecarMode with a submitter pod template",
        "raycronjob.yaml",
        lambda m: job_spec(m).update(submissionMode="SidecarMode"),
        "SidecarMode doesn't support SubmitterPodTemplate",
    ),
    (
        "ValidateRayJobSpec: activeDeadlineSeconds must be positive",
        "rayjob.yaml",
        lambda m: job_spec(m).update(activeDeadlineSeconds=0),
        "activeDeadlineSeconds must be a positive integer",
    ),
    (
        "ValidateRayJobSpec: K8s token auth refused for RayJobs",
        "rayjob.yaml",
        lambda m: cluster_spec(m)["authOptions"].update(enableK8sTokenAuth=True),
        "K8s token auth mode is currently not supported for RayJob",
    ),
    (
        "ValidateRayJobMetadata: name longer than 47",
        "rayjob.yaml",
        lambda m: m["metadata"].update(name="neuron-atlas-imagenet-resnet50-with-a-much-longer-name"),
        "no more than 47 characters",
    ),
    (
        "ValidateRayJobMetadata: not a DNS-1035 label",
        "rayjob.yaml",
        lambda m: m["metadata"].update(name="1-neuron-atlas"),
        "DNS1035",
    ),
    (
        "ValidateRayCronJobSpec: name longer than 36 (child RayJob <name>-<minutes>)",
        "raycronjob.yaml",
        lambda m: m["metadata"].update(name="neuron-atlas-resnet50-nightly-x123456"),
        "no more than 36 characters",
    ),
    (
        "ValidateRayCronJobSpec: TZ in the schedule",
        "raycronjob.yaml",
        lambda m: m["spec"].update(schedule="CRON_TZ=Etc/UTC 0 2 * * *"),
        "cannot use TZ or CRON_TZ",
    ),
    (
        "ValidateRayCronJobSpec: cron.ParseStandard (six fields)",
        "raycronjob.yaml",
        lambda m: m["spec"].update(schedule="0 0 2 * * *"),
        "invalid cron schedule",
    ),
    (
        "ValidateRayCronJobSpec: cron.ParseStandard (hour 24)",
        "raycronjob.yaml",
        lambda m: m["spec"].update(schedule="0 24 * * *"),
        "invalid cron schedule",
    ),
    (
        "ValidateRayCronJobSpec: time.LoadLocation",
        "raycronjob.yaml",
        lambda m: m["spec"].update(timeZone="Mars/Olympus_Mons"),
        "invalid time zone",
    ),
    (
        "ValidateRayCronJobSpec: empty timeZone",
        "raycronjob.yaml",
        lambda m: m["spec"].update(timeZone=""),
        "timeZone must not be empty",
    ),
    (
        "ValidateRayClusterMetadata: name longer than 53",
        "raycluster.yaml",
        lambda m: m["metadata"].update(name="neuron-atlas-" + "x" * 41),
        "no more than 53 characters",
    ),
    (
        "ValidateRayClusterSpec: minReplicas > maxReplicas",
        "raycluster.yaml",
        lambda m: cluster_spec(m)["workerGroupSpecs"][0].update(minReplicas=9),
        "greater than maxReplicas",
    ),
    (
        "ValidateRayClusterSpec: suspended worker group with autoscaling",
        "raycluster.yaml",
        lambda m: cluster_spec(m)["workerGroupSpecs"][0].update(suspend=True),
        "cannot be suspended with Autoscaler enabled",
    ),
    (
        "validateWorkerGroupIdleTimeout: per-group idleTimeoutSeconds needs autoscaler v2",
        "raycronjob.yaml",
        lambda m: cluster_spec(m)["workerGroupSpecs"][0].update(idleTimeoutSeconds=300),
        "autoscaler v2 is not enabled",
    ),
    (
        "ValidateRayClusterSpec: autoscalerOptions.version and RAY_enable_autoscaler_v2 both set",
        "rayjob.yaml",
        lambda m: cluster_spec(m)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": "RAY_enable_autoscaler_v2", "value": "1"}
        ),
        "please only use the former",
    ),
    (
        "validateRayGroupResources: num-gpus in rayStartParams and resources",
        "raycluster.yaml",
        lambda m: cluster_spec(m)["workerGroupSpecs"][0].update(resources={"GPU": "1"}),
        "should not be set in both rayStartParams and Resources",
    ),
    (
        "ValidateRayClusterSpec: token auth needs rayVersion >= 2.52",
        "raycronjob.yaml",
        lambda m: cluster_spec(m).update(rayVersion="2.51.0"),
        "minimum Ray version is 2.52.0",
    ),
    (
        "ValidateRayClusterSpec: spec.networkPolicy behind the alpha RayClusterNetworkPolicy gate",
        "raycluster.yaml",
        lambda m: cluster_spec(m).update(networkPolicy={"mode": "DenyAll"}),
        "RayClusterNetworkPolicy feature gate",
    ),
]


@pytest.mark.parametrize("rule,name,change,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_each_ported_rule_rejects_a_broken_manifest(rule, name, change, message):
    broken = _mutate(name, change)
    found = kuberay_errors(broken)
    assert any(message in error for error in found), f"{rule}: expected {message!r}, KubeRay port said {found}"


@pytest.mark.parametrize(
    "schedule,valid",
    [
        ("0 2 * * *", True),
        ("*/15 1-5 * * MON-FRI", True),
        ("0 0 1 jan,jul *", True),
        ("@daily", True),
        ("@every 1h30m", True),
        ("0 2 * *", False),
        ("60 2 * * *", False),
        ("0 2 32 * *", False),
        ("0 2 * * 7", False),
        ("5-1 * * * *", False),
        ("*/0 * * * *", False),
        ("@fortnightly", False),
    ],
)
def test_cron_parser_port_matches_robfig_cron(schedule, valid):
    """robfig/cron/v3 ParseStandard (what ValidateRayCronJobSpec calls): 5 fields with these bounds (dow 0-6),
    names, ranges, steps, and the @ descriptors."""
    if valid:
        parse_standard_cron(schedule)
    else:
        with pytest.raises(ValueError):
            parse_standard_cron(schedule)
