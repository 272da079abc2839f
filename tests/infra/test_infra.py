"""Offline checks of infra/: the KubeRay / Kubernetes manifests against the vendored schemas in infra/schemas/, the
cluster-launcher YAML against the schema inside the installed ray wheel, and what a reviewer would check by hand
(GPU requests, /dev/shm in memory, entrypoints that name real job configs, the Dockerfile's contents).
No network, no cluster; a few seconds."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from repo_paths import REPO_PATH

ROOT = REPO_PATH
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
SCHEMAS = INFRA / "schemas"
LAUNCHER = INFRA / "cluster-launcher" / "gpu-cluster.yaml"
DOCKERFILE = INFRA / "Dockerfile"
IMAGE_JOBS_DIR = "/opt/neuron-atlas/jobs"
# The job configs the manifests and README refer to (created with the `atlas run` / `atlas submit` work in jobs/).
EXPECTED_JOBS = ["demo.toml", "cifar10_resnet20.toml", "imagenet_resnet50.toml"]

SCHEMA_FOR = {
    ("ray.io/v1", "RayCluster"): "raycluster-ray.io-v1.json",
    ("ray.io/v1", "RayJob"): "rayjob-ray.io-v1.json",
    ("ray.io/v1", "RayCronJob"): "raycronjob-ray.io-v1.json",
    ("batch/v1", "CronJob"): "cronjob-batch-v1.json",
    ("v1", "ServiceAccount"): "serviceaccount-v1.json",
    ("v1", "ConfigMap"): "configmap-v1.json",
    ("scheduling.k8s.io/v1", "PriorityClass"): "priorityclass-scheduling.k8s.io-v1.json",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudget-policy-v1.json",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicy-networking.k8s.io-v1.json",
    ("rbac.authorization.k8s.io/v1", "Role"): "role-rbac.authorization.k8s.io-v1.json",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebinding-rbac.authorization.k8s.io-v1.json",
}
WORKLOADS = ["raycluster.yaml", "rayjob.yaml", "raycronjob.yaml", "cronjob-submit.yaml"]  # the ones with pods
MANIFESTS = [
    *WORKLOADS,
    "serviceaccount.yaml",
    "configmap-fluentbit.yaml",
    "priorityclass.yaml",
    "poddisruptionbudget.yaml",
    "networkpolicy.yaml",
    "rbac-autoscaler.yaml",
]
MONITORING = INFRA / "monitoring"


# ---------------------------------------------------------------------------------------------------------- helpers


# libyaml's loader when PyYAML has it (ten times faster), parsed once per file: tests get their own copies.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def _parsed(path: Path, mtime: float) -> tuple:
    return tuple(d for d in yaml.load_all(path.read_text(), Loader=SAFE_LOADER) if d is not None)


def load_docs(path: Path) -> list[dict]:
    docs = copy.deepcopy(list(_parsed(path, path.stat().st_mtime)))
    assert docs, f"{path} has no YAML documents"
    return docs


def doc(name: str) -> dict:
    (only,) = load_docs(KUBERAY / name)
    return only


@functools.cache
def schema_validator(file_name: str) -> jsonschema.protocols.Validator:
    """One validator per vendored schema, meta-checked once (a few seconds for the KubeRay CRDs' 250 KB)."""
    schema = json.loads((SCHEMAS / file_name).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validator_for(manifest: dict) -> jsonschema.protocols.Validator:
    key = (manifest.get("apiVersion"), manifest.get("kind"))
    assert key in SCHEMA_FOR, f"no vendored schema for apiVersion/kind {key}; known: {sorted(SCHEMA_FOR)}"
    return schema_validator(SCHEMA_FOR[key])


def errors(manifest: dict) -> list[str]:
    found = validator_for(manifest).iter_errors(manifest)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in found]


def ray_cluster_specs() -> dict[str, dict]:
    """Every RayClusterSpec in the manifests, by where it is."""
    return {
        "raycluster.yaml spec": doc("raycluster.yaml")["spec"],
        "rayjob.yaml spec.rayClusterSpec": doc("rayjob.yaml")["spec"]["rayClusterSpec"],
        "raycronjob.yaml spec.jobTemplate.rayClusterSpec": doc("raycronjob.yaml")["spec"]["jobTemplate"][
            "rayClusterSpec"
        ],
    }


def ray_pod_templates() -> list[tuple[str, dict, dict]]:
    """(where, group spec, pod template) for the head and every worker group of every Ray cluster."""
    out = []
    for where, spec in ray_cluster_specs().items():
        out.append((f"{where} head", spec["headGroupSpec"], spec["headGroupSpec"]["template"]))
        for group in spec.get("workerGroupSpecs", []):
            out.append((f"{where} worker group {group['groupName']}", group, group["template"]))
    return out


_UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "m": 1e-3,
}


