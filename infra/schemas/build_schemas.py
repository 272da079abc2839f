#!/usr/bin/env python3
"""Regenerate the vendored JSON schemas in infra/schemas/ (see README.md beside this file).

Inputs (offline once downloaded):
  * the Kubernetes v1.30 "local-strict" definitions bundled in the PyPI wheel kubernetes-validate==1.37.0
    (kubernetes_validate/kubernetes-json-schema/v1.30.0-local-strict/_definitions.json, JSON Schema 2020-12,
    every object additionalProperties: false, i.e. what `kubectl apply` with strict field validation rejects);
  * KubeRay's own CRDs at tag v1.7.0 (commit 59d663aeec13760646da3db9c1cf8cfe883e30b7) of ray-project/kuberay,
    ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,raycronjobs}.yaml: the ray.io/v1 openAPIV3Schema of
    each, converted as is (crd_to_json_schema: descriptions dropped, objects strict as with strict field
    validation, int-or-string and nullable spelled in JSON Schema). The root metadata is the Kubernetes ObjectMeta.

Each output file is self-contained: a root "$ref" into "$defs" that hold only the definitions reachable from it, with
descriptions dropped to keep the files small.

Usage (from the repository root):
  pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv
  git clone --depth 1 --branch v1.7.0 https://github.com/ray-project/kuberay /tmp/kuberay
  python infra/schemas/build_schemas.py --wheel /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl \
      --kuberay-crds /tmp/kuberay/ray-operator/config/crd/bases
  (without --wheel it reads kubernetes-validate installed in the running Python)
"""
from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
K8S_VERSION = "v1.30.0-local-strict"
DEFS_MEMBER = f"kubernetes_validate/kubernetes-json-schema/{K8S_VERSION}/_definitions.json"
# Draft 7: the definitions use only $ref/$defs pointers, and meta-validating a 250 KB schema takes ~3 s under
# Draft 7 against ~17 s under 2020-12 (its $dynamicRef meta-schema), which the test suite does once per file.
DRAFT = "http://json-schema.org/draft-07/schema#"


def k8s(name: str) -> dict:
    return {"$ref": f"#/$defs/{name}"}


KUBERAY_TAG = "v1.7.0"
KUBERAY_COMMIT = "59d663aeec13760646da3db9c1cf8cfe883e30b7"
CRD_DIR = "ray-operator/config/crd/bases"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}


def without_descriptions(node, maps=("properties", "$defs", "patternProperties"), finish=None):
    """node rebuilt without its documentation strings ("description" keywords), never a property that happens to
    be named description: `maps` are the keywords whose values map names to schemas. `finish(object)`, when
    given, rewrites each rebuilt object, innermost first."""
    if isinstance(node, list):
        return [without_descriptions(x, maps, finish) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "description" and isinstance(value, str):
            continue
        if key in maps:
            out[key] = {k: without_descriptions(v, maps, finish) for k, v in value.items()}
        else:
            out[key] = without_descriptions(value, maps, finish)
    return finish(out) if finish else out


def _strict_crd_object(out: dict) -> dict:
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_to_json_schema(node):
    """One CRD openAPIV3Schema node as JSON Schema, as strict as the API server with strict field validation
    (kubectl's default since 1.27): an object that lists its properties rejects any other field unless it says
    x-kubernetes-preserve-unknown-fields; x-kubernetes-int-or-string is integer or string; nullable allows null.
    x-kubernetes-validations (CEL) are kept as annotations only: jsonschema ignores them, tests/infra/
    port the ones our fields meet."""
    return without_descriptions(node, ("properties", "patternProperties"), _strict_crd_object)


def load_crd(crd_dir: Path, kind: str) -> dict:
    import yaml  # noqa: PLC0415 (PyYAML: a dependency of the package already)

    crd = yaml.safe_load((crd_dir / CRD_FILES[kind]).read_text())
    assert crd["spec"]["names"]["kind"] == kind, crd["spec"]["names"]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"], f"{kind}: ray.io/v1 is served and stored"
    schema = crd_to_json_schema(version["schema"]["openAPIV3Schema"])
    # The CRD says only `metadata: {type: object}`; the API server checks it as an ObjectMeta.
    schema["properties"]["metadata"] = k8s("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    schema["properties"]["apiVersion"] = {"type": "string", "enum": ["ray.io/v1"]}
    schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
    return schema


# Plain Kubernetes kinds used by infra/kuberay/, straight from the Kubernetes definitions.
K8S_KINDS = {
    "io.k8s.api.batch.v1.CronJob": "cronjob-batch-v1.json",
    "io.k8s.api.core.v1.ServiceAccount": "serviceaccount-v1.json",
    "io.k8s.api.core.v1.ConfigMap": "configmap-v1.json",
    "io.k8s.api.scheduling.v1.PriorityClass": "priorityclass-scheduling.k8s.io-v1.json",
    "io.k8s.api.policy.v1.PodDisruptionBudget": "poddisruptionbudget-policy-v1.json",
    "io.k8s.api.networking.v1.NetworkPolicy": "networkpolicy-networking.k8s.io-v1.json",
    "io.k8s.api.rbac.v1.Role": "role-rbac.authorization.k8s.io-v1.json",
    "io.k8s.api.rbac.v1.RoleBinding": "rolebinding-rbac.authorization.k8s.io-v1.json",
}


def strip_descriptions(node):
    """Drop documentation strings ("description" keywords), never a property that happens to be named description."""
    return without_descriptions(node)


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
    parser.add_argument("--kuberay-crds", required=True,
                        help=f"directory holding KubeRay {KUBERAY_TAG}'s {CRD_DIR}/*.yaml (the three CRD files)")
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    k8s_defs = load_k8s(args.wheel)
    out = Path(args.out)
    k8s_prov = {"source": f"PyPI kubernetes-validate==1.37.0, {DEFS_MEMBER}",
                "generator": "infra/schemas/build_schemas.py"}
    for definition, name in K8S_KINDS.items():
        schema = standalone({"$ref": f"#/$defs/{definition}"}, k8s_defs, k8s_prov)
        (out / name).write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
    for kind, crd_file in CRD_FILES.items():
        ray_prov = {**k8s_prov, "kuberay": f"ray-project/kuberay {KUBERAY_TAG} ({KUBERAY_COMMIT}) "
                                           f"{CRD_DIR}/{crd_file}, version v1 openAPIV3Schema, converted verbatim "
                                           "(descriptions dropped, strict field validation); metadata is the "
                                           "Kubernetes ObjectMeta from above"}
        root = load_crd(Path(args.kuberay_crds), kind)
        schema = standalone(root, k8s_defs, ray_prov)
        # Compact: the CRDs inline every PodTemplateSpec, one indented file would be several MB.
        (out / f"{kind.lower()}-ray.io-v1.json").write_text(json.dumps(schema, separators=(",", ":")) + "\n")
    for path in sorted(out.glob("*.json")):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
