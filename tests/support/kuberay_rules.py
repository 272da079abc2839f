"""KubeRay v1.7.0's validation rules for the fields infra/kuberay uses, ported from its Go source so the tests can
run them on our manifests (ray-project/kuberay, tag v1.7.0 = 59d663aeec13760646da3db9c1cf8cfe883e30b7,
ray-operator/controllers/ray/utils/validation.go unless a docstring says otherwise).

Each function returns the first error message KubeRay would give (the Go functions return at the first error;
validateDeletionRules joins all of its own), or None. Feature gates are KubeRay 1.7's defaults
(pkg/features/features.go): RayJobDeletionPolicy on (beta), RayClusterNetworkPolicy / RayClusterMTLS /
RayClusterHistoryServer off (alpha). Only the rules that can touch what our manifests set are ported; the rest of
validation.go (GCS fault tolerance, TLS, history server, RayService) is about fields we leave unset, and each port
says which it leaves out.
"""

from __future__ import annotations

import re
import zoneinfo

# utils/constant.go
MAX_RAY_CLUSTER_NAME_LENGTH = 53
MAX_RAY_JOB_NAME_LENGTH = MAX_RAY_CLUSTER_NAME_LENGTH - 6
MAX_RAY_CRON_JOB_NAME_LENGTH = MAX_RAY_JOB_NAME_LENGTH - 11
RAY_CONTAINER_INDEX = 0
RAY_ENABLE_AUTOSCALER_V2 = "RAY_enable_autoscaler_v2"
DELETION_ORDER = ["DeleteWorkers", "DeleteCluster", "DeleteSelf"]
# k8s.io/apimachinery/pkg/util/validation: IsDNS1035Label
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def is_dns1035_label(name: str) -> bool:
    return len(name) <= 63 and DNS_1035.fullmatch(name) is not None


def _env(container: dict, name: str) -> dict | None:
    return next((e for e in container.get("env", []) if e.get("name") == name), None)


def is_autoscaling_enabled(spec: dict | None) -> bool:
    """utils/util.go IsAutoscalingEnabled."""
    return bool(spec) and spec.get("enableInTreeAutoscaling") is True


def is_autoscaling_v2_enabled(spec: dict | None) -> bool:
    """utils/util.go IsAutoscalingV2Enabled."""
    return bool(spec) and (spec.get("autoscalerOptions") or {}).get("version") == "v2"


def validate_ray_cluster_metadata(metadata: dict) -> str | None:
    """ValidateRayClusterMetadata."""
    name = metadata.get("name", "")
    if len(name) > MAX_RAY_CLUSTER_NAME_LENGTH:
        return f"RayCluster name should be no more than {MAX_RAY_CLUSTER_NAME_LENGTH} characters"
    if not is_dns1035_label(name):
        return "RayCluster name should be a valid DNS1035 label"
    return None


def validate_ray_job_metadata(metadata: dict) -> str | None:
    """ValidateRayJobMetadata."""
    name = metadata.get("name", "")
    if len(name) > MAX_RAY_JOB_NAME_LENGTH:
        return (
            f"The RayJob metadata is invalid: RayJob name should be no more than {MAX_RAY_JOB_NAME_LENGTH} characters"
        )
    if not is_dns1035_label(name):
        return "The RayJob metadata is invalid: RayJob name should be a valid DNS1035 label"
    return None


def _validate_ray_group_resources(group: str, params: dict, resources: dict) -> str | None:
    """validateRayGroupResources."""
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and resources:
        return f"resource fields should not be set in both rayStartParams and Resources for {group} group"
    return None


def _version_tuple(text: str) -> tuple[int, ...] | None:
    m = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(x or 0) for x in m.groups()) if m else None


