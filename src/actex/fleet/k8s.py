"""`actex k8s render fleet.yaml`: Kubernetes manifests for a fleet of extract workers on GKE.

A FleetSpec (a small YAML file) becomes either
* an Indexed Job of single-host workers: `completions = parallelism = workers`; each pod is
  one worker (`--claim`, or the static split with `JOB_COMPLETION_INDEX` as its index);
  `podReplacementPolicy: Failed` so a replacement pod starts only once the one it replaces
  has terminated (never two incarnations of an index at once); `backoffLimitPerIndex` bounds
  the retries of each index; a pod failure policy maps the workers' exit codes: 2 (bad
  config) fails the Job at once, 75 (stopped by a pre-emption notice) and a disruption
  (node drained, spot VM reclaimed) are retried without counting against the limit; or
* a JobSet for multi-host TPU slices: one replicated Job per slice (`replicas = workers`),
  each an Indexed Job of the slice's hosts, all started together on one node pool
  (exclusive topology) and restarted together (a slice runs as one gang). GKE's TPU
  webhook gives every pod `TPU_WORKER_ID` and `TPU_WORKER_HOSTNAMES` (its Job's pods, in
  index order), which is how JAX on GKE finds its coordinator (host 0, port 8482): the
  JobSet only needs DNS hostnames enabled.

Extract options go in as ACTEX_* variables (names checked against `actex extract`'s own
options) and/or extra arguments. Manifests are plain dicts in the API's camelCase; the
tests validate them with the kubernetes client's models.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PREEMPTED_EXIT = 75  # as in cli/fleet.py: a worker stopped by a signal before the run was done
BAD_CONFIG_EXIT = 2
JAX_COORDINATOR_PORT = 8482  # jax._src.clusters.cloud_tpu_cluster's default
TPU_RESOURCE = "google.com/tpu"
TPU_ACCELERATOR_LABEL = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"
EXCLUSIVE_TOPOLOGY = "alpha.jobset.sigs.k8s.io/exclusive-topology"
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
# A plain `env` value lands in the manifest as text (kubectl get -o yaml, CI logs): names like
# these belong in a Secret, referenced through `secret_env`.
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY", re.IGNORECASE)
IMAGE_UID = 10001  # the image's user (Dockerfile: USER 10001:10001)


class SecretKeyRef(BaseModel):
    """A variable's value from a key of a Kubernetes Secret in the Job's namespace."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    secret: str = Field(description="the Secret's name")
    key: str = Field(description="the key within it")