def quantity(value) -> float:
    """A Kubernetes resource quantity ("16Gi", "500m", 8, "12884901888") as a number."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert m and m.group(2) in _UNITS, f"unparsed quantity {value!r}"
    return float(m.group(1)) * _UNITS[m.group(2)]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_arg(name: str) -> str:
    for word, rest in dockerfile_instructions():
        if word == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1].strip('"')
    raise AssertionError(f"infra/Dockerfile has no ARG {name}=...")


def job_config_from_command(command: str, verb: str) -> str:
    """The CONFIG of `atlas VERB CONFIG ...` in a shell command line."""
    words = shlex.split(command)
    for i, word in enumerate(words[:-2]):
        if word.endswith("atlas") and words[i + 1] == verb:
            return words[i + 2]
    raise AssertionError(f"no `atlas {verb} CONFIG` in {command!r}")


def assert_job_config_exists(config: str) -> None:
    assert config.startswith(IMAGE_JOBS_DIR + "/"), f"{config} is not under the image's {IMAGE_JOBS_DIR}"
    local = ROOT / "jobs" / config[len(IMAGE_JOBS_DIR) + 1 :]
    assert local.is_file(), f"{config} is copied into the image from {local.relative_to(ROOT)}, which does not exist"


# ----------------------------------------------------------------------------------------------- schema validation


def test_vendored_schemas_are_small_valid_and_documented():
    files = sorted(SCHEMAS.glob("*.json"))
    assert {f.name for f in files} == set(SCHEMA_FOR.values())
    assert sum(f.stat().st_size for f in files) < 2_000_000
    readme = (SCHEMAS / "README.md").read_text()
    for f in files:
        schema_validator(f.name)  # meta-validates it
        assert f.name in readme, f"{f.name} has no provenance entry in infra/schemas/README.md"


def test_every_manifest_is_listed_and_has_a_schema():
    assert sorted(p.name for p in KUBERAY.glob("*.yaml")) == sorted(MANIFESTS)
    kinds = {(d["apiVersion"], d["kind"]) for name in MANIFESTS for d in load_docs(KUBERAY / name)}
    assert kinds == set(SCHEMA_FOR), "each vendored schema is used by exactly the manifests of its kind"


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates_against_its_schema(name):
    for manifest in load_docs(KUBERAY / name):
        assert errors(manifest) == [], f"{name} ({manifest['kind']}) does not validate"


def _break(manifest: dict) -> list[tuple[str, dict]]:
    """Broken copies of a manifest: a misspelled field deep in a pod spec, a wrong type, a misspelled top field."""
    broken = []
    misspelled = copy.deepcopy(manifest)
    *_, pod = _pod_specs(misspelled)  # the last pod spec: the GPU workers' for the Ray kinds, the submitter's else
    container = pod["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts", [])
    broken.append(("containers[0].volumeMount", misspelled))
    wrong_type = copy.deepcopy(manifest)
    wrong_type["metadata"]["name"] = ["not", "a", "string"]
    broken.append(("metadata.name as a list", wrong_type))
    top = copy.deepcopy(manifest)
    if manifest["kind"] == "CronJob":
        top["spec"]["concurrencyPolicy"] = 3
        broken.append(("concurrencyPolicy: 3", top))
    else:
        cluster = {
            "RayCluster": lambda m: m["spec"],
            "RayJob": lambda m: m["spec"]["rayClusterSpec"],
            "RayCronJob": lambda m: m["spec"]["jobTemplate"]["rayClusterSpec"],
        }[manifest["kind"]](top)
        group = cluster["workerGroupSpecs"][0]
        group["maxReplica"] = group.pop("maxReplicas")
        broken.append(("workerGroupSpecs[0].maxReplica", top))
    return broken


def _pod_specs(node):
    if isinstance(node, dict):
        if "containers" in node and isinstance(node["containers"], list):
            yield node
        for value in node.values():
            yield from _pod_specs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _pod_specs(value)


@pytest.mark.parametrize("name", WORKLOADS)
def test_broken_copies_of_a_manifest_are_rejected(name):
    """Proves the validation is live: the strict schemas reject unknown fields and wrong types at every level."""
    (manifest,) = load_docs(KUBERAY / name)
    for what, broken in _break(manifest):
        schema = SCHEMA_FOR[(manifest["apiVersion"], manifest["kind"])]
        assert errors(broken), f"{name} with {what} was accepted by {schema}"


def test_kuberay_1_7_fields_are_checked():
    """The schemas are KubeRay 1.7's: timeZone must not be empty, deletion rules take only KubeRay's policies."""
    manifest = doc("raycronjob.yaml")
    manifest["spec"]["timeZone"] = ""
    assert any("timeZone" in e for e in errors(manifest))
    manifest = doc("rayjob.yaml")
    manifest["spec"]["deletionStrategy"]["deletionRules"][0]["policy"] = "DeleteEverything"
    assert any("deletionRules/0/policy" in e for e in errors(manifest))


def test_cronjob_needs_a_schedule():
    manifest = doc("cronjob-submit.yaml")
    del manifest["spec"]["schedule"]
    assert any("schedule" in e for e in errors(manifest))


# --------------------------------------------------------------------------------------------------- cluster launcher


def ray_launcher_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())


def test_cluster_launcher_yaml_validates_against_rays_schema():
    config = yaml.safe_load(LAUNCHER.read_text())
    jsonschema.Draft7Validator(ray_launcher_schema()).validate(config)
    # What `ray up` does before launching anything: fill in the provider's defaults and validate again.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_launcher_broken_copy_is_rejected():
    config = yaml.safe_load(LAUNCHER.read_text())
    config["docker"]["shm_size"] = "16g"  # not a docker key: it goes in run_options
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(ray_launcher_schema()).validate(config)


def test_cluster_launcher_shape():
    config = yaml.safe_load(LAUNCHER.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "a CPU-only head"
    assert head["resources"].get("CPU") == 0, "no Ray work on the head"
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    gpu_types = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "a GPU worker node type"
    assert all(t.get("max_workers", 0) > t.get("min_workers", 0) for t in gpu_types), "GPU workers autoscale"
    assert any(o.startswith("--shm-size") for o in config["docker"]["run_options"]), "docker runs need --shm-size"
    mounts = config["file_mounts"]
    assert any(Path(src).resolve() == (ROOT / "jobs").resolve() for src in mounts.values()), "jobs/ is mounted"


# ------------------------------------------------------------------------------------------------------ semantics


@pytest.mark.parametrize("where", list(ray_cluster_specs()))
def test_gpu_worker_group_requests_gpus_and_autoscales(where):
    spec = ray_cluster_specs()[where]
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: the autoscaler is on"
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            res = container.get("resources", {})
            if "nvidia.com/gpu" in res.get("limits", {}):
                assert quantity(res["limits"]["nvidia.com/gpu"]) >= 1
                gpu_groups.append(group)
    assert gpu_groups, f"{where}: a worker group whose container has an nvidia.com/gpu limit"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"], f"{where}: {group['groupName']} can scale"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in head), "a CPU head"
    ports = {p["containerPort"] for c in head for p in c.get("ports", [])}
    assert 8265 in ports, f"{where}: the head exposes the dashboard / Jobs API on 8265"


@pytest.mark.parametrize("where,group,template", ray_pod_templates(), ids=[w for w, _, _ in ray_pod_templates()])
def test_every_ray_pod_has_in_memory_dev_shm_and_guaranteed_resources(where, group, template):
    pod = template["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in pod["containers"][:1]:  # KubeRay's Ray container is the first (RayContainerIndex 0)
        mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert mounts, f"{where}: {container['name']} mounts nothing at /dev/shm"
        volume = volumes[mounts[0]["name"]]
        assert volume.get("emptyDir", {}).get("medium") == "Memory", f"{where}: /dev/shm is an in-memory emptyDir"
        shm = quantity(volume["emptyDir"]["sizeLimit"])
        res = container["resources"]
        assert res["requests"] == res["limits"], f"{where}: {container['name']} requests == limits"
        assert shm < quantity(res["limits"]["memory"]), f"{where}: /dev/shm counts against, and fits in, memory"
        store = group.get("rayStartParams", {}).get("object-store-memory")
        if store is not None:
            assert quantity(store) < shm, f"{where}: the object store fits in /dev/shm"


def test_ray_versions_and_images_match_the_dockerfile():
    ray_version = dockerfile_arg("RAY_VERSION")
    images = set()
    for where, spec in ray_cluster_specs().items():
        assert spec["rayVersion"] == ray_version, f"{where}: rayVersion vs the image's ray"
    for _, _, template in ray_pod_templates():
        images.add(template["spec"]["containers"][0]["image"])  # the Ray container (sidecars have their own)
    cron_pod = doc("cronjob-submit.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    images.update(c["image"] for c in cron_pod["containers"])
    images.add(yaml.safe_load(LAUNCHER.read_text())["docker"]["image"])
    assert len(images) == 1, f"one image everywhere, found {images}"


def test_expected_job_configs_exist():
    missing = [name for name in EXPECTED_JOBS if not (ROOT / "jobs" / name).is_file()]
    assert not missing, f"jobs/ lacks {missing}: infra/ runs these configs (atlas run / atlas submit)"


@pytest.mark.parametrize(
    "name,entrypoint",
    [
        ("rayjob.yaml", lambda m: m["spec"]["entrypoint"]),
        ("raycronjob.yaml", lambda m: m["spec"]["jobTemplate"]["entrypoint"]),
    ],
)
def test_ray_entrypoints_run_an_existing_job_config(name, entrypoint):
    command = entrypoint(doc(name))
    assert_job_config_exists(job_config_from_command(command, "run"))


def test_cronjob_submits_an_existing_config_to_the_standing_cluster():
    manifest = doc("cronjob-submit.yaml")
    spec = manifest["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    (container,) = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = " ".join(container.get("command", []) + container.get("args", []))
    shell = container["command"][-1] if container["command"][:2] == ["/bin/sh", "-c"] else command
    assert_job_config_exists(job_config_from_command(shell, "submit"))
    words = shlex.split(shell)
    cluster = doc("raycluster.yaml")["metadata"]["name"]
    assert words[words.index("--address") + 1] == f"http://{cluster}-head-svc:8265", "the RayCluster's head Service"
    # One submission id per scheduled slot: the slot's UTC date from the Job's name, not the pod's clock
    # (test_infra_policy.py runs this shell and checks the date).
    assert "JOB_NAME" in words[words.index("--date") + 1], "the run id comes from the scheduled slot"


def test_dockerfile_installs_the_package_and_copies_jobs():
    instructions = dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    base = dockerfile_arg("CUDA_IMAGE")
    assert froms == ["${CUDA_IMAGE}"] and base.startswith("nvidia/cuda:"), "a CUDA base image"
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert re.search(r"pip install (-c \S+ )?\.(\s|$)", runs), "the package is installed from the build context"
    # Every pip install is constrained to the versions the suite passed with.
    assert all("-c /tmp/constraints.txt" in line for line in re.findall(r"pip install[^&\n]*", runs))
    assert "COPY infra/constraints.txt" in DOCKERFILE.read_text()
    torch = dockerfile_arg("TORCH_VERSION")
    assert '"torch==${TORCH_VERSION}"' in runs
    # The pinned torch satisfies pyproject.toml's torch requirement.
    from packaging.requirements import Requirement

    pyproject = (ROOT / "pyproject.toml").read_text()
    (req,) = [Requirement(r) for r in re.findall(r'"(torch[<>=!~][^"]*)"', pyproject)]
    assert req.specifier.contains(torch), f"torch {torch} vs pyproject {req}"
    # jobs/ lands at /opt/neuron-atlas/jobs: COPY jobs <dest> with dest absolute, or relative to the WORKDIR.
    workdir, copied_to = "/", None
    for word, rest in instructions:
        if word == "WORKDIR":
            workdir = rest if rest.startswith("/") else os.path.join(workdir, rest)
        if word == "COPY" and rest.split()[0] in ("jobs", "jobs/", "./jobs"):
            dest = rest.split()[-1]
            copied_to = os.path.normpath(dest if dest.startswith("/") else os.path.join(workdir, dest))
    assert copied_to == IMAGE_JOBS_DIR, f"jobs/ copied to {copied_to}, manifests read {IMAGE_JOBS_DIR}"
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"


def test_readme_covers_the_files_and_the_feature_gate():
    readme = (INFRA / "README.md").read_text()
    for path in ["Dockerfile", *MANIFESTS, "gpu-cluster.yaml", "schemas/"]:
        assert path in readme, f"infra/README.md does not mention {path}"
    assert "RayCronJob=true" in readme, "the RayCronJob feature gate"
    assert "docker build -f infra/Dockerfile" in readme


@pytest.mark.parametrize("where", list(ray_cluster_specs()))
def test_job_work_dir_is_a_volume_on_the_head(where):
    """The driver of `atlas run` (on the head) writes [job] work_dir: it must be a mounted volume there."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    config = tomllib.loads((ROOT / "jobs" / "imagenet_resnet50.toml").read_text())
    work_dir = config.get("job", {}).get("work_dir")
    if not work_dir or not work_dir.startswith("/") or work_dir.startswith("/tmp/"):
        pytest.skip("no absolute [job] work_dir outside /tmp")
    head = ray_cluster_specs()[where]["headGroupSpec"]["template"]["spec"]["containers"]
    mounts = [m["mountPath"] for c in head for m in c.get("volumeMounts", [])]
    assert any(work_dir == m or work_dir.startswith(m.rstrip("/") + "/") for m in mounts), (
        f"{where}: {work_dir} is not on a volume of the head"
    )


