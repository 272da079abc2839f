"""What a platform team enforces on infra/, each rule ported from its upstream source: Pod Security "restricted"
(k8s.io/pod-security-admission, tests/support/pod_security.py) on every pod as KubeRay renders it (its autoscaler
sidecar and wait-gcs-ready init container included, per ray-operator/controllers/ray/common/pod.go v1.7.0); the
autoscaler's Kubernetes API token and Role against the calls Ray's KubeRay node provider makes (read from the
installed Ray); the NetworkPolicy evaluated with the NetworkPolicy API's semantics; the PDB with the disruption
controller's arithmetic; images by digest; the cluster launcher's dashboard; the scheduled-slot shell snippets.
Pure Python (and one `sh`), about a second."""

from __future__ import annotations

import ast
import copy
import datetime as dt
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from repo_paths import REPO_PATH
from pod_security import CHECKS, restricted_violations

ROOT = REPO_PATH
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster-launcher" / "gpu-cluster.yaml"
METRICS_CRONJOB = INFRA / "monitoring" / "publication-metrics-cronjob.yaml"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # node_provider.py IN_CLUSTER_TOKEN_PATH's folder


@functools.cache
def _parsed(path: Path) -> tuple:
    return tuple(d for d in yaml.load_all(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d)


def docs(path: Path) -> list[dict]:
    """The YAML documents of `path`, parsed once (libyaml when available), a fresh copy for each caller."""
    return copy.deepcopy(list(_parsed(path)))


def doc(name: str) -> dict:
    (only,) = docs(KUBERAY / name)
    return only


def cluster_specs() -> dict[str, dict]:
    return {
        "raycluster.yaml": doc("raycluster.yaml")["spec"],
        "rayjob.yaml": doc("rayjob.yaml")["spec"]["rayClusterSpec"],
        "raycronjob.yaml": doc("raycronjob.yaml")["spec"]["jobTemplate"]["rayClusterSpec"],
    }


# ------------------------------------------------------------------------ KubeRay's rendering (common/pod.go)


def render_head(spec: dict) -> dict:
    """The head pod KubeRay 1.7 builds: the template plus, with in-tree autoscaling, the autoscaler container
    (BuildAutoscalerContainer, then mergeAutoscalerOverrides: resources, image, env, volumeMounts appended,
    securityContext copied as given)."""
    pod = copy.deepcopy(spec["headGroupSpec"]["template"]["spec"])
    if spec.get("enableInTreeAutoscaling"):
        options = spec.get("autoscalerOptions") or {}
        autoscaler = {
            "name": "autoscaler",
            "image": options.get("image", pod["containers"][0]["image"]),
            "env": [{"name": "RAY_CLUSTER_NAME"}, {"name": "RAY_CLUSTER_NAMESPACE"}, *options.get("env", [])],
            "volumeMounts": list(options.get("volumeMounts", [])),
        }
        if "securityContext" in options:
            autoscaler["securityContext"] = copy.deepcopy(options["securityContext"])
        pod["containers"].append(autoscaler)
    return pod


def render_worker(group: dict) -> dict:
    """A worker pod: the template plus the wait-gcs-ready init container (injected unless
    ENABLE_INIT_CONTAINER_INJECTION=false), whose securityContext is the Ray container's (DeepCopy)."""
    pod = copy.deepcopy(group["template"]["spec"])
    ray = pod["containers"][0]
    init = {"name": "wait-gcs-ready", "image": ray["image"]}
    if "securityContext" in ray:
        init["securityContext"] = copy.deepcopy(ray["securityContext"])
    pod["initContainers"] = [init, *pod.get("initContainers", [])]
    return pod


def rendered_pods() -> dict[str, dict]:
    pods = {}
    for where, spec in cluster_specs().items():
        pods[f"{where} head"] = render_head(spec)
        for group in spec["workerGroupSpecs"]:
            pods[f"{where} worker {group['groupName']}"] = render_worker(group)
    pods["rayjob.yaml submitter"] = doc("rayjob.yaml")["spec"]["submitterPodTemplate"]["spec"]
    pods["raycronjob.yaml submitter"] = doc("raycronjob.yaml")["spec"]["jobTemplate"]["submitterPodTemplate"]["spec"]
    pods["cronjob-submit.yaml"] = doc("cronjob-submit.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (metrics,) = docs(METRICS_CRONJOB)
    pods["publication-metrics-cronjob.yaml"] = metrics["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return pods


PODS = rendered_pods()


@pytest.mark.parametrize("where", list(PODS))
def test_every_pod_passes_pod_security_restricted(where):
    """On main no Ray pod had a securityContext: all of them failed allowPrivilegeEscalation, runAsNonRoot,
    seccomp and capabilities."""
    assert restricted_violations(PODS[where]) == {}


def _head(name: str = "raycluster.yaml") -> dict:
    return copy.deepcopy(PODS[f"{name} head"])


def _first_sc(pod: dict) -> dict:
    return pod["containers"][0].setdefault("securityContext", {})


# Each restricted check, live on a broken copy of one of our rendered pods.
BROKEN_PODS = {
    "hostNamespaces_1_0": lambda p: p.update(hostNetwork=True),
    "privileged_1_0": lambda p: _first_sc(p).update(privileged=True),
    "capabilitiesBaseline_1_0": lambda p: _first_sc(p).update(capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
    "hostPathVolumes_1_0": lambda p: p["volumes"].append({"name": "logs", "hostPath": {"path": "/var/log"}}),
    "hostPorts_1_0": lambda p: p["containers"][0]["ports"].append({"containerPort": 8265, "hostPort": 8265}),
    "restrictedVolumes_1_0": lambda p: p["volumes"].append({"name": "nfs", "nfs": {"server": "x", "path": "/"}}),
    "allowPrivilegeEscalation_1_8": lambda p: p["containers"][-1]["securityContext"].pop("allowPrivilegeEscalation"),
    "runAsNonRoot_1_0": lambda p: p["securityContext"].pop("runAsNonRoot"),
    "runAsUser_1_23": lambda p: _first_sc(p).update(runAsUser=0),
    "seccompProfileRestricted_1_19": lambda p: _first_sc(p).update(seccompProfile={"type": "Unconfined"}),
    "capabilitiesRestricted_1_22": lambda p: p["containers"][1].pop("securityContext"),
}


@pytest.mark.parametrize("check", list(CHECKS))
def test_each_restricted_check_rejects_a_broken_pod(check):
    pod = _head()
    BROKEN_PODS[check](pod)
    assert check in restricted_violations(pod), f"{check} accepted {pod}"


def test_autoscaler_without_its_own_security_context_fails_restricted():
    """KubeRay copies autoscalerOptions.securityContext into the sidecar and sets none itself: without it the
    head pod is refused even when every container of the template is right."""
    spec = copy.deepcopy(cluster_specs()["raycronjob.yaml"])
    del spec["autoscalerOptions"]["securityContext"]
    assert {"allowPrivilegeEscalation_1_8", "capabilitiesRestricted_1_22"} <= set(
        restricted_violations(render_head(spec))
    )


# ---------------------------------------------------------------------- the autoscaler's Kubernetes API access


def _node_provider_calls() -> set[tuple[str, str, str]]:
    """(API group, resource, verb) of every Kubernetes API call in Ray's KubeRay node provider (autoscaler v1),
    read from the installed Ray's source: self._get / self._patch / self._delete with a path literal or a local
    variable holding one; a GET of a path with a query string is a list."""
    # The installed Ray's source, located without importing Ray (seconds under load).
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    tree = ast.parse((ray_dir / "autoscaler" / "_private" / "kuberay" / "node_provider.py").read_text())
    (provider,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "KubeRayNodeProvider"]

    def literal(node, names):
        if isinstance(node, ast.Name) and node.id in names:
            return literal(names[node.id], names)
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
            return literal(node.func.value, names)
        raise AssertionError(f"unresolved API path {ast.dump(node)}")

    calls = set()
    for function in [n for n in provider.body if isinstance(n, ast.FunctionDef)]:
        names = {
            t.id: n.value for n in ast.walk(function) if isinstance(n, ast.Assign) for t in n.targets
            if isinstance(t, ast.Name)
        }  # fmt: skip
        for node in ast.walk(function):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "self"):
                continue
            verb = {"_get": "get", "_patch": "patch", "_delete": "delete"}.get(node.func.attr)
            if verb is None or function.name in ("_get", "_patch", "_delete"):
                continue
            path = literal(node.args[0], names)
            resource = path.split("/")[0].split("?")[0]
            group = {"pods": "", "rayclusters": "ray.io"}[resource]
            calls.add((group, resource, "list" if verb == "get" and "?" in path else verb))
    return calls


def test_autoscaler_role_grants_exactly_what_rays_node_provider_calls():
    calls = _node_provider_calls()
    assert ("ray.io", "rayclusters", "patch") in calls and ("", "pods", "list") in calls, calls  # sanity
    role, binding = docs(KUBERAY / "rbac-autoscaler.yaml")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}  # fmt: skip
    assert granted == calls, (
        f"least privilege: the Role grants {granted - calls or 'nothing'} beyond, lacks {calls - granted or 'nothing'}"
    )
    # KubeRay keeps a Role / RoleBinding it finds under the cluster's name (reconcileAutoscalerRole, ...Binding),
    # and binds the head pod's service account (BuildRoleBinding, GetHeadGroupServiceAccountName).
    cluster = doc("raycluster.yaml")
    assert role["metadata"]["name"] == binding["metadata"]["name"] == cluster["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "neuron-atlas"}
    head_account = cluster["spec"]["headGroupSpec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": head_account}]
    for spec in cluster_specs().values():
        assert (spec.get("autoscalerOptions") or {}).get("version") == "v1", "the calls above are autoscaler v1's"


@pytest.mark.parametrize("where", list(cluster_specs()))
def test_only_the_autoscaler_container_gets_a_kubernetes_token(where):
    """Ray's node provider reads TOKEN_DIR/token and ca.crt; KubeRay mounts no token into the sidecar, which runs
    under the head pod's service account. On main the account disabled automounting and nothing else mounted one:
    the autoscaler could not list pods, so no GPU worker ever started."""
    account = doc("serviceaccount.yaml")
    pod = render_head(cluster_specs()[where])
    automount = pod.get("automountServiceAccountToken", account.get("automountServiceAccountToken", True))
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    with_token = {}
    for container in pod["containers"]:
        mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == TOKEN_DIR]
        if automount and not mounts:
            with_token[container["name"]] = "automounted"
        for mount in mounts:
            sources = volumes[mount["name"]]["projected"]["sources"]
            paths = {s.get("serviceAccountToken", {}).get("path") for s in sources} | {
                i["path"] for s in sources for i in s.get("configMap", {}).get("items", [])
            }
            assert {"token", "ca.crt"} <= paths, f"{where}: {container['name']} gets token and CA"
            assert mount.get("readOnly") is True
            with_token[container["name"]] = mount["name"]
    assert set(with_token) == {"autoscaler"}, f"{where}: containers with an API token: {with_token}"
    assert account["automountServiceAccountToken"] is False, "workers and submitters get no token"


def test_readme_no_longer_claims_pods_do_not_call_the_api():
    readme = (INFRA / "README.md").read_text()
    assert "do not call the Kubernetes API" not in readme
    assert "autoscaler" in readme and "node provider" in readme


# ------------------------------------------------------------------------------------------- NetworkPolicy


def _matches(selector: dict | None, labels: dict) -> bool:
    """metav1.LabelSelector: matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist), ANDed."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def ingress_allowed(policies, source: dict, dest: dict, port: int) -> bool:
    """The NetworkPolicy API (networking.k8s.io/v1): a pod selected by no Ingress policy of its namespace accepts
    everything; otherwise a connection is allowed iff some rule of some selecting policy admits the source (no
    `from` = any source; a peer with podSelector only = pods of the policy's namespace; namespaceSelector only =
    every pod of those namespaces; both = those pods of those namespaces) on the port (no `ports` = any)."""
    selecting = [
        p for p in policies
        if p["_namespace"] == dest["namespace"] and _matches(p["spec"]["podSelector"], dest["labels"])
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]  # fmt: skip
    if not selecting:
        return True
    namespace_labels = {"kubernetes.io/metadata.name": source["namespace"]}
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") in (port, None) for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                ns_ok = (
                    _matches(peer["namespaceSelector"], namespace_labels)
                    if "namespaceSelector" in peer
                    else source["namespace"] == policy["_namespace"]
                )
                pod_ok = _matches(peer["podSelector"], source["labels"]) if "podSelector" in peer else True
                if "ipBlock" not in peer and ns_ok and pod_ok:
                    return True
    return False


NS = "atlas"


def _pod(component: str, namespace: str = NS, name: str = "neuron-atlas") -> dict:
    return {
        "namespace": namespace,
        "labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component},
    }


HEAD, WORKER, SUBMITTER = _pod("ray-head"), _pod("ray-worker-gpu"), _pod("submitter")
OPERATOR = {"namespace": "kuberay-system", "labels": {"app.kubernetes.io/name": "kuberay-operator"}}
PROMETHEUS = {"namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}}
NEIGHBOUR = {"namespace": NS, "labels": {"app": "something-else"}}
OUTSIDER = {"namespace": "other-team", "labels": {}}

FLOWS = [  # source, destination, port, allowed
    (WORKER, HEAD, 6379, True),  # GCS
    (HEAD, WORKER, 43117, True),  # raylet / object manager / worker ports are random
    (WORKER, WORKER, 8076, True),
    (SUBMITTER, HEAD, 8265, True),  # Jobs API
    (OPERATOR, HEAD, 8265, True),  # RayJob status polling
    (PROMETHEUS, HEAD, 8080, True),
    (PROMETHEUS, WORKER, 8080, True),
    (SUBMITTER, HEAD, 6379, False),
    (SUBMITTER, HEAD, 10001, False),
    (OPERATOR, HEAD, 6379, False),
    (PROMETHEUS, HEAD, 8265, False),
    (NEIGHBOUR, HEAD, 8265, False),
    (NEIGHBOUR, HEAD, 6379, False),
    (OUTSIDER, HEAD, 8265, False),
    (_pod("submitter", namespace="other-team"), HEAD, 8265, False),
    (_pod("ray-head", name="someone-else"), WORKER, 6379, False),
]


def _policies():
    return [{**p, "_namespace": NS} for p in docs(KUBERAY / "networkpolicy.yaml")]


@pytest.mark.parametrize("source,dest,port,allowed", FLOWS)
def test_network_policy_least_privilege(source, dest, port, allowed):
    assert ingress_allowed(_policies(), source, dest, port) is allowed


def test_network_policy_selects_every_ray_pod_and_broken_policies_open_up():
    labels = [t["metadata"]["labels"] for s in cluster_specs().values() for t in
              [s["headGroupSpec"]["template"], *(g["template"] for g in s["workerGroupSpecs"])]]  # fmt: skip
    for pod_labels in labels:
        assert ingress_allowed(_policies(), NEIGHBOUR, {"namespace": NS, "labels": pod_labels}, 6379) is False
    submitter_labels = [
        doc("rayjob.yaml")["spec"]["submitterPodTemplate"]["metadata"]["labels"],
        doc("raycronjob.yaml")["spec"]["jobTemplate"]["submitterPodTemplate"]["metadata"]["labels"],
        doc("cronjob-submit.yaml")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"],
    ]
    for pod_labels in submitter_labels:
        assert ingress_allowed(_policies(), {"namespace": NS, "labels": pod_labels}, HEAD, 8265), pod_labels
    # The evaluator is live: an empty peer (everyone) or a port-less dashboard rule lets the neighbour in.
    wide = _policies()
    wide[0]["spec"]["ingress"][1]["from"].append({})
    assert ingress_allowed(wide, NEIGHBOUR, HEAD, 8265)
    wide = _policies()
    del wide[0]["spec"]["ingress"][1]["ports"]
    assert ingress_allowed(wide, SUBMITTER, HEAD, 6379)


# ------------------------------------------------------------------------------------ PodDisruptionBudget


def disruptions_allowed(pdb_spec: dict, healthy: int, controller_has_scale: bool) -> int:
    """pkg/controller/disruption (getExpectedPodCount, updatePdbStatus): maxUnavailable or a percentage
    minAvailable need the pods' controller's scale (Deployment, ReplicaSet, StatefulSet, or a scale
    subresource); without one the controller fails safe and allows nothing. An integer minAvailable counts pods."""
    min_available, max_unavailable = pdb_spec.get("minAvailable"), pdb_spec.get("maxUnavailable")
    needs_scale = max_unavailable is not None or isinstance(min_available, str)
    if needs_scale and not controller_has_scale:
        return 0
    expected = healthy  # one head, its controller's scale would be 1
    if max_unavailable is not None:
        unavailable = (
            max_unavailable if isinstance(max_unavailable, int) else -(-expected * int(max_unavailable[:-1]) // 100)
        )
        desired = max(0, expected - unavailable)
    elif isinstance(min_available, str):
        desired = -(-expected * int(min_available[:-1]) // 100)
    else:
        desired = min_available
    return max(0, healthy - desired)


def test_pdb_lets_a_drain_evict_the_standing_head():
    """RayCluster has no scale subresource (KubeRay 1.7's CRD: subresources status only), so only an integer
    minAvailable is computed at all. Main's maxUnavailable: 0 allowed no disruption, ever."""
    crd_subresources = {"status"}  # ray.io_rayclusters.yaml v1.7.0, spec.versions[v1].subresources
    pdb = doc("poddisruptionbudget.yaml")["spec"]
    assert disruptions_allowed(pdb, healthy=1, controller_has_scale="scale" in crd_subresources) >= 1
    assert disruptions_allowed({"maxUnavailable": 0}, 1, False) == 0
    assert disruptions_allowed({"maxUnavailable": 1}, 1, False) == 0, "no scale subresource: fail safe"
    assert disruptions_allowed({"minAvailable": 1}, 1, False) == 0
    assert pdb.get("unhealthyPodEvictionPolicy") == "AlwaysAllow"
    head_meta = doc("raycluster.yaml")["spec"]["headGroupSpec"]["template"]["metadata"]
    assert pdb["selector"]["matchLabels"].items() <= head_meta["labels"].items()
    assert head_meta["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
    assert head_meta["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"


# ----------------------------------------------------------------------------------------- image digests

DIGEST_REF = re.compile(r"[^\s@]+@sha256:[0-9a-f]{64}")


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + [
            i for v in node.values() for i in _images(v)
        ]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def all_images() -> list[tuple[str, str]]:
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")) + sorted((INFRA / "monitoring").glob("*.yaml")) + [LAUNCHER]:
        for d in docs(path):
            found += [(path.name, image) for image in _images(d)]
    return found


def test_every_image_is_referenced_by_digest():
    images = all_images()
    assert len(images) >= 10, images
    mutable = [(where, image) for where, image in images if not DIGEST_REF.fullmatch(image)]
    assert mutable == [], f"images by mutable tag: {mutable}"
    readme = (INFRA / "README.md").read_text()
    placeholders = {image for _, image in images if image.endswith("0" * 64)}
    assert all(image.split("@")[0] in readme for image in placeholders), "placeholder digests are documented"
    for tag_only in ("neuron-atlas:0.1.0", "fluent/fluent-bit:3.2.10", "nginx", "repo/img@sha256:abc"):
        assert not DIGEST_REF.fullmatch(tag_only)


# ------------------------------------------------------------------------------------------ cluster launcher


def test_cluster_launcher_dashboard_is_not_open_without_token_auth():
    config = yaml.safe_load(LAUNCHER.read_text())
    commands = " ".join(config["head_start_ray_commands"])
    host = re.search(r"--dashboard-host[= ](\S+)", commands)
    token = "RAY_AUTH_MODE=token" in " ".join(config["docker"]["run_options"])
    assert host and (host.group(1) in ("127.0.0.1", "localhost") or token), (
        "the dashboard / Jobs API runs code: loopback only (ray dashboard tunnels it over SSH) unless token auth is on"
    )


# ------------------------------------------------------------------------------- the scheduled slot, in a shell


def _run_shell(script: str, env: dict, argv: list[str] | None = None) -> str:
    """`script` under bash with `atlas` and `ray` replaced by shims that print their arguments, one per line
    (`ray job status` fails, as for a job not yet submitted)."""
    shim = Path(os.environ.get("TMPDIR", "/tmp")) / f"atlas-shim-{os.getpid()}"
    shim.mkdir(exist_ok=True)
    (shim / "atlas").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (shim / "ray").write_text(
        '#!/bin/sh\n[ "$2" = status ] && exit 1\n[ "$2" = submit ] && printf "%s\\n" "$@"\nexit 0\n'
    )
    for tool in ("atlas", "ray"):
        (shim / tool).chmod(0o755)
    try:
        full_env = {"PATH": f"{shim}:{os.environ['PATH']}", **env}
        # KubeRay runs its submitter command as `/bin/bash -ce -- COMMAND` (utils.GetContainerCommand).
        argv = argv or ["bash", "-ce", "--", script]
        return subprocess.run(argv, env=full_env, capture_output=True, text=True, check=True).stdout
    finally:
        shutil.rmtree(shim)


def kuberay_submit_command(entrypoint: str, job_id: str) -> str:
    """The K8sJobMode submitter command of common/job.go BuildJobSubmitCommand (v1.7.0), from `if ! ray job status`
    on (the wait-for-dashboard loop before it is left out): the entrypoint goes in unquoted, after `--`."""
    address = "http://neuron-atlas-head-svc:8265"
    cmd = ["if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1", ";", "then"]
    cmd += ["ray", "job", "submit", "--address", address, "--no-wait", "--submission-id", job_id]
    cmd += ["--", entrypoint.strip(), ";", "fi", ";", "ray", "job", "logs", "--address", address, "--follow", job_id]
    return " ".join(cmd)


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("date") is None, reason="needs bash and date")
def test_scheduled_slot_comes_from_the_tick_not_the_clock():
    """The CronJob controller names a Job <cronjob>-<scheduled minutes since the epoch> (and labels its pods
    batch.kubernetes.io/job-name); KubeRay names a RayCronJob tick's RayJob the same way (getRayJobName) and
    labels its submitter ray.io/originated-from-cr-name. The snippets turn that into the slot; checked here against
    Python's own arithmetic for a tick at 2026-12-02T02:00Z."""
    tick = dt.datetime(2026, 12, 2, 2, 0, tzinfo=dt.timezone.utc)
    minutes = int(tick.timestamp()) // 60
    cron = doc("cronjob-submit.yaml")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    # The container's own command line (/bin/sh -c ...), as the kubelet runs it.
    out = _run_shell("", {"JOB_NAME": f"{cron['metadata']['name']}-{minutes}"}, argv=container["command"]).split()
    assert out[out.index("--date") + 1] == "2026-12-02"

    template = doc("raycronjob.yaml")["spec"]["jobTemplate"]
    # Only K8sJobMode runs the entrypoint through the submitter's shell (HTTPMode would send `$(...)` verbatim).
    assert template["submissionMode"] == "K8sJobMode"
    (submitter,) = template["submitterPodTemplate"]["spec"]["containers"]
    env = {e["name"]: e for e in submitter["env"]}
    assert env["NEURON_ATLAS_RAYJOB"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['ray.io/originated-from-cr-name']"
    )
    rayjob = f"{doc('raycronjob.yaml')['metadata']['name']}-{minutes}"
    # The submitter's shell expands the entrypoint inside KubeRay's command; Ray receives what follows `--`.
    script = kuberay_submit_command(template["entrypoint"], job_id=f"{rayjob}-x7k2q")
    out = _run_shell(script, {"NEURON_ATLAS_RAYJOB": rayjob}).split("\n")
    out = out[out.index("--") + 1 :]
    assert out[:2] == ["atlas", "run"] and out[out.index("--scheduled-slot") + 1] == "2026-12-02"
    # A date slot is its 00:00 UTC: a tick's retry starts at most (time of day + backoffLimit x one attempt) after
    # it, and must still run; yesterday's tick is at least 24 h old, and must be skipped.
    window = int(next(a.split("=")[1] for a in out if a.startswith("job.starting_deadline_seconds=")))
    minute, hour = (int(f) for f in doc("raycronjob.yaml")["spec"]["schedule"].split()[:2])
    latest_retry = hour * 3600 + minute * 60 + template["backoffLimit"] * template["activeDeadlineSeconds"]
    assert latest_retry < window < 24 * 3600, "retries of a tick run, a catch-up burst runs only the newest"


def test_atlas_run_accepts_the_scheduled_slot_option():
    """The entrypoint's --scheduled-slot is `atlas run`'s (pipeline/cli, the publication work of issue 24)."""
    cli = ROOT / "pipeline" / "cli"
    sources = [p.read_text() for p in [*cli.glob("*.py"), cli.with_suffix(".py")] if p.is_file()]
    if not any("--scheduled-slot" in s for s in sources):
        pytest.skip("atlas run has no --scheduled-slot in this checkout yet (branch h-publish adds it)")
    atlas = Path(sys.executable).parent / "atlas"
    result = subprocess.run(
        [str(atlas), "run", "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}
    )
    assert "--scheduled-slot" in result.stdout