class TpuSpec(BaseModel):
    """The GKE TPU node pool a worker runs on: accelerator label value, topology, chips per host."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    accelerator: str = Field(description="cloud.google.com/gke-tpu-accelerator, e.g. tpu-v5-lite-podslice, tpu-v6e-slice")
    topology: str = Field(pattern=r"^\d+(x\d+){1,2}$", description="cloud.google.com/gke-tpu-topology, e.g. 2x4, 4x4, 2x2x2")
    chips_per_host: int = Field(4, ge=1, description="google.com/tpu per pod (4 on v4, v5e and v5p hosts; 8 on an 8-chip v5e/v6e VM)")

    @property
    def chips(self) -> int:
        return math.prod(int(d) for d in self.topology.split("x"))

    @property
    def hosts(self) -> int:
        """Pods per slice: 1 is a single-host worker, more is a multi-host slice (a JobSet)."""
        return max(1, self.chips // self.chips_per_host)


class FleetSpec(BaseModel):
    """fleet.yaml: what `actex k8s render` turns into a Job or JobSet."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Job/JobSet name: a DNS label of at most 40 characters (pod names add suffixes)")
    image: str = Field(description="the actex image (see Dockerfile); its entrypoint is `actex`")
    workers: int = Field(ge=1, description="single-host workers, or slices when the TPU spans several hosts")
    namespace: str | None = None
    claim: bool = Field(True, description="--claim workers (leases); false: static split by JOB_COMPLETION_INDEX")
    tpu: TpuSpec | None = None
    extract: dict[str, Any] = Field(default_factory=dict, description="extract options, e.g. {model: ..., output: gs://...}, set as ACTEX_* variables")
    args: list[str] = Field(default_factory=list, description="further `actex extract` arguments")
    env: dict[str, str] = Field(default_factory=dict, description="further container variables (no secrets: see secret_env)")
    secret_env: dict[str, SecretKeyRef] = Field(default_factory=dict, description="variables from Secrets, e.g. {HF_TOKEN: {secret: hf, key: token}}")
    mount_service_account_token: bool = Field(False, description="mount the Kubernetes API token (actex never calls the API; Workload Identity needs no token)")
    resources: dict[str, str] = Field(default_factory=dict, description="container requests and limits besides google.com/tpu, e.g. {cpu: '8', memory: 32Gi}")
    service_account: str | None = Field(None, description="Kubernetes service account (Workload Identity for the bucket)")
    backoff_limit_per_index: int = Field(6, ge=0, description="retries of one worker index (Indexed Job)")
    max_restarts: int = Field(6, ge=0, description="restarts of the whole JobSet (multi-host slices)")
    termination_grace_seconds: int = Field(30, ge=1, description="SIGTERM to SIGKILL; covers --preempt-deadline (25 s)")
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"

    @field_validator("name")
    @classmethod
    def _dns_label(cls, name: str) -> str:
        if not _DNS_LABEL.match(name):
            raise ValueError("must be lower-case letters, digits and '-', start with a letter, at most 40 characters")
        return name

    @field_validator("env")
    @classmethod
    def _no_secrets_in_plain_text(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if _SECRET_NAME.search(name):
                raise ValueError(f"{name} looks like a secret, which would be plain text in the manifest: "
                                 f"put it in a Secret and name it under secret_env ({name}: {{secret: ..., key: ...}})")
        return env

    @model_validator(mode="after")
    def _slices_claim(self) -> "FleetSpec":
        if self.multi_host and not self.claim:
            raise ValueError("multi-host slices need claim: true (a slice has no static worker index)")
        return self

    @property
    def multi_host(self) -> bool:
        return self.tpu is not None and self.tpu.hosts > 1


def extract_env(options: dict[str, Any], known: dict[str, str]) -> list[dict]:
    """{option: value} -> [{name: ACTEX_OPTION, value: "..."}]; ValueError naming an unknown option.

    `known` maps each option name (dashes or underscores) to its variable.
    """
    env = []
    for key, value in options.items():
        name = known.get(str(key).replace("-", "_"))
        if name is None:
            raise ValueError(f"fleet.yaml extract.{key}: not an option of actex extract")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            text = ",".join(map(str, value))
        else:
            text = str(value)
        env.append({"name": name, "value": text})
    return env


def container(spec: FleetSpec, known_env: dict[str, str], *, extra_env: list[dict] = ()) -> dict:
    """The worker container: `actex extract ...` with the fleet's variables and resources."""
    args = ["extract", "--preempted-exit-code", str(PREEMPTED_EXIT)]
    if spec.claim:
        args.append("--claim")
    elif not spec.multi_host:
        # JOB_COMPLETION_INDEX is the worker index (actex reads it when --worker-index is not given).
        args += ["--num-workers", str(spec.workers)]
    env = [*extract_env(spec.extract, known_env), *({"name": k, "value": v} for k, v in spec.env.items()),
           *({"name": k, "valueFrom": {"secretKeyRef": {"name": ref.secret, "key": ref.key}}} for k, ref in spec.secret_env.items()),
           *extra_env]
    resources: dict[str, dict[str, str]] = {}
    if spec.resources:
        resources = {"requests": dict(spec.resources), "limits": dict(spec.resources)}
    if spec.tpu is not None:
        for kind in ("requests", "limits"):
            resources.setdefault(kind, {})[TPU_RESOURCE] = str(spec.tpu.chips_per_host)
    body: dict[str, Any] = {
        "name": "actex",
        "image": spec.image,
        "imagePullPolicy": spec.pull_policy,
        "args": [*args, *spec.args],
        "env": env,
        "securityContext": {"allowPrivilegeEscalation": False, "privileged": False, "capabilities": {"drop": ["ALL"]}},
    }
    if resources:
        body["resources"] = resources
    if spec.multi_host:
        body["ports"] = [{"containerPort": JAX_COORDINATOR_PORT, "name": "jax-coord"}]
    return body


def pod_spec(spec: FleetSpec, known_env: dict[str, str]) -> dict:
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # the Job (or JobSet) replaces failed pods; required by podFailurePolicy
        "terminationGracePeriodSeconds": spec.termination_grace_seconds,
        "automountServiceAccountToken": spec.mount_service_account_token,
        "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container(spec, known_env)],
    }
    if spec.tpu is not None:
        pod["nodeSelector"] = {TPU_ACCELERATOR_LABEL: spec.tpu.accelerator, TPU_TOPOLOGY_LABEL: spec.tpu.topology}
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    return pod