def validate_ray_cluster_spec(spec: dict, annotations: dict | None = None) -> str | None:
    """ValidateRayClusterSpec: head/worker containers, replicas, rayStartParams vs resources and labels, worker
    idleTimeoutSeconds and priority (autoscaler v2 only), suspend with autoscaling, the autoscaler v2 restart policy,
    autoscalerOptions.idleTimeoutSeconds, token auth vs rayVersion, networkPolicy/tlsOptions/historyServerOptions
    behind their alpha gates. Left out: the GCS fault-tolerance and TLS detail rules (fields we do not set)."""
    head = spec["headGroupSpec"]["template"]["spec"]
    if not head.get("containers"):
        return "headGroupSpec should have at least one container"
    head_group = spec["headGroupSpec"]
    err = _validate_ray_group_resources("Head", head_group.get("rayStartParams", {}), head_group.get("resources", {}))
    if err:
        return err
    if "labels" in head_group.get("rayStartParams", {}):
        return "rayStartParams['labels'] is not supported for Head group; please use the top-level Labels field instead"
    autoscaling = is_autoscaling_enabled(spec)
    head_container = head["containers"][RAY_CONTAINER_INDEX]
    v2_env = _env(head_container, RAY_ENABLE_AUTOSCALER_V2)
    v2 = is_autoscaling_v2_enabled(spec) or (v2_env is not None and v2_env.get("value") in ("1", "true"))
    for group in spec.get("workerGroupSpecs", []):
        name = group.get("groupName")
        if not group["template"]["spec"].get("containers"):
            return "workerGroupSpec should have at least one container"
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            return f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled"
        if lo is not None and lo < 0:
            return f"worker group {name} has negative minReplicas {lo}"
        if hi is not None and hi < 0:
            return f"worker group {name} has negative maxReplicas {hi}"
        if lo is not None and hi is not None and lo > hi:
            return f"worker group {name} has minReplicas {lo} greater than maxReplicas {hi}"
        err = _validate_ray_group_resources(name, group.get("rayStartParams", {}), group.get("resources", {}))
        if err:
            return err
        if "labels" in group.get("rayStartParams", {}):
            return f"rayStartParams['labels'] is not supported for {name} group"
        # validateWorkerGroupIdleTimeout
        idle = group.get("idleTimeoutSeconds")
        if idle is not None:
            if idle < 0:
                return f"worker group {name}: idleTimeoutSeconds must be non-negative, got {idle}"
            if not v2:
                return f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled"
        # validateWorkerGroupPriority
        priority = group.get("priority")
        if priority:
            version = _version_tuple(spec.get("rayVersion", ""))
            if version is None or version < (2, 56, 0):
                return f"worker group {name}: priority is set, but minimum Ray version is 2.56.0"
            if not v2:
                return f"worker group {name}: priority is set to {priority}, but autoscaler v2 is not enabled"
    if not autoscaling and v2_env is not None and v2_env.get("value") in ("1", "true"):
        return f"environment variable {RAY_ENABLE_AUTOSCALER_V2} cannot be set when enableInTreeAutoscaling is false"
    if autoscaling:
        for group in spec.get("workerGroupSpecs", []):
            if group.get("suspend"):
                return f"worker group {group.get('groupName')} cannot be suspended with Autoscaler enabled"
        if (spec.get("autoscalerOptions") or {}).get("version") and v2_env is not None:
            return f"both .spec.autoscalerOptions.version and head Pod env var {RAY_ENABLE_AUTOSCALER_V2} are set, please only use the former"
        if is_autoscaling_v2_enabled(spec):
            if head.get("restartPolicy", "Never") != "Never":
                return "restartPolicy for head Pod should be Never or unset when using autoscaler V2"
            for group in spec.get("workerGroupSpecs", []):
                if group["template"]["spec"].get("restartPolicy", "Never") != "Never":
                    return f"restartPolicy for worker group {group.get('groupName')} should be Never or unset"
    idle = (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    if idle is not None and idle < 0:
        return f"autoscalerOptions.idleTimeoutSeconds must be non-negative, got {idle}"
    if _env(spec.get("autoscalerOptions") or {}, "KUBERAY_GEN_AUTOSCALER_START_CMD"):
        return "autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD"
    if spec.get("historyServerOptions") is not None:
        return "RayClusterHistoryServer feature gate is not enabled"
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":
        version = _version_tuple(spec.get("rayVersion", ""))
        if not spec.get("rayVersion"):
            return (
                "authOptions.mode is 'token' but RayVersion was not specified. Ray version 2.52.0 or later is required"
            )
        if version is None:
            return f"authOptions.mode is 'token' but RayVersion format is invalid: {spec['rayVersion']}"
        if version < (2, 52, 0):
            return f"authOptions.mode is 'token' but minimum Ray version is 2.52.0, got {spec['rayVersion']}"
        if auth.get("enableK8sTokenAuth"):
            if version < (2, 55, 0):
                return "authOptions.enableK8sTokenAuth is enabled but minimum Ray version is 2.55.0"
            if auth.get("secretName"):
                return "authOptions.enableK8sTokenAuth is enabled and authOptions.secretName is also set"
    elif auth.get("enableK8sTokenAuth"):
        return "authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'"
    if spec.get("networkPolicy") is not None:
        return "spec.networkPolicy requires the RayClusterNetworkPolicy feature gate to be enabled"
    if spec.get("tlsOptions") is not None:
        return "spec.tlsOptions requires the RayClusterMTLS feature gate to be enabled"
    return None


def _validate_deletion_condition(condition: dict) -> str | None:
    """validateDeletionCondition (also the CRD's CEL rules on a condition)."""
    has_status, has_deployment = "jobStatus" in condition, "jobDeploymentStatus" in condition
    if has_status and has_deployment:
        return "cannot set both JobStatus and JobDeploymentStatus at the same time"
    if not has_status and not has_deployment:
        return "exactly one of JobStatus and JobDeploymentStatus must be set"
    if condition.get("ttlSeconds", 0) < 0:
        return "TTLSeconds must be non-negative"
    return None


def _validate_deletion_rules(job: dict) -> str | None:
    """validateDeletionRules + validateTTLConsistency: per rule, then duplicates, then TTLs non-decreasing along
    DeleteWorkers <= DeleteCluster <= DeleteSelf for each condition; all errors joined."""
    spec = job["spec"]
    selector_mode = bool(spec.get("clusterSelector"))
    errors: list[str] = []
    groups: dict[tuple[str, str], dict[str, int]] = {}
    for i, rule in enumerate(spec["deletionStrategy"]["deletionRules"]):
        condition, policy = rule.get("condition", {}), rule.get("policy")
        err = _validate_deletion_condition(condition)
        if err:
            errors.append(f"deletionRules[{i}]: {err}")
            continue
        if selector_mode and policy in ("DeleteCluster", "DeleteWorkers"):
            errors.append(
                f"deletionRules[{i}]: DeletionPolicyType '{policy}' not supported when ClusterSelector is set"
            )
            continue
        if is_autoscaling_enabled(spec.get("rayClusterSpec")) and policy == "DeleteWorkers":
            errors.append(
                f"deletionRules[{i}]: DeletionPolicyType 'DeleteWorkers' not supported with autoscaling enabled"
            )
            continue
        key = (
            ("JobStatus", condition["jobStatus"])
            if "jobStatus" in condition
            else ("JobDeploymentStatus", condition["jobDeploymentStatus"])
        )
        ttls = groups.setdefault(key, {})
        if policy in ttls:
            errors.append(
                f"deletionRules[{i}]: duplicate rule for DeletionPolicyType '{policy}' and {key[0]} '{key[1]}'"
            )
            continue
        ttls[policy] = condition.get("ttlSeconds", 0)
    for (kind, value), ttls in groups.items():
        previous = None
        for policy in DELETION_ORDER:
            if policy not in ttls:
                continue
            if previous is not None and ttls[policy] < previous[1]:
                errors.append(
                    f"for {kind} '{value}': {policy} TTL ({ttls[policy]}) must be >= {previous[0]} TTL ({previous[1]})"
                )
            previous = (policy, ttls[policy])
    return "\n".join(errors) or None


def _validate_deletion_configuration(job: dict) -> str | None:
    """validateDeletionConfiguration (+ validateLegacyDeletionPolicies)."""
    spec = job["spec"]
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if not shutdown and spec.get("ttlSecondsAfterFinished", 0) > 0:
        return "a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"
    strategy = spec.get("deletionStrategy")
    if strategy is None:
        return None
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    rules = bool(strategy.get("deletionRules"))
    if rules and shutdown:
        return "spec.shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules are mutually exclusive"
    if rules and legacy:
        return "Cannot use both legacy onSuccess/onFailure fields and deletionRules simultaneously"
    if legacy:
        on_success, on_failure = strategy.get("onSuccess"), strategy.get("onFailure")
        if on_success is None or on_failure is None:
            return "both DeletionStrategy.OnSuccess and DeletionStrategy.OnFailure must be set"
        policies = {on_success.get("policy"), on_failure.get("policy")}
        if None in policies:
            return "the DeletionPolicyType field of DeletionStrategy.OnSuccess/OnFailure cannot be unset"
        if spec.get("clusterSelector") and policies & {"DeleteCluster", "DeleteWorkers"}:
            return "the ClusterSelector mode doesn't support DeletionStrategy=DeleteCluster/DeleteWorkers"
        if "DeleteWorkers" in policies and is_autoscaling_enabled(spec.get("rayClusterSpec")):
            return "DeletionStrategy=DeleteWorkers currently does not support RayCluster with autoscaling enabled"
        if shutdown and "DeleteNone" in policies:
            return "shutdownAfterJobFinshes is set to 'true' while deletion policy is 'DeleteNone'"
        return None
    if rules:
        return _validate_deletion_rules(job)
    return "DeletionStrategy requires either BOTH onSuccess and onFailure, OR the deletionRules field (cannot be empty)"


def validate_ray_job_spec(job: dict) -> str | None:
    """ValidateRayJobSpec: suspend, TTL, deletion configuration, clusterSelector, submission modes (Interactive and
    Sidecar restrictions), K8s token auth, the embedded RayClusterSpec, deadlines and backoffLimit. Left out: the
    runtimeEnvYAML parse (we set none)."""
    spec = job["spec"]
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if spec.get("suspend") and not shutdown:
        return "a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended"
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        return "TTLSecondsAfterFinished must be a non-negative integer"
    err = _validate_deletion_configuration(job)
    if err:
        return err
    selector = spec.get("clusterSelector") or {}
    if spec.get("suspend") and selector:
        return "the ClusterSelector mode doesn't support the suspend operation"
    if spec.get("rayClusterSpec") is None and not selector:
        return "one of RayClusterSpec or ClusterSelector must be set"
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = spec.get("backoffLimit")
    if selector:
        if not selector.get("ray.io/cluster"):
            return "cluster name in ClusterSelector should not be empty"
        if mode == "SidecarMode":
            return "ClusterSelector is not supported in SidecarMode"
        if backoff is not None and backoff > 0:
            return "BackoffLimit is incompatible with ClusterSelector mode"
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        return "BackoffLimit is incompatible with InteractiveMode"
    if mode == "SidecarMode":
        if spec.get("submitterPodTemplate") is not None:
            return "Currently, SidecarMode doesn't support SubmitterPodTemplate"
        if spec.get("submitterConfig") is not None:
            return "Currently, SidecarMode doesn't support SubmitterConfig"
        restart = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].get("restartPolicy", "Never")
        if restart != "Never":
            return "restartPolicy for head Pod should be Never or unset when using SidecarMode"
    cluster = spec.get("rayClusterSpec")
    if cluster is not None:
        if (cluster.get("authOptions") or {}).get("enableK8sTokenAuth"):
            return "K8s token auth mode is currently not supported for RayJob"
        err = validate_ray_cluster_spec(cluster, job.get("metadata", {}).get("annotations"))
        if err:
            return f"The RayJob spec is invalid: {err}"
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(field) is not None and spec[field] <= 0:
            return f"{field} must be a positive integer"
    if backoff is not None and backoff < 0:
        return "backoffLimit must be a positive integer"
    return None


