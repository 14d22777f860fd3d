"""The Kubernetes manifests (deploy/k8s), the kustomization (deploy/kustomization.yaml) and the Helm
values (deploy/helm), offline: there is no cluster here.

Every object validates against Kubernetes' own OpenAPI schemas (`kubernetes-validate`, strict: an
unknown field fails) for two versions; the one custom resource (ServiceMonitor, the Prometheus
Operator's CRD) has no schema there and is checked field by field. The Helm values' Kubernetes parts
(volumes, security contexts, resources) validate against the same schemas, and the values agree with
deploy/dagster/dagster.yaml and the manifests. The wiring is checked where a typo would only show
on a cluster: selectors, probes, names the alert rules expect, settings the service really reads,
secrets only by reference. `checkov` (its own virtualenv, `make tools`) finds nothing unjustified.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from recsys_assets.k8s import TRAINING_CLI_MODULE, TrainingLauncherSettings
from recsys_serving.settings import ServingSettings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
CHECKOV = REPO / ".venv-tools" / "bin" / "checkov"
# Variables the service reads besides ServingSettings' fields (recsys_serving/feature_client.py, bundle.py).
SERVICE_EXTRA_ENV = {"RECSYS_FEAST_ONLINE_STORE", "RECSYS_REDIS_CONNECTION", "RECSYS_BUNDLE_PUBLIC_KEY_FILE"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@cache
def _objects() -> tuple[tuple[str, dict[str, Any]], ...]:
    return tuple((p.name, doc) for p in sorted(K8S.glob("*.yaml")) for doc in _docs(p))


def _get(kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for _, o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def _workloads() -> list[dict[str, Any]]:
    return [o for _, o in _objects() if o["kind"] in {"Deployment", "StatefulSet", "Job"}]


@cache
def _definitions(version: str = K8S_VERSIONS[0]) -> dict[str, Any]:
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{version}-local-strict"
    return json.loads((root / "_definitions.json").read_text())["$defs"]


def _validate_part(value: Any, definition: str) -> None:
    """One part of an object (a Volume, a SecurityContext...) against Kubernetes' definition of it."""
    schema = {"$ref": f"#/$defs/io.k8s.api.core.v1.{definition}", "$defs": _definitions()}
    jsonschema.Draft202012Validator(schema).validate(value)