def pod_failure_policy(action_on_bad_config: str) -> dict:
    """Exit 2 ends it (a replacement would fail the same way); 75 and disruptions are free retries."""
    return {"rules": [
        {"action": action_on_bad_config, "onExitCodes": {"containerName": "actex", "operator": "In", "values": [BAD_CONFIG_EXIT]}},
        {"action": "Ignore", "onExitCodes": {"containerName": "actex", "operator": "In", "values": [PREEMPTED_EXIT]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def metadata(spec: FleetSpec, **extra: Any) -> dict:
    meta: dict[str, Any] = {"name": spec.name, "labels": {"app.kubernetes.io/name": "actex", "actex/fleet": spec.name}}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    meta.update(extra)
    return meta


def indexed_job(spec: FleetSpec, known_env: dict[str, str]) -> dict:
    """A batch/v1 Job of `spec.workers` single-host workers."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(spec),
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.workers,
            "parallelism": spec.workers,
            "backoffLimitPerIndex": spec.backoff_limit_per_index,
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": pod_failure_policy("FailJob"),
            "template": {"metadata": {"labels": metadata(spec)["labels"]}, "spec": pod_spec(spec, known_env)},
        },
    }


def jobset(spec: FleetSpec, known_env: dict[str, str]) -> dict:
    """A jobset.x-k8s.io/v1alpha2 JobSet: one replicated Job per slice, one pod per host."""
    hosts = spec.tpu.hosts
    slice_job = {
        "completionMode": "Indexed",
        "completions": hosts,
        "parallelism": hosts,
        # One lost host stops the slice's collective: the JobSet restarts the whole slice.
        "backoffLimit": 0,
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": pod_failure_policy("FailJob"),
        "template": {"metadata": {"labels": metadata(spec)["labels"]}, "spec": pod_spec(spec, known_env)},
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": metadata(spec, annotations={EXCLUSIVE_TOPOLOGY: "cloud.google.com/gke-nodepool"}),
        "spec": {
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "failurePolicy": {
                "maxRestarts": spec.max_restarts,
                # A slice that failed by the pod failure policy (exit 2) fails the set; any
                # other slice failure restarts it (counted against maxRestarts).
                "rules": [{"name": "badConfig", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}],
            },
            # Any slice finishing means the run is complete (--claim workers exit 0 only then).
            "successPolicy": {"operator": "Any" if spec.claim else "All", "targetReplicatedJobs": ["slice"]},
            "replicatedJobs": [{"name": "slice", "replicas": spec.workers, "template": {"spec": slice_job}}],
        },
    }


def coordinator_policy(spec: FleetSpec) -> dict:
    """A networking.k8s.io/v1 NetworkPolicy: the fleet's pods accept connections only on the
    JAX coordinator port, and only from the fleet's own pods (nothing else listens)."""
    fleet = {"matchLabels": {"actex/fleet": spec.name}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(spec, name=f"{spec.name}-coordinator"),
        "spec": {
            "podSelector": fleet,
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": fleet}], "ports": [{"protocol": "TCP", "port": JAX_COORDINATOR_PORT}]}],
        },
    }


def render(spec: FleetSpec, known_env: dict[str, str]) -> list[dict]:
    """The manifests for `spec`: an Indexed Job, or a JobSet and its coordinator's
    NetworkPolicy when a worker spans several hosts."""
    if spec.multi_host:
        return [jobset(spec, known_env), coordinator_policy(spec)]
    return [indexed_job(spec, known_env)]