# ------------------------------------------------------------------- rules KubeRay checks in Go, not in the CRD
# From ray-project/kuberay v1.7.0 ray-operator/controllers/ray/utils/constant.go: MaxRayClusterNameLength = 53,
# MaxRayJobNameLength = 53 - 6, MaxRayCronJobNameLength = 47 - 11 (the child RayJob is "<name>-<minutes since epoch>");
# validation.go: names must be DNS-1035 labels.
KUBERAY_NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DAY = 24 * 3600


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_name_is_within_kuberays_limits(name):
    for manifest in load_docs(KUBERAY / name):
        metadata_name = manifest["metadata"]["name"]
        assert DNS_1035.fullmatch(metadata_name) and len(metadata_name) <= 63, metadata_name
        limit = KUBERAY_NAME_LIMITS.get(manifest["kind"])
        if limit is not None:
            assert len(metadata_name) <= limit, (
                f"{name}: {manifest['kind']} name {metadata_name!r} is {len(metadata_name)} > {limit} characters"
            )


def _ray_job_specs() -> dict[str, dict]:
    return {"rayjob.yaml": doc("rayjob.yaml")["spec"], "raycronjob.yaml": doc("raycronjob.yaml")["spec"]["jobTemplate"]}


@pytest.mark.parametrize("where", ["rayjob.yaml", "raycronjob.yaml"])
def test_ray_job_cleanup_uses_deletion_rules_and_never_with_shutdown(where):
    """KubeRay 1.7 (validation.go): deletionRules and shutdownAfterJobFinishes are mutually exclusive; the rules
    must remove the cluster and, eventually, the RayJob itself after success and after failure."""
    spec = _ray_job_specs()[where]
    rules = spec.get("deletionStrategy", {}).get("deletionRules")
    assert rules, f"{where}: no deletionRules (RayJobs would pile up, one per night)"
    assert not spec.get("shutdownAfterJobFinishes") and "ttlSecondsAfterFinished" not in spec
    assert not {"onSuccess", "onFailure"} & set(spec["deletionStrategy"]), "legacy fields and rules do not mix"
    for status in ("SUCCEEDED", "FAILED"):
        policies = {r["policy"] for r in rules if r["condition"].get("jobStatus") == status}
        assert {"DeleteCluster", "DeleteSelf"} <= policies, f"{where}: after {status}"
    # TTLs must not decrease along DeleteWorkers <= DeleteCluster <= DeleteSelf (validateTTLConsistency).
    order = ["DeleteWorkers", "DeleteCluster", "DeleteSelf"]
    for key in {
        tuple(sorted(r["condition"].items() - {("ttlSeconds", r["condition"].get("ttlSeconds"))})) for r in rules
    }:
        ttls = [
            r["condition"].get("ttlSeconds", 0)
            for p in order
            for r in rules
            if r["policy"] == p
            and tuple(sorted(r["condition"].items() - {("ttlSeconds", r["condition"].get("ttlSeconds"))})) == key
        ]
        assert ttls == sorted(ttls), f"{where}: TTLs along {order} for {key}"