def test_every_manifest_validates_against_kubernetes_schemas() -> None:
    objects = _objects()
    assert {o["kind"] for _, o in objects} >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor",
        "StatefulSet", "Job", "PersistentVolumeClaim", "ConfigMap", "NetworkPolicy",
    }
    for file, obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError as exc:
                pytest.fail(f"{file}: {obj['kind']} has no schema in Kubernetes {version}: {exc}")
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{file}: {obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {exc.message}")
        assert obj["metadata"].get("namespace", "recsys") == "recsys"


def test_strict_validation_rejects_a_misspelt_field() -> None:
    deployment = json.loads(json.dumps(_get("Deployment", "recsys-recommender")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = deployment["spec"]["template"]["spec"][
        "containers"
    ][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_service_monitor_selects_the_service_port() -> None:
    monitor, service = _get("ServiceMonitor", "recsys"), _get("Service", "recsys")
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval"} and endpoint["port"] in ports
        assert endpoint["path"] == "/metrics"
    # The alert rules watch up{job="recsys"}: the operator names the job after the Service.
    rules = (DEPLOY / "monitoring" / "rules" / "recsys.rules.yml").read_text()
    assert 'up{job="recsys"}' in rules and service["metadata"]["name"] == "recsys"


def test_serving_deployment_wiring() -> None:
    deployment = _get("Deployment", "recsys-recommender")
    pod = _pod_spec(deployment)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for kind in ("Service", "PodDisruptionBudget"):
        (obj,) = [o for _, o in _objects() if o["kind"] == kind and o["metadata"]["name"].startswith("recsys")
                  and o["spec"].get("selector", {}).get("matchLabels", o["spec"].get("selector")) in
                  ({"app.kubernetes.io/name": "recsys-recommender"},)]
        selector = obj["spec"]["selector"].get("matchLabels", obj["spec"]["selector"])
        assert selector.items() <= labels.items()
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    env = {e["name"]: e for e in container["env"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    data_claim = volumes[mounts["/var/lib/recsys"]]["persistentVolumeClaim"]["claimName"]
    assert data_claim == _get("PersistentVolumeClaim", "recsys-data")["metadata"]["name"]
    assert env["RECSYS_BUNDLE"]["value"].startswith("/var/lib/recsys/bundles/")
    config = _get("ConfigMap", "recsys-env")["data"]
    assert config["RECSYS_HOME"] == "/var/lib/recsys" and config["RECSYS_FEAST_ONLINE_STORE"] == "redis"
    assert env["RECSYS_REDIS_CONNECTION"]["valueFrom"]["secretKeyRef"]["name"] == "recsys-redis"
    tokens_dir = str(Path(env["RECSYS_API_TOKENS_FILE"]["value"]).parent)
    assert volumes[mounts[tokens_dir]]["secret"]["secretName"] == "recsys-api-tokens"
    assert "configMap" in volumes[mounts[env["RECSYS_BUNDLE_PUBLIC_KEY_FILE"]["value"]]]
    # Every RECSYS_ variable given to the service is one it reads (a typo would be silently ignored).
    known = {f"RECSYS_{name.upper()}" for name in ServingSettings.model_fields} | {"RECSYS_BUNDLE"} | SERVICE_EXTRA_ENV
    given = {n for n in env if n.startswith("RECSYS_")} | {n for n in config if n.startswith("RECSYS_")}
    assert given <= known, given - known
    hpa = _get("HorizontalPodAutoscaler", "recsys-recommender")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "recsys-recommender"}
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}
    adapter = yaml.safe_load((DEPLOY / "helm" / "prometheus-adapter-values.yaml").read_text())
    (pods_metric,) = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metric in {rule["name"]["as"] for rule in adapter["rules"]["custom"]}


def test_every_container_is_non_root_with_a_read_only_root() -> None:
    for obj in _workloads():
        pod = _pod_spec(obj)
        assert pod["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]
        assert pod.get("automountServiceAccountToken") is False, obj["metadata"]["name"]
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert "cpu" in container["resources"]["requests"] and "memory" in container["resources"]["limits"]


def test_secrets_only_by_reference() -> None:
    """No Secret object and no literal credential in the repository's manifests and values."""
    assert all(o["kind"] != "Secret" for _, o in _objects())
    secret_like = re.compile(r"PASSWORD|TOKEN|SECRET|CONNECTION", re.I)
    for obj in _workloads():
        for container in _pod_spec(obj)["containers"]:
            for env in container.get("env", []):
                if secret_like.search(env["name"]) and "value" in env:
                    assert env["value"].startswith("/"), f"{env['name']} is a literal, not a Secret reference or file"
    for path in [*K8S.glob("*.yaml"), DEPLOY / "helm" / "dagster-values.yaml", DEPLOY / "dagster" / "dagster.yaml"]:
        for line in path.read_text().splitlines():
            assert not re.search(r"(password|token)\s*:\s*[\"']?\w{6,}", line, re.I), f"{path.name}: {line}"


def test_dagster_env_configmap_parses_as_training_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _get("ConfigMap", "recsys-dagster-env")["data"]
    for name, value in data.items():
        if name.startswith("RECSYS_TRAINING_"):
            monkeypatch.setenv(name, value)
    settings = TrainingLauncherSettings()
    assert settings.launcher == "k8s" and settings.image and settings.gpus >= 1
    assert settings.data_claim == "recsys-data" and settings.home == _get("ConfigMap", "recsys-env")["data"]["RECSYS_HOME"]
    # PipesK8sClient in the run pods needs these verbs on pods (rbac.yaml).
    role = _get("Role", "recsys-training-launcher")
    verbs = {v for rule in role["rules"] for v in rule["verbs"] if "pods" in rule["resources"]}
    assert {"create", "get", "list", "watch", "delete"} <= verbs


def test_multinode_training_job() -> None:
    job, service = _get("Job", "recsys-train-multinode"), _get("Service", "recsys-train-multinode")
    spec = job["spec"]
    pod = _pod_spec(job)
    (container,) = pod["containers"]
    args = container["args"]
    flag = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith("--") and "=" in a}
    assert container["command"] == ["torchrun"]
    assert args[args.index("-m") + 1] == TRAINING_CLI_MODULE
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(flag["--nnodes"])
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(flag["--nproc-per-node"]) == int(gpus) == int(container["resources"]["requests"]["nvidia.com/gpu"])
    assert flag["--rdzv-backend"] == "c10d"
    host, port = flag["--rdzv-endpoint"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    env = {e["name"]: e for e in container["env"]}
    assert "NCCL_SOCKET_IFNAME" in env and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "1"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert flag["--out"].startswith("/var/lib/recsys/models/")
    assert volumes[mounts["/var/lib/recsys"]]["persistentVolumeClaim"]["claimName"] == "recsys-data"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert int(flag["--max-restarts"]) >= 1
    assert {"type": "DisruptionTarget", "status": "True"} in spec["podFailurePolicy"]["rules"][0]["onPodConditions"]


def test_kustomization_lists_the_manifests_and_monitoring_files() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    resources = set(kustomization["resources"])
    assert all((DEPLOY / r).exists() for r in resources)
    launched_per_run = {"k8s/training-multinode.yaml"}
    assert {f"k8s/{p.name}" for p in K8S.glob("*.yaml")} == resources | launched_per_run
    files = {f for generator in kustomization["configMapGenerator"] for f in generator["files"]}
    assert files == {"monitoring/grafana/recsys-dashboard.json", "monitoring/rules/recsys.rules.yml"}
    assert all((DEPLOY / f).exists() for f in files)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_render_validates() -> None:
    done = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rendered = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    for obj in rendered:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    dashboard = next(o for o in rendered if o["metadata"]["name"] == "recsys-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    committed = (DEPLOY / "monitoring" / "grafana" / "recsys-dashboard.json").read_text()
    assert json.loads(dashboard["data"]["recsys-dashboard.json"]) == json.loads(committed)


def test_helm_values_agree_with_the_instance_and_manifests() -> None:
    values = yaml.safe_load((DEPLOY / "helm" / "dagster-values.yaml").read_text())
    instance = yaml.safe_load((DEPLOY / "dagster" / "dagster.yaml").read_text())
    dagster_env = _get("ConfigMap", "recsys-dagster-env")["data"]
    pg = values["postgresql"]
    assert pg["enabled"] is False and values["generatePostgresqlPasswordSecret"] is False
    assert (pg["postgresqlHost"], pg["postgresqlUsername"], pg["postgresqlDatabase"], str(pg["service"]["port"])) == (
        dagster_env["DAGSTER_PG_HOST"], dagster_env["DAGSTER_PG_USER"], dagster_env["DAGSTER_PG_DB"], dagster_env["DAGSTER_PG_PORT"]
    )
    assert pg["postgresqlScheme"] == instance["storage"]["postgres"]["postgres_db"]["scheme"]
    secret = values["global"]["postgresqlSecretName"]
    assert secret == instance["run_launcher"]["config"]["postgres_password_secret"]
    postgres = _pod_spec(_get("StatefulSet", "recsys-postgresql"))
    assert secret in {v.get("secret", {}).get("secretName") for v in postgres["volumes"]}
    assert values["runLauncher"]["type"] == instance["run_launcher"]["class"] == "K8sRunLauncher"
    queued = values["dagsterDaemon"]["runCoordinator"]
    assert queued["type"] == "QueuedRunCoordinator" == instance["run_coordinator"]["class"]
    assert queued["config"]["queuedRunCoordinator"]["maxConcurrentRuns"] == instance["run_coordinator"]["config"]["max_concurrent_runs"] == 1
    assert values["telemetry"]["enabled"] is False and instance["telemetry"]["enabled"] is False

    (deployment,) = values["dagster-user-deployments"]["deployments"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"]
    args = deployment["dagsterApiGrpcArgs"]
    assert args[args.index("--module-name") + 1] == pyproject["module_name"]
    assert deployment["name"] == pyproject["code_location_name"]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    config_maps = {o["metadata"]["name"] for _, o in _objects() if o["kind"] == "ConfigMap"}
    assert {c["name"] for c in deployment["envConfigMaps"]} <= config_maps
    assert set(instance["run_launcher"]["config"]["env_config_maps"]) == {c["name"] for c in deployment["envConfigMaps"]}
    assert {s["name"] for s in deployment["envSecrets"]} == set(instance["run_launcher"]["config"]["env_secrets"])
    claims = {v["persistentVolumeClaim"]["claimName"] for v in deployment["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"recsys-data"}
    assert {m["mountPath"] for m in deployment["volumeMounts"]} == {
        m["mount_path"] for m in instance["run_launcher"]["config"]["volume_mounts"]
    }
    assert dagster_env["RECSYS_TRAINING_IMAGE"].startswith(deployment["image"]["repository"] + ":")
    rbac_subjects = {s["name"] for s in _get("RoleBinding", "recsys-training-launcher")["subjects"]}
    assert values["serviceAccount"]["name"] == values["global"]["serviceAccountName"] and values["serviceAccount"]["name"] in rbac_subjects

    # The Kubernetes parts of the values against Kubernetes' own definitions.
    for volume in deployment["volumes"]:
        _validate_part(volume, "Volume")
    for mount in deployment["volumeMounts"]:
        _validate_part(mount, "VolumeMount")
    for section in (deployment, values["dagsterDaemon"], values["dagsterWebserver"]):
        _validate_part(section["podSecurityContext"], "PodSecurityContext")
        _validate_part(section["securityContext"], "SecurityContext")
        _validate_part(section["resources"], "ResourceRequirements")
    _validate_part(values["runLauncher"]["config"]["k8sRunLauncher"]["resources"], "ResourceRequirements")
    with pytest.raises(jsonschema.ValidationError):
        _validate_part({"runAsNonRoot": True, "readOnlyRootFilesytem": True}, "SecurityContext")


@pytest.mark.skipif(not CHECKOV.exists(), reason="checkov is installed by `make tools` (its own virtualenv, .venv-tools)")
def test_checkov_finds_nothing_unjustified() -> None:
    """The manifests; the Dockerfiles are tests/test_deploy_images.py's."""
    done = subprocess.run(
        [str(CHECKOV), "--compact", "--skip-download", "--output", "json", "--framework", "kubernetes", "-d", str(K8S)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [(c["check_id"], c["resource"], c["file_path"]) for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, failed
    assert {r["check_type"] for r in reports} == {"kubernetes"}
    skipped = [c for r in reports for c in r["results"]["skipped_checks"]]
    assert skipped
    for check in skipped:
        reason = (check["check_result"].get("suppress_comment") or "").strip()
        assert len(reason) >= 20, f"{check['check_id']} is skipped without a reason"
