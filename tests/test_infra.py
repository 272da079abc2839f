"""Offline checks of infra/: the KubeRay / Kubernetes manifests against the vendored schemas in infra/schemas/, the
cluster-launcher YAML against the schema inside the installed ray wheel, and what a reviewer would check by hand
(GPU requests, /dev/shm in memory, entrypoints that name real job configs, the Dockerfile's contents).
No network, no cluster; a few seconds."""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
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
}
MANIFESTS = ["raycluster.yaml", "rayjob.yaml", "raycronjob.yaml", "cronjob-submit.yaml"]


# ---------------------------------------------------------------------------------------------------------- helpers

def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} has no YAML documents"
    return docs


def doc(name: str) -> dict:
    (only,) = load_docs(KUBERAY / name)
    return only


def validator_for(manifest: dict) -> jsonschema.protocols.Validator:
    key = (manifest.get("apiVersion"), manifest.get("kind"))
    assert key in SCHEMA_FOR, f"no vendored schema for apiVersion/kind {key}; known: {sorted(SCHEMA_FOR)}"
    schema = json.loads((SCHEMAS / SCHEMA_FOR[key]).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def errors(manifest: dict) -> list[str]:
    found = validator_for(manifest).iter_errors(manifest)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in found]


def ray_cluster_specs() -> dict[str, dict]:
    """Every RayClusterSpec in the manifests, by where it is."""
    return {
        "raycluster.yaml spec": doc("raycluster.yaml")["spec"],
        "rayjob.yaml spec.rayClusterSpec": doc("rayjob.yaml")["spec"]["rayClusterSpec"],
        "raycronjob.yaml spec.jobTemplate.rayClusterSpec":
            doc("raycronjob.yaml")["spec"]["jobTemplate"]["rayClusterSpec"],
    }


def ray_pod_templates() -> list[tuple[str, dict, dict]]:
    """(where, group spec, pod template) for the head and every worker group of every Ray cluster."""
    out = []
    for where, spec in ray_cluster_specs().items():
        out.append((f"{where} head", spec["headGroupSpec"], spec["headGroupSpec"]["template"]))
        for group in spec.get("workerGroupSpecs", []):
            out.append((f"{where} worker group {group['groupName']}", group, group["template"]))
    return out


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}


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
    local = ROOT / "jobs" / config[len(IMAGE_JOBS_DIR) + 1:]
    assert local.is_file(), f"{config} is copied into the image from {local.relative_to(ROOT)}, which does not exist"


# ----------------------------------------------------------------------------------------------- schema validation

def test_vendored_schemas_are_small_valid_and_documented():
    files = sorted(SCHEMAS.glob("*.json"))
    assert {f.name for f in files} == set(SCHEMA_FOR.values())
    assert sum(f.stat().st_size for f in files) < 2_000_000
    readme = (SCHEMAS / "README.md").read_text()
    for f in files:
        schema = json.loads(f.read_text())
        jsonschema.validators.validator_for(schema).check_schema(schema)
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
        cluster = {"RayCluster": lambda m: m["spec"], "RayJob": lambda m: m["spec"]["rayClusterSpec"],
                   "RayCronJob": lambda m: m["spec"]["jobTemplate"]["rayClusterSpec"]}[manifest["kind"]](top)
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


@pytest.mark.parametrize("name", MANIFESTS)
def test_broken_copies_of_a_manifest_are_rejected(name):
    """Proves the validation is live: the strict schemas reject unknown fields and wrong types at every level."""
    (manifest,) = load_docs(KUBERAY / name)
    for what, broken in _break(manifest):
        schema = SCHEMA_FOR[(manifest["apiVersion"], manifest["kind"])]
        assert errors(broken), f"{name} with {what} was accepted by {schema}"


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
    for container in pod["containers"]:
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
        images.update(c["image"] for c in template["spec"]["containers"])
    cron_pod = doc("cronjob-submit.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    images.update(c["image"] for c in cron_pod["containers"])
    images.add(yaml.safe_load(LAUNCHER.read_text())["docker"]["image"])
    assert len(images) == 1, f"one image everywhere, found {images}"


def test_expected_job_configs_exist():
    missing = [name for name in EXPECTED_JOBS if not (ROOT / "jobs" / name).is_file()]
    assert not missing, f"jobs/ lacks {missing}: infra/ runs these configs (atlas run / atlas submit)"


@pytest.mark.parametrize("name,entrypoint", [
    ("rayjob.yaml", lambda m: m["spec"]["entrypoint"]),
    ("raycronjob.yaml", lambda m: m["spec"]["jobTemplate"]["entrypoint"]),
])
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
    assert words[words.index("--date") + 1] == "$(date -u +%F)", "one submission id per UTC day"


def test_dockerfile_installs_the_package_and_copies_jobs():
    instructions = dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    base = dockerfile_arg("CUDA_IMAGE")
    assert froms == ["${CUDA_IMAGE}"] and base.startswith("nvidia/cuda:"), "a CUDA base image"
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), "the package is installed from the build context"
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
    assert any(work_dir == m or work_dir.startswith(m.rstrip("/") + "/") for m in mounts), \
        f"{where}: {work_dir} is not on a volume of the head"
