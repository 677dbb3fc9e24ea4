"""``deploy/k8s/`` validated offline against the Kubernetes OpenAPI schemas bundled by
kubernetes-validate (strict: unknown fields are errors), and checked for what the
schemas cannot see: the objects refer to each other correctly, every setting is a real
gateway setting, the image's user and port match the Containerfile."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fieldchat.gateway import GatewaySettings
from tests.deploy._commands import resolve

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (a dev dependency)"
)
yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes release still in upstream support when this was written, and the
# newest schema the package bundles: the manifests must suit both.
VERSIONS = ("1.31.0", "latest")


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _objects() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _documents(path):
            if doc["kind"] != "Kustomization":
                found[doc["kind"], doc["metadata"]["name"]] = doc
    return found


MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_matches_the_kubernetes_schema(name, version):
    wanted = kubernetes_validate.latest_version() if version == "latest" else version
    for doc in _documents(K8S / name):
        try:
            kubernetes_validate.validate(doc, wanted, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} ({doc['kind']}), Kubernetes {wanted}: {exc.message}")


def test_kustomization_lists_every_manifest_but_the_example_secret():
    kustomization = _documents(K8S / "kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == sorted(
        m for m in MANIFESTS if not m.endswith(".example.yaml")
    )


def _gateway() -> tuple[dict[str, Any], dict[str, Any]]:
    objects = _objects()
    workload = objects["StatefulSet", "fieldchat-gateway"]
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return workload, container


def test_two_replicas_with_probes_resources_and_a_locked_down_context():
    workload, container = _gateway()
    pod = workload["spec"]["template"]["spec"]
    assert workload["spec"]["replicas"] == 2
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert "livenessProbe" in container
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    ctx = container["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"] == {"drop": ["ALL"]}


def test_each_replica_has_its_own_stable_mqtt_identity():
    workload, container = _gateway()
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["FIELDCHAT_GATEWAY_MQTT_CLIENT_ID"]["value"] == "gw-$(POD_NAME)"
    assert env["FIELDCHAT_GATEWAY_MQTT_USERNAME"]["value"] == "gw-$(POD_NAME)"
    assert env["FIELDCHAT_GATEWAY_SHARE_GROUP"]["value"]
    assert env["FIELDCHAT_GATEWAY_COOKIE_SECURE"]["value"] == "true"


def test_env_and_secret_settings_are_real_gateway_settings():
    _, container = _gateway()
    fields = set(GatewaySettings.model_fields)
    for item in container["env"]:
        name = item["name"]
        if name.startswith("FIELDCHAT_GATEWAY_") and name != "FIELDCHAT_GATEWAY_CONFIG":
            assert name.removeprefix("FIELDCHAT_GATEWAY_").lower() in fields, name
    secret = _objects()["Secret", "fieldchat-gateway"]
    workload, _ = _gateway()
    replicas = workload["spec"]["replicas"]
    names = {f"{workload['metadata']['name']}-{i}.toml" for i in range(replicas)}
    assert set(secret["stringData"]) == names  # one file per pod, as the env names it
    for text in secret["stringData"].values():
        settings = tomllib.loads(text)
        assert set(settings) <= fields
        assert {"database_url", "mqtt_password"} <= set(settings)
        GatewaySettings(**settings)  # values of the right shape


def test_objects_refer_to_each_other():
    objects = _objects()
    workload, container = _gateway()
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    headless = objects["Service", workload["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    ingress = objects["Ingress", "fieldchat-gateway"]
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            service = objects["Service", backend["name"]]
            assert service["spec"]["selector"].items() <= labels.items()
            service_ports = {p["name"]: p for p in service["spec"]["ports"]}
            assert service_ports[backend["port"]["name"]]["targetPort"] in ports
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert ingress["spec"]["tls"]
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    config = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/fieldchat")
    assert ("Secret", volumes[config["name"]]["secret"]["secretName"]) in objects
    pdb = objects["PodDisruptionBudget", "fieldchat-gateway"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_container_matches_the_image():
    _, container = _gateway()
    containerfile = (ROOT / "deploy" / "Containerfile").read_text()
    user = re.findall(r"^USER (\d+):(\d+)$", containerfile, re.M)[-1]
    workload, _ = _gateway()
    ctx = workload["spec"]["template"]["spec"]["securityContext"]
    assert (str(ctx["runAsUser"]), str(ctx["runAsGroup"])) == user
    exposed = re.findall(r"^EXPOSE (\d+)$", containerfile, re.M)
    assert [str(p["containerPort"]) for p in container["ports"]] == exposed
    assert resolve(container["args"]).name == "run"
