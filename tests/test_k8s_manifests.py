"""deploy/k8s renders (as `kubectl kustomize` does: resources, namespace, images) into objects
that are valid against the Kubernetes API schemas, checked offline with kubernetes-validate, and that agree with
docker-compose.yml and deploy/services.py: the same settings with the same values, ports, health
checks, commands and image, so the three ways to run never drift. Plus what only Kubernetes has:
one memory pod, grace periods over the drain timeouts, a disruption budget, network policies
evaluated for who may reach whom, and memory limits over a replica's measured peak."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from common.settings import parse_value
from deploy.services import local_services
from deploy.sizing import replica_memory
from tests.settings_names import CONFIGS, setting_default, settings_of

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
# The oldest release whose native gRPC probes are GA (1.27) we still check, and a recent one.
KUBERNETES_VERSIONS = ("1.30.0", "1.35.0")
CLUSTER_SCOPED = {"Namespace"}


def render() -> list[dict]:
    """deploy/k8s as `kubectl kustomize` renders it: its resources, in the kustomization's namespace."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "namespace", "resources", "images"}, (
        "this renderer knows resources, namespace and images only: extend it with the kustomization"
    )
    objects = [
        doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text()) if doc
    ]
    images = {
        i["name"]: f"{i.get('newName', i['name'])}:{i.get('newTag', 'latest')}" for i in kustomization.get("images", [])
    }
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = kustomization["namespace"]
        for c in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            c["image"] = images.get(c["image"].split(":")[0], c["image"])
    return objects


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def workload(objects: list[dict], role: str) -> dict:
    return next(o for o in objects if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"] == role)


def container(objects: list[dict], role: str) -> dict:
    (only,) = workload(objects, role)["spec"]["template"]["spec"]["containers"]
    return only


def settings(objects: list[dict]) -> dict[str, str]:
    return find(objects, "ConfigMap", "settings")["data"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_against_the_api_schemas(objects, version):
    assert len(objects) >= 15
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)  # strict: no unknown fields
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{obj['kind']}/{obj['metadata']['name']} is not valid Kubernetes {version}: {exc.message} "
                f"at {list(exc.path)}"
            )


def test_the_renderer_agrees_with_kubectl_kustomize(objects):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (the schema test above does not need it)")
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(out), key=key) == sorted(objects, key=key)