def _daily_period(schedule: str) -> int:
    """The period of a cron schedule that fires once a day at a fixed time ("M H * * *"), in seconds."""
    fields = schedule.split()
    assert len(fields) == 5 and fields[0].isdigit() and fields[1].isdigit() and fields[2:] == ["*", "*", "*"], (
        f"expected a daily schedule, got {schedule!r} (extend this test for others)"
    )
    return DAY


def test_raycronjob_runs_cannot_overlap_and_has_a_time_zone():
    """KubeRay starts every retry of a RayJob (a new cluster) with a fresh activeDeadlineSeconds, so the longest a
    night can last is (backoffLimit + 1) x activeDeadlineSeconds: it must end before the next tick."""
    spec = doc("raycronjob.yaml")["spec"]
    assert spec.get("timeZone"), "timeZone set (KubeRay 1.7), not the operator's local zone"
    job = spec["jobTemplate"]
    attempts = job.get("backoffLimit", 0) + 1
    assert "activeDeadlineSeconds" in job, "each attempt is bounded"
    assert attempts * job["activeDeadlineSeconds"] < _daily_period(spec["schedule"])


def test_cronjob_runs_cannot_overlap():
    """batch/v1: a Job's activeDeadlineSeconds bounds the whole Job, retries included; Forbid keeps the next tick
    from starting while it runs; the history is limited."""
    spec = doc("cronjob-submit.yaml")["spec"]
    assert spec.get("timeZone") and spec["concurrencyPolicy"] == "Forbid"
    assert spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] < _daily_period(spec["schedule"])
    assert spec["successfulJobsHistoryLimit"] <= 7 and spec["failedJobsHistoryLimit"] <= 7
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod.get("terminationGracePeriodSeconds", 30) >= 45, "time for atlas submit to stop its job on SIGTERM"