# --- robfig/cron/v3 ParseStandard (parser.go): 5 fields or a descriptor; what ValidateRayCronJobSpec calls. ---
_BOUNDS = {  # parser.go: minutes, hours, dom, months, dow with their names
    0: (0, 59, {}),
    1: (0, 23, {}),
    2: (1, 31, {}),
    3: (1, 12, {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}),
    4: (0, 6, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}),
}
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def _parse_int(text: str, names: dict) -> int:
    if text.lower() in names:
        return names[text.lower()]
    if not text.isdigit():
        raise ValueError(f"failed to parse int from {text}")
    return int(text)


def _parse_range(expr: str, index: int) -> None:
    """getRange: number | number-number | * | ?, optionally /step, inside the field's bounds."""
    lo_bound, hi_bound, names = _BOUNDS[index]
    range_and_step = expr.split("/")
    if len(range_and_step) > 2:
        raise ValueError(f"too many slashes: {expr}")
    low_high = range_and_step[0].split("-")
    single = len(low_high) == 1
    if low_high[0] in ("*", "?"):
        start, end = lo_bound, hi_bound
    else:
        start = _parse_int(low_high[0], names)
        if len(low_high) == 1:
            end = start
        elif len(low_high) == 2:
            end = _parse_int(low_high[1], names)
        else:
            raise ValueError(f"too many hyphens: {expr}")
    if len(range_and_step) == 2:
        step = _parse_int(range_and_step[1], {})
        if single and low_high[0] not in ("*", "?"):
            end = hi_bound
        if step == 0:
            raise ValueError(f"step of range should be a positive number: {expr}")
    if start < lo_bound:
        raise ValueError(f"beginning of range ({start}) below minimum ({lo_bound}): {expr}")
    if end > hi_bound:
        raise ValueError(f"end of range ({end}) above maximum ({hi_bound}): {expr}")
    if start > end:
        raise ValueError(f"beginning of range ({start}) beyond end of range ({end}): {expr}")


