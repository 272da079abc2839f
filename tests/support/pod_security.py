"""The Pod Security Standards' "restricted" level (baseline included, for the fields our pods can set), ported
from k8s.io/pod-security-admission/policy (kubernetes/kubernetes, staging/src/k8s.io/pod-security-admission/
policy/check_*.go). Each check takes a PodSpec (a dict, as in a manifest) and returns the Go check's
ForbiddenReason when the pod is refused, else None. visitContainers there walks containers, initContainers and
ephemeralContainers; so does `_containers` here."""

from __future__ import annotations

from collections.abc import Callable

# check_capabilities_baseline.go: capabilities a baseline pod may add.
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
# check_restrictedVolumes.go: the only volume sources a restricted pod may use.
RESTRICTED_VOLUME_SOURCES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def _containers(pod: dict) -> list[dict]:
    return [
        *pod.get("containers", []),
        *pod.get("initContainers", []),
        *pod.get("ephemeralContainers", []),
    ]


def _sc(container: dict) -> dict:
    return container.get("securityContext") or {}


def host_namespaces_1_0(pod: dict) -> str | None:
    """check_hostNamespaces.go: hostNetwork, hostPID, hostIPC unset or false."""
    if any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")):
        return "host namespaces"
    return None


def privileged_1_0(pod: dict) -> str | None:
    """check_privileged.go: securityContext.privileged unset or false."""
    if any(_sc(c).get("privileged") for c in _containers(pod)):
        return "privileged"
    return None


def capabilities_baseline_1_0(pod: dict) -> str | None:
    """check_capabilities_baseline.go: capabilities.add only from the baseline list."""
    for c in _containers(pod):
        if set((_sc(c).get("capabilities") or {}).get("add", [])) - BASELINE_CAPABILITIES:
            return "non-default capabilities"
    return None


def host_path_volumes_1_0(pod: dict) -> str | None:
    """check_hostPathVolumes.go: no hostPath volumes."""
    if any("hostPath" in v for v in pod.get("volumes", [])):
        return "hostPath volumes"
    return None


def host_ports_1_0(pod: dict) -> str | None:
    """check_hostPorts.go: hostPort unset or 0."""
    if any(p.get("hostPort") for c in _containers(pod) for p in c.get("ports", [])):
        return "hostPort"
    return None


def restricted_volumes_1_0(pod: dict) -> str | None:
    """check_restrictedVolumes.go: every volume uses one of the restricted sources."""
    for volume in pod.get("volumes", []):
        if not set(volume) - {"name"} <= RESTRICTED_VOLUME_SOURCES:
            return "restricted volume types"
    return None


def allow_privilege_escalation_1_8(pod: dict) -> str | None:
    """check_allowPrivilegeEscalation.go: every container sets allowPrivilegeEscalation to false explicitly."""
    if any(_sc(c).get("allowPrivilegeEscalation") is not False for c in _containers(pod)):
        return "allowPrivilegeEscalation != false"
    return None


def run_as_non_root_1_0(pod: dict) -> str | None:
    """check_runAsNonRoot.go: no container sets runAsNonRoot false, and either the pod sets it true or every
    container does."""
    pod_value = (pod.get("securityContext") or {}).get("runAsNonRoot")
    if pod_value is False:
        return "runAsNonRoot != true"
    for c in _containers(pod):
        value = _sc(c).get("runAsNonRoot")
        if value is False or (value is None and pod_value is not True):
            return "runAsNonRoot != true"
    return None


def run_as_user_1_23(pod: dict) -> str | None:
    """check_runAsUser.go: runAsUser is never 0, on the pod or any container."""
    if (pod.get("securityContext") or {}).get("runAsUser") == 0:
        return "runAsUser=0"
    if any(_sc(c).get("runAsUser") == 0 for c in _containers(pod)):
        return "runAsUser=0"
    return None


def seccomp_profile_restricted_1_19(pod: dict) -> str | None:
    """check_seccompProfile_restricted.go: seccompProfile.type RuntimeDefault or Localhost, set on the pod or on
    every container, and never Unconfined on a container."""
    allowed = {"RuntimeDefault", "Localhost"}
    pod_type = ((pod.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
    if pod_type is not None and pod_type not in allowed:
        return "seccompProfile"
    for c in _containers(pod):
        kind = (_sc(c).get("seccompProfile") or {}).get("type")
        if kind is not None and kind not in allowed:
            return "seccompProfile"
        if kind is None and pod_type is None:
            return "seccompProfile"
    return None


def capabilities_restricted_1_22(pod: dict) -> str | None:
    """check_capabilities_restricted.go: every container drops ALL and adds nothing but NET_BIND_SERVICE."""
    for c in _containers(pod):
        caps = _sc(c).get("capabilities")
        if not caps or "ALL" not in caps.get("drop", []):
            return "unrestricted capabilities"
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            return "unrestricted capabilities"
    return None


CHECKS: dict[str, Callable[[dict], str | None]] = {
    "hostNamespaces_1_0": host_namespaces_1_0,
    "privileged_1_0": privileged_1_0,
    "capabilitiesBaseline_1_0": capabilities_baseline_1_0,
    "hostPathVolumes_1_0": host_path_volumes_1_0,
    "hostPorts_1_0": host_ports_1_0,
    "restrictedVolumes_1_0": restricted_volumes_1_0,
    "allowPrivilegeEscalation_1_8": allow_privilege_escalation_1_8,
    "runAsNonRoot_1_0": run_as_non_root_1_0,
    "runAsUser_1_23": run_as_user_1_23,
    "seccompProfileRestricted_1_19": seccomp_profile_restricted_1_19,
    "capabilitiesRestricted_1_22": capabilities_restricted_1_22,
}


def restricted_violations(pod: dict) -> dict[str, str]:
    """Every check that refuses `pod`, by the Go function's name."""
    found = {name: check(pod) for name, check in CHECKS.items()}
    return {name: reason for name, reason in found.items() if reason}