def test_token_authentication_everywhere_and_the_submitter_has_the_token():
    for where, spec in ray_cluster_specs().items():
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: Ray token authentication"
        assert not spec["authOptions"].get("enableK8sTokenAuth"), "KubeRay 1.7 refuses K8s token auth for RayJobs"
    # KubeRay names the Secret after the RayCluster (CheckName(name)) with the key auth_token.
    cluster = doc("raycluster.yaml")["metadata"]["name"]
    (container,) = doc("cronjob-submit.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": cluster, "key": "auth_token"}


def _all_pod_specs() -> list[tuple[str, dict]]:
    out = [(where, template["spec"]) for where, _, template in ray_pod_templates()]
    out += [
        (f"{name} submitter", _ray_job_specs()[name]["submitterPodTemplate"]["spec"])
        for name in ("rayjob.yaml", "raycronjob.yaml")
    ]
    out.append(("cronjob-submit.yaml", doc("cronjob-submit.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


@pytest.mark.parametrize("where,pod", _all_pod_specs(), ids=[w for w, _ in _all_pod_specs()])
def test_pods_use_workload_identity_priority_and_no_usage_stats(where, pod):
    account = doc("serviceaccount.yaml")
    assert pod.get("serviceAccountName") == account["metadata"]["name"], f"{where}: the workload-identity account"
    assert pod.get("priorityClassName") == doc("priorityclass.yaml")["metadata"]["name"]
    text = json.dumps(pod)
    assert "AWS_ACCESS_KEY_ID" not in text and "AWS_SECRET_ACCESS_KEY" not in text, f"{where}: no static keys"
    assert not any("secretRef" in source for c in pod["containers"] for source in c.get("envFrom", []))
    ray = pod["containers"][0]
    assert {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"} in ray.get("env", []), f"{where}: usage stats off"


def test_workload_identity_annotations():
    annotations = doc("serviceaccount.yaml")["metadata"]["annotations"]
    assert annotations["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert annotations["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")


def _terms(affinity: dict) -> list[dict]:
    node = affinity.get("nodeAffinity", {})
    required = node.get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [])
    return [e for term in required for e in term.get("matchExpressions", [])]


@pytest.mark.parametrize("where", list(ray_cluster_specs()))
def test_head_on_demand_and_gpu_workers_allowed_on_spot(where):
    spec = ray_cluster_specs()[where]
    head = spec["headGroupSpec"]["template"]["spec"]
    refused = {(e["key"], v) for e in _terms(head.get("affinity", {})) if e["operator"] == "NotIn" for v in e["values"]}
    # The capacity-type labels of Karpenter, EKS managed node groups and GKE.
    assert {
        ("karpenter.sh/capacity-type", "spot"),
        ("eks.amazonaws.com/capacityType", "SPOT"),
        ("cloud.google.com/gke-spot", "true"),
    } <= refused, f"{where}: the head only on on-demand nodes"
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        assert not _terms(pod.get("affinity", {})), "workers are not kept off any capacity type"
        tolerated = {t["key"] for t in pod.get("tolerations", [])}
        assert "cloud.google.com/gke-spot" in tolerated, "GKE taints spot nodes: workers tolerate it"


# Named node types and what a pod can request on them: capacity from the providers' instance specs, minus EKS's
# reservation (kube-reserved CPU 6% of the first core + 1% of the second + 0.5% of the next two + 0.25% beyond;
# memory 255Mi + 11Mi x max pods (58 on a 2xlarge), eviction threshold 100Mi), less 300m / 512Mi for daemon sets.
NODE_TYPES = {
    "g5.2xlarge": {"cpu": 8, "memory_gib": 32, "gpus": 1, "max_pods": 58},
    "m6i.2xlarge": {"cpu": 8, "memory_gib": 32, "gpus": 0, "max_pods": 58},
}


def _allocatable(node: dict) -> tuple[float, float]:
    cores = node["cpu"]
    reserved_m = 60 + (10 if cores > 1 else 0) + 5 * min(max(cores - 2, 0), 2) + 2.5 * max(cores - 4, 0)
    cpu = cores - reserved_m / 1000 - 0.3
    memory = node["memory_gib"] * 2**30 - (255 + 11 * node["max_pods"] + 100 + 512) * 2**20
    return cpu, memory


@pytest.mark.parametrize("where", list(ray_cluster_specs()))
def test_pods_fit_the_named_node_types(where):
    spec = ray_cluster_specs()[where]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    cpu, memory = _allocatable(NODE_TYPES["m6i.2xlarge"])
    assert sum(quantity(c["resources"]["requests"]["cpu"]) for c in head) <= cpu
    assert sum(quantity(c["resources"]["requests"]["memory"]) for c in head) <= memory
    for group in spec["workerGroupSpecs"]:
        containers = group["template"]["spec"]["containers"]
        node = NODE_TYPES["g5.2xlarge"]
        cpu, memory = _allocatable(node)
        requests = [c["resources"]["requests"] for c in containers]
        assert sum(quantity(r["cpu"]) for r in requests) <= cpu, f"{where}: worker CPU on a g5.2xlarge"
        assert sum(quantity(r["memory"]) for r in requests) <= memory, f"{where}: worker memory on a g5.2xlarge"
        assert sum(quantity(r.get("nvidia.com/gpu", 0)) for r in requests) <= node["gpus"]
    readme = (INFRA / "README.md").read_text()
    assert "g5.2xlarge" in readme and "m6i.2xlarge" in readme, "the README names the node types"


def test_logs_leave_the_head_pod():
    for where, spec in ray_cluster_specs().items():
        head = spec["headGroupSpec"]["template"]["spec"]
        shippers = [
            c for c in head["containers"][1:] if any(m["mountPath"] == "/tmp/ray" for m in c.get("volumeMounts", []))
        ]
        assert shippers, f"{where}: a sidecar reads Ray's logs"
        config_volumes = {v["name"]: v["configMap"]["name"] for v in head["volumes"] if "configMap" in v}
        assert doc("configmap-fluentbit.yaml")["metadata"]["name"] in config_volumes.values()
    conf = doc("configmap-fluentbit.yaml")["data"]["fluent-bit.conf"]
    assert "/tmp/ray/session_latest/logs" in conf and "[OUTPUT]" in conf


def test_pod_disruption_budget_selects_the_standing_head():
    pdb = doc("poddisruptionbudget.yaml")["spec"]
    labels = doc("raycluster.yaml")["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


def test_monitoring_scrapes_ray_pods_and_alerts_on_failed_runs():
    """Prometheus Operator objects (no vendored schema): the fields the alerting depends on."""
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    for where, _, template in ray_pod_templates():
        assert selector.items() <= template["metadata"]["labels"].items(), f"{where}: selected"
        ray = template["spec"]["containers"][0]
        assert ports & {p["name"] for p in ray.get("ports", [])}, f"{where}: exposes the scraped port"
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    exprs = " ".join(r["expr"] for r in rules)
    # KubeRay operator metric (controllers/ray/metrics/ray_job_metrics.go) and kube-state-metrics' Job metric.
    assert "kuberay_job_deployment_status" in exprs and 'deployment_status="Failed"' in exprs
    assert 'deployment_status="ValidationFailed"' in exprs
    # A failed Job is its condition, not a failed pod (kube_job_status_failed counts pods of Jobs that succeeded).
    assert "kube_job_status_condition{" in exprs and "kube_job_status_failed" not in exprs
    assert "neuron_atlas_latest_published_timestamp_seconds" in exprs, "the dead-man's switch"
    cron = doc("cronjob-submit.yaml")["metadata"]["name"]
    assert cron in exprs, "the submitter alert matches the CronJob's Jobs (named <cronjob>-<time>)"
    assert all(r["labels"].get("severity") for r in rules)


def test_cluster_launcher_uses_instance_profiles_spot_workers_and_no_usage_stats():
    config = yaml.safe_load(LAUNCHER.read_text())
    for name, node in config["available_node_types"].items():
        assert node["node_config"].get("IamInstanceProfile", {}).get("Name"), f"{name}: an instance profile"
        spot = node["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        assert spot == (name != config["head_node_type"]), f"{name}: spot only for the GPU workers"
    assert "--env RAY_USAGE_STATS_ENABLED=0" in config["docker"]["run_options"]
    assert "AWS_SECRET_ACCESS_KEY" not in LAUNCHER.read_text()


def test_monitoring_cronjob_validates_and_broken_copies_are_rejected():
    """infra/monitoring/publication-metrics-cronjob.yaml (the dead-man's switch's pusher) is a batch/v1 CronJob."""
    (manifest,) = load_docs(MONITORING / "publication-metrics-cronjob.yaml")
    assert errors(manifest) == []
    for what, broken in _break(manifest):
        assert errors(broken), f"publication-metrics-cronjob.yaml with {what} was accepted"