def parse_standard_cron(spec: str) -> None:
    """Raises ValueError where cron.ParseStandard returns an error."""
    if not spec.strip():
        raise ValueError("empty spec string")
    if spec.startswith("@"):
        if spec.startswith("@every "):
            if not re.fullmatch(r"@every (\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", spec):
                raise ValueError(f"failed to parse duration {spec}")
            return
        if spec not in _DESCRIPTORS:
            raise ValueError(f"unrecognized descriptor: {spec}")
        return
    fields = spec.split()
    if len(fields) != 5:
        raise ValueError(f"expected exactly 5 fields, found {len(fields)}: {fields}")
    for index, field in enumerate(fields):
        for expr in field.split(","):
            _parse_range(expr, index)


def validate_ray_cron_job_spec(cron: dict) -> str | None:
    """ValidateRayCronJobSpec: name length (the child RayJob is "<name>-<minutes>"), no TZ in the schedule, a
    standard cron schedule, a loadable non-empty timeZone, then the jobTemplate through ValidateRayJobSpec."""
    name = cron["metadata"].get("name", "")
    if len(name) > MAX_RAY_CRON_JOB_NAME_LENGTH:
        return f"RayCronJob name should be no more than {MAX_RAY_CRON_JOB_NAME_LENGTH} characters"
    spec = cron["spec"]
    schedule = spec.get("schedule", "")
    if "TZ" in schedule:
        return "cannot use TZ or CRON_TZ in schedule, use timeZone field instead"
    try:
        parse_standard_cron(schedule)
    except ValueError as error:
        return f"invalid cron schedule: {error}"
    if "timeZone" in spec:
        zone = spec["timeZone"]
        if zone == "":
            return "timeZone must not be empty string"
        try:
            zoneinfo.ZoneInfo(zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as error:
            return f"invalid time zone: {error}"
    err = validate_ray_job_spec({"metadata": {}, "spec": spec["jobTemplate"]})
    return f"invalid RayJob template: {err}" if err else None


def kuberay_errors(manifest: dict) -> list[str]:
    """What the KubeRay 1.7.0 operator refuses in a manifest of ours: the RayJob controller's validateRayJob
    (metadata, spec), the RayCluster controller's metadata + spec checks, the RayCronJob controller's
    ValidateRayCronJobSpec."""
    kind = manifest.get("kind")
    if kind == "RayCluster":
        checks = [validate_ray_cluster_metadata(manifest["metadata"]), validate_ray_cluster_spec(manifest["spec"])]
    elif kind == "RayJob":
        checks = [validate_ray_job_metadata(manifest["metadata"]), validate_ray_job_spec(manifest)]
    elif kind == "RayCronJob":
        checks = [validate_ray_cron_job_spec(manifest)]
    else:
        return []
    return [c for c in checks if c]