def test_settings_agree_with_compose_and_the_launcher(objects, compose):
    data = settings(objects)
    known = set().union(*(settings_of(role) for role in CONFIGS))
    assert set(data) <= known, f"not a setting: {set(data) - known}"
    for role, svc in compose["services"].items():
        env = {k: re.sub(r"\$\{[A-Z_]+:-(.*)\}", r"\1", str(v)) for k, v in svc["environment"].items()}
        env.pop("OMP_NUM_THREADS", None)  # not a setting: the container's own env here (test_pods_are_hardened)
        # Compose publishes on a host address the gateway cannot see from its container; the
        # Kubernetes LoadBalancer is public, and the gateway's 0.0.0.0 says so already.
        env.pop("GATEWAY_EXPOSED_HOST", None)
        missing = {k for k in env if k not in data}
        assert not missing, f"{role}: set in compose, not in the ConfigMap: {missing}"
        for k, v in env.items():
            if k in data:
                assert data[k] == v, f"{k}: {data[k]!r} in Kubernetes, {v!r} in compose"
    compose_env = set().union(*(svc.get("environment", {}) for svc in compose["services"].values()))
    for k in set(data) - compose_env:  # only Kubernetes sets it: it must be the default then, stated
        default = setting_default(k)
        assert parse_value(data[k], default) == default, f"{k}: {data[k]!r}, default {default!r}"
    # API keys and the internal token: Secrets the user creates, never ones in the kustomization
    # (which a later `kubectl apply -k` would put back empty), required (no pod starts without).
    assert not [o for o in objects if o["kind"] == "Secret"]
    for name in ("memory", "compute", "gateway"):
        pod = workload(objects, name)["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
        wanted = {"internal-token": "token", **({"api-keys": "keys"} if name == "gateway" else {})}
        assert set(secrets) == set(wanted), name
        for volume, key in wanted.items():
            assert "optional" not in secrets[volume] and secrets[volume]["items"] == [{"key": key, "path": key}]
            assert secrets[volume]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == 10001
        mounts = {m["name"]: m for m in container(objects, name)["volumeMounts"]}
        assert all(mounts[v]["readOnly"] for v in wanted), name
        assert "secretRef" not in str(container(objects, name).get("envFrom")), "keys never pass through env"
    for spec in local_services():
        prefix = spec.role.upper()
        assert int(data[f"{prefix}_PORT"]) == spec.port, f"{spec.role}: port differs from make run's"
        for key in ("metrics_port", "http_port"):
            if key in spec.settings and f"{prefix}_{key.upper()}" in data:
                assert data[f"{prefix}_{key.upper()}"] == spec.settings[key]


def test_each_workload_runs_its_service_from_the_compose_image_with_its_ports_and_health_checks(objects, compose):
    data = settings(objects)
    for spec in local_services():
        c = container(objects, spec.role)
        svc = compose["services"][spec.role]
        # compose's memory service writes the internal token first (Kubernetes mounts a Secret instead)
        compose_command = svc["command"] if spec.role != "memory" else svc["command"][-1].split("&& exec ")[-1].split()
        assert c["image"] == svc["image"] and c["command"] == compose_command == ["python", "-m", spec.module]
        assert {"configMapRef": {"name": "settings"}} in c["envFrom"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        prefix = spec.role.upper()
        assert ports["grpc"] == int(data[f"{prefix}_PORT"])
        for name, key in (("metrics", "METRICS_PORT"), ("http", "HTTP_PORT"), ("block-map", "HTTP_PORT")):
            if name in ports:
                assert ports[name] == int(data[f"{prefix}_{key}"]), f"{spec.role}: {name} port"
        assert c["readinessProbe"]["grpc"] == {"port": ports["grpc"], "service": spec.health_service}
        live = c["livenessProbe"]
        if spec.role == "memory":  # its health depends on nothing else
            assert live["grpc"] == {"port": ports["grpc"], "service": spec.health_service}
        else:  # NOT_SERVING while draining or cut off from memory: never a reason to kill the process
            assert live == {**live, "tcpSocket": {"port": ports["grpc"]}} and "grpc" not in live
        assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["memory"]
    for service in (o for o in objects if o["kind"] == "Service"):
        pod_ports = {
            p["name"] for p in container(objects, service["spec"]["selector"]["app.kubernetes.io/name"])["ports"]
        }
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= pod_ports, service["metadata"]["name"]


def test_compute_advertises_its_pod_address(objects):
    env = {e["name"]: e for e in container(objects, "compute")["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    port = settings(objects)["COMPUTE_PORT"]
    assert env["COMPUTE_ADVERTISE_ADDRESS"]["value"] == f"$(POD_IP):{port}"
    limit = container(objects, "compute")["resources"]["limits"]["cpu"]
    assert env["OMP_NUM_THREADS"]["value"] == str(limit), "torch's threads = the CPU limit"


def pod_specs(objects: list[dict]) -> dict[str, dict]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
    }


def test_one_memory_pod_grace_periods_over_the_drains_and_disruption_budgets(objects):
    data = settings(objects)
    memory = find(objects, "StatefulSet", "memory")
    assert memory["spec"]["replicas"] == 1
    governing = find(objects, "Service", memory["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    for role in ("compute", "gateway"):
        pod = pod_specs(objects)[role]
        pause = container(objects, role).get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pause_s = float(pause[1]) if pause[:1] == ["sleep"] else 0.0
        drain = float(data[f"{role.upper()}_DRAIN_TIMEOUT_S"])
        assert pod["terminationGracePeriodSeconds"] >= pause_s + drain + 5, f"{role} would be killed mid-drain"
        # every replica is unready while the memory service is down: that must not block a node drain
        budget = find(objects, "PodDisruptionBudget", role)["spec"]
        labels = find(objects, "Deployment", role)["spec"]["template"]["metadata"]["labels"]
        assert budget["selector"]["matchLabels"].items() <= labels.items() and budget["maxUnavailable"] == 1
        assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert find(objects, "Deployment", "gateway")["spec"]["replicas"] >= 2


def test_pods_get_no_service_link_variables_and_run_on_x86_64(objects):
    """Kubernetes would inject MEMORY_PORT=tcp://... for the Service `memory`: our settings' names."""
    for name, pod in pod_specs(objects).items():
        assert pod["enableServiceLinks"] is False, name
        assert pod["nodeSelector"] == {"kubernetes.io/arch": "amd64"}, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
    labels = find(objects, "Namespace", "paged-nanogpt")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_pods_are_hardened(objects, compose):
    """Every workload: no service-account token, and each container with a read-only root (an
    emptyDir at /tmp, where the image keeps HOME and caches), no privilege escalation, no
    capabilities, non-root, the runtime's seccomp profile. The prebuilt kernels need nothing from
    the manifests (the image sets PAGED_NANOGPT_KERNELS). The CPU limits and torch's threads agree
    with docker-compose.yml."""
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")]
    assert {o["metadata"]["name"] for o in workloads} == {"memory", "compute", "gateway"}
    for workload in workloads:
        name, pod = workload["metadata"]["name"], workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["runAsNonRoot"] is True, (name, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (name, c["name"])
            (tmp,) = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp["name"]] and not tmp.get("readOnly"), (name, c["name"])
            env = {e["name"] for e in c.get("env", [])}
            assert not env & {"PAGED_NANOGPT_KERNELS", "TORCH_EXTENSIONS_DIR", "HOME"}, "the image sets these"
    assert not set(settings(objects)) & {"PAGED_NANOGPT_KERNELS", "TORCH_EXTENSIONS_DIR"}
    threads = {e["name"]: e["value"] for e in container(objects, "compute")["env"] if "value" in e}["OMP_NUM_THREADS"]
    compute = compose["services"]["compute"]
    assert compute["environment"]["OMP_NUM_THREADS"] == threads == str(compute["cpus"])


class Pod:
    def __init__(self, namespace: str, labels: dict[str, str]) -> None:
        self.namespace, self.labels = namespace, labels
        self.namespace_labels = {"kubernetes.io/metadata.name": namespace}  # every namespace has it


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "this evaluator knows matchLabels only: extend it"
    return selector.get("matchLabels", {}).items() <= labels.items()


def may_connect(policies: list[dict], source: Pod, target: Pod, port: int) -> bool:
    """NetworkPolicy ingress semantics: a pod no policy selects accepts everything; a selected pod
    accepts what at least one rule of one selecting policy allows (a rule without `from`, or with
    an empty one, allows every source; without `ports`, every port). A peer with a
    namespaceSelector matches pods of the namespaces it selects; one with a podSelector alone,
    pods of the policy's namespace."""

    def ingress(policy: dict) -> bool:  # policyTypes defaults to Ingress (and Egress if egress rules exist)
        return "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])

    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == target.namespace
        and selects(p["spec"]["podSelector"], target.labels)
        and ingress(p)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            rule_ports = rule.get("ports", [])
            assert all(
                isinstance(p["port"], int) and "endPort" not in p and p.get("protocol", "TCP") == "TCP"
                for p in rule_ports
            ), "this evaluator knows numbered TCP ports only: extend it"
            if rule_ports and port not in [p["port"] for p in rule_ports]:
                continue
            peers = rule.get("from") or []
            if not peers:
                return True
            for peer in peers:
                assert "ipBlock" not in peer, "this evaluator knows pod and namespace selectors only"
                if "namespaceSelector" in peer:
                    in_namespace = selects(peer["namespaceSelector"], source.namespace_labels)
                else:
                    in_namespace = source.namespace == policy["metadata"]["namespace"]
                if in_namespace and selects(peer.get("podSelector", {}), source.labels):
                    return True
    return False


def test_network_policies_let_only_the_gateway_reach_compute_and_only_its_public_ports_be_reached(objects):
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    ns = objects[1]["metadata"]["namespace"]
    pod = {
        role: Pod(ns, find(objects, *kind)["spec"]["template"]["metadata"]["labels"])
        for role, kind in (
            ("memory", ("StatefulSet", "memory")),
            ("compute", ("Deployment", "compute")),
            ("gateway", ("Deployment", "gateway")),
        )
    }
    outside = Pod("default", {"app": "anything"})
    prometheus = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
    impostor = Pod("default", {"app.kubernetes.io/name": "prometheus"})  # the label alone opens nothing
    data = settings(objects)
    memory, compute = int(data["MEMORY_PORT"]), int(data["COMPUTE_PORT"])
    allowed = {("gateway", "memory", memory), ("compute", "memory", memory), ("gateway", "compute", compute)}
    for source in ("memory", "compute", "gateway"):
        for target, port in (("memory", memory), ("compute", compute)):
            expected = (source, target, port) in allowed
            assert may_connect(policies, pod[source], pod[target], port) == expected, (source, target, port)
    for target in ("memory", "compute", "gateway"):
        ports = {p["containerPort"] for p in container(objects, target)["ports"]}
        for port in ports:
            public = target == "gateway" and port in (int(data["GATEWAY_PORT"]), int(data["GATEWAY_HTTP_PORT"]))
            assert may_connect(policies, outside, pod[target], port) == public, (target, port)
            metrics = port in (int(data["GATEWAY_METRICS_PORT"]), int(data["MEMORY_METRICS_PORT"]))
            assert may_connect(policies, prometheus, pod[target], port) == (public or metrics), (target, port)
            assert may_connect(policies, impostor, pod[target], port) == public, (target, port)
    exposed = [
        s["metadata"]["name"]
        for s in objects
        if s["kind"] == "Service" and s["spec"].get("type", "ClusterIP") != "ClusterIP"
    ]
    assert exposed == ["gateway"]


def quantity_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def peak_resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def test_memory_limits_cover_each_services_measured_peak_with_a_full_pool(objects, tmp_path):
    """The ConfigMap's model and pool, every sequence slot busy and the pool filled: each
    service's peak resident memory stays under its container's limit (else the kernel kills it
    at the worst moment), and compute's limit is at least what deploy.sizing asks for."""
    import numpy as np

    from deploy.run_local import running_stack
    from deploy.services import free_ports
    from gateway.client import stream_generate

    data = settings(objects)
    budget, seqs = int(data["COMPUTE_KV_BUDGET_TOKENS"]), int(data["COMPUTE_MAX_NUM_SEQS"])
    limits = {
        role: quantity_bytes(container(objects, role)["resources"]["limits"]["memory"])
        for role in ("memory", "compute", "gateway")
    }
    assert replica_memory(data["COMPUTE_MODEL"], budget).suggested_limit_bytes <= limits["compute"]
    per_sequence = budget // seqs  # together they fill the pool
    new_tokens = per_sequence // 4
    memory, compute, gateway, m1, m2, http, page = free_ports(7)  # the block map on too, as in the pod
    services = local_services(
        memory,
        (compute,),
        gateway,
        m1,
        m2,
        gateway_http_port=http,
        memory_http_port=page,
        compute_settings={"model": data["COMPUTE_MODEL"], "kv_budget_tokens": str(budget), "max_num_seqs": str(seqs)},
    )
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50000, size=per_sequence - new_tokens - 1).tolist() for _ in range(seqs)]
    errors: list = []

    def one(prompt: list[int]) -> None:
        try:
            list(stream_generate(f"127.0.0.1:{gateway}", prompt, 300, max_new_tokens=new_tokens, ignore_eos=True))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with running_stack(services, timeout_s=300, log_dir=str(tmp_path)) as procs:
        clients = [threading.Thread(target=one, args=(p,)) for p in prompts]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        peaks = {spec.role: peak_resident_bytes(proc.pid) for spec, proc in zip(services, procs, strict=False)}
    assert not errors, errors[:2]
    for role, peak in peaks.items():
        print(f"{role}: peak {peak / 2**20:.0f} MiB, limit {limits[role] / 2**20:.0f} MiB")
        assert peak < limits[role], f"{role} peaked at {peak / 2**20:.0f} MiB, over its limit"
