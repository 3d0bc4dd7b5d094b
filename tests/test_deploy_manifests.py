"""The deploy files, validated offline: deploy/compose.yml against the Compose Specification's
JSON schema plus its cross-references; deploy/k8s rendered by `kubectl kustomize` and every
object validated against the Kubernetes OpenAPI schemas (kubernetes-validate) or, for KEDA's
ScaledObjects, against deploy/schemas/keda-scaledobject.schema.json; the NATS Helm values
against the chart's documented keys and groundloop's permission map.
(deploy/schemas/README.md says where each schema comes from.)
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from groundloop.permissions import ROLES, Names, key_variable, merged_permissions
from tests.paths import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"
# Service roles that must each have a compose service and a Kubernetes Deployment.
SERVICE_ROLES = ("api", "evolver", "ideator", "implementer", "rl-trainer")
RUNNERS = ("runner-cpu", "runner-gpu1")
# appArmorProfile in the runner pods is a field from Kubernetes 1.30 on.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yml").read_text())


def compose_errors(document: dict) -> list[str]:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


# ---------------------------------------------------------------------------- compose


def test_compose_file_follows_the_compose_spec() -> None:
    assert compose_errors(compose()) == []


def test_the_compose_schema_rejects_what_compose_would() -> None:
    broken = compose()
    broken["services"]["api"]["restart_policy"] = "always"  # not a service key
    broken["services"]["runner"]["ports"] = "8000:8000"  # a list, not a string
    errors = compose_errors(broken)
    assert any("restart_policy" in e for e in errors), errors
    assert any(e.startswith("services/runner/ports") for e in errors), errors


def test_compose_references_exist() -> None:
    document = compose()
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M))
    services = document["services"]
    volumes = set(document.get("volumes") or {})
    for name, service in services.items():
        build = service.get("build")
        if isinstance(build, dict):
            assert build.get("target") in stages, (
                f"{name}: no Dockerfile stage {build.get('target')}"
            )
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve().is_file()
        for dependency in service.get("depends_on") or []:
            assert dependency in services, f"{name} depends on missing service {dependency}"
        for mount in service.get("volumes") or []:
            source = mount.split(":", 1)[0] if isinstance(mount, str) else mount["source"]
            if source.startswith("."):
                # secrets are made by deploy/nats/make-secrets.sh; the rest is committed
                made = "/secrets/" in source
                assert made or (DEPLOY / source).exists(), f"{name}: {source} missing"
            else:
                assert source in volumes, f"{name}: volume {source} is not declared"
        env_files = service.get("env_file") or []
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            assert "/secrets/" in env_file or (DEPLOY / env_file).is_file(), env_file
    for role in (*SERVICE_ROLES, "runner", "runner-gpu", "cli"):
        assert role in services, f"no compose service for {role}"


# ---------------------------------------------------------------------------- kubernetes


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render deploy/k8s (.ci/run installs it)")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "k8s")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize deploy/k8s failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_every_kubernetes_object_is_valid(rendered: list[dict]) -> None:
    checked = 0
    for document in rendered:
        if document["apiVersion"].startswith("keda.sh/"):
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                name = f"{document['kind']}/{document['metadata']['name']}"
                pytest.fail(f"{name} is not valid Kubernetes {version}: {exc.message}")
            checked += 1
    assert checked >= 10 * len(KUBERNETES_VERSIONS)


def test_the_kubernetes_schemas_reject_a_mistake(rendered: list[dict]) -> None:
    deployment = copy.deepcopy(next(d for d in rendered if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_every_role_is_deployed_in_the_namespace(rendered: list[dict]) -> None:
    deployments = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Deployment"}
    for role in (*SERVICE_ROLES, *RUNNERS):
        assert f"groundloop-{role}" in deployments, f"no Deployment for {role}"
    stages = set(re.findall(r"AS\s+(\S+)", (DEPLOY / "Dockerfile").read_text()))
    for name, deployment in deployments.items():
        assert deployment["metadata"]["namespace"] == "groundloop"
        image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        stage = image.split(":")[0].removeprefix("groundloop-")
        assert stage in stages, f"{name}: image {image} is no target of deploy/Dockerfile"
    service = next(d for d in rendered if d["kind"] == "Service")
    assert service["spec"]["selector"] == {"app": "groundloop-api"}
    config_maps = {d["metadata"]["name"] for d in rendered if d["kind"] == "ConfigMap"}
    for deployment in deployments.values():
        for source in deployment["spec"]["template"]["spec"]["containers"][0].get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in config_maps  # the generated name


def test_runners_scale_on_their_consumer(rendered: list[dict]) -> None:
    schema = json.loads((SCHEMAS / "keda-scaledobject.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    scaled = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "ScaledObject"}
    deployments = {d["metadata"]["name"] for d in rendered if d["kind"] == "Deployment"}
    assert set(scaled) == {f"groundloop-{r}" for r in RUNNERS}
    for runner in RUNNERS:
        document = scaled[f"groundloop-{runner}"]
        errors = [e.message for e in validator.iter_errors(document)]
        assert errors == [], f"{runner}: {errors}"
        assert document["spec"]["scaleTargetRef"]["name"] in deployments
        (trigger,) = document["spec"]["triggers"]
        assert trigger["type"] == "nats-jetstream"
        assert trigger["metadata"]["stream"] == Names().stream
        assert trigger["metadata"]["consumer"] == runner  # the runner role's durable consumer
        assert trigger["metadata"]["natsServerMonitoringEndpoint"].startswith("nats-headless.")
    broken = copy.deepcopy(scaled["groundloop-runner-cpu"])
    del broken["spec"]["triggers"][0]["metadata"]["consumer"]
    assert any("consumer" in e.message for e in validator.iter_errors(broken))


def test_runner_consumers_are_the_runners_durables() -> None:
    names = Names()
    consumers = {c for grant in ROLES.values() for c in grant.consumers}
    assert set(RUNNERS) <= consumers, consumers
    assert names.stream == "GROUNDLOOP"


# ---------------------------------------------------------------------------- NATS chart


def test_nats_values_are_current_and_use_the_charts_keys() -> None:
    rendered = subprocess.run(
        [sys.executable, str(DEPLOY / "k8s" / "nats_values.py"), "check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    values = yaml.safe_load((DEPLOY / "k8s" / "nats-values.yaml").read_text())
    config = values["config"]
    assert config["cluster"] == {"enabled": True, "replicas": 3}
    assert config["jetstream"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["pvc"]["enabled"] is True
    assert config["monitor"]["port"] == 8222  # KEDA's endpoint in runner-scaling.yaml
    # The chart's documented top-level keys only (a misspelt key is silently ignored by Helm).
    chart_keys = {
        "config",
        "container",
        "reloader",
        "promExporter",
        "service",
        "headlessService",
        "statefulSet",
        "podTemplate",
        "natsBox",
        "tlsCA",
        "serviceAccount",
        "global",
    }
    assert set(values) <= chart_keys, set(values) - chart_keys
    users = config["merge"]["authorization"]["users"]
    expected = [
        {"nkey": f"<< ${key_variable(r)} >>", "permissions": merged_permissions(r, [Names()])}
        for r in ROLES
    ]
    assert users == expected
    conf = (DEPLOY / "nats" / "groundloop.conf").read_text()
    for role in ROLES:  # the same users as the single-server config
        assert f"nkey: ${key_variable(role)}" in conf


def test_helm_install_is_documented() -> None:
    readme = (DEPLOY / "k8s" / "README.md").read_text()
    assert "helm install nats nats/nats" in readme and "nats-values.yaml" in readme
    assert "kubectl apply -k deploy/k8s" in readme


def test_schemas_have_their_licences() -> None:
    assert (SCHEMAS / "compose-spec.LICENSE").read_text().lstrip().startswith("Apache License")
    assert Path(SCHEMAS / "README.md").is_file()
