"""The Kubernetes manifests in deploy/k8s, checked without a cluster (no API server can be had
here), then the number KEDA scales on read from a real controller.

1. Every YAML document validates: core objects against the Kubernetes 1.30 OpenAPI schemas with
   `kubernetes-validate` (strict: an unknown field is an error, as `kubectl apply` makes it), KEDA
   and Prometheus-operator objects with `@kubernetes-models/keda` and
   `@kubernetes-models/prometheus-operator` through tests/deploy/validate-crds.mjs (installed by
   scripts/setup.sh). A deliberately broken copy fails, naming the field.
2. The pieces agree where a user would otherwise find out from a pod that never starts or a
   scaler that reads nothing: secret keys, the Service ports that workers and KEDA dial, the
   fleet secret on both sides, one GPU and a checkpoint's worth of grace per worker, the pod
   labels the Prometheus jobs select, and settings the lathe binaries actually read.
3. The demand endpoint the ScaledJob's trigger names, read as KEDA reads it (bearer token, GJSON
   valueLocation), rises with queued jobs and falls when they are cancelled.

These tests need no session controller or worker; only the last starts a controller of its own.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate
import pytest
import yaml

from lathe_service import (ROOT, Service, create_job, example_rows, find_lathe_bin, make_client,
                           require_postgres_and_redis, wait_for_status, wait_until, write_jsonl)

K8S = ROOT / "deploy" / "k8s"
CRD_VALIDATOR = ROOT / "tests" / "deploy" / "validate-crds.mjs"
CRD_NODE_MODULES = [ROOT / "tests" / "deploy" / "node_modules" / "@kubernetes-models" / name
                    for name in ("keda", "prometheus-operator")]
RUST_SOURCES = ROOT / "services"

KUBERNETES_VERSION = "1.30"
KEDA_API_VERSION = "keda.sh/v1alpha1"
PROMETHEUS_OPERATOR_API_VERSION = "monitoring.coreos.com/v1"
# Custom resources: validated by validate-crds.mjs, not kubernetes-validate.
CRD_API_VERSIONS = (KEDA_API_VERSION, PROMETHEUS_OPERATOR_API_VERSION)
KUSTOMIZATION_API_VERSION = "kustomize.config.k8s.io/v1beta1"
# The image name every Lathe container carries; kustomization.yaml maps it to the registry's.
LATHE_IMAGE = "lathe"
# Manifest files kustomization.yaml leaves out on purpose (it says why); alternatives/ too.
NOT_APPLIED_BY_KUSTOMIZE = {"secret.example.yaml", "prometheus-scrape.yaml", "podmonitor.yaml"}
DEMAND_PATH = "/v1/admin/demand"
# The controller's answer as documented for KEDA: what valueLocation must find a number in.
DOCUMENTED_DEMAND_ANSWER = {"object": "list", "data": [{
    "object": "pool_demand", "pool": "a100", "queued_jobs": 3, "running_jobs": 1, "queued_evaluations": 0,
    "running_evaluations": 0, "demand": 4, "gpu_memory_gb_asked": 0, "gpus_asked": 4, "nodes_asked": 4,
    "oldest_queued_seconds": 120, "workers": 1, "draining_workers": 0}]}
# A full fine-tune of 8B checkpoints in a few minutes; the grace period must cover that.
MIN_WORKER_GRACE_SECONDS = 300


@pytest.fixture(autouse=True)
def clean_slate():
    """Replaces the suite's fixture of this name: nothing here uses the session's controller and
    worker, and the validation tests must not need them."""
    yield


# ---------------------------------------------------------------------------------------------
# the manifests


@dataclass(frozen=True)
class Manifest:
    path: Path
    doc: dict

    @property
    def kind(self) -> str:
        return self.doc.get("kind", "")

    @property
    def name(self) -> str:
        return self.doc.get("metadata", {}).get("name", "")

    @property
    def namespace(self) -> str | None:
        return self.doc.get("metadata", {}).get("namespace")

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}: {self.kind}/{self.name}"


@cache
def manifest_files() -> tuple[Path, ...]:
    files = tuple(sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml")))
    assert files, f"no YAML under {K8S}"
    return files


@cache
def manifests() -> tuple[Manifest, ...]:
    found = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc, \
                f"{path.relative_to(ROOT)}: a document that is not a Kubernetes object: {str(doc)[:200]}"
            found.append(Manifest(path, doc))
    return tuple(found)


def objects(kind: str) -> list[Manifest]:
    return [m for m in manifests() if m.kind == kind]


def the(kind: str, name: str, namespace: str | None) -> Manifest:
    found = [m for m in objects(kind) if m.name == name and m.namespace == namespace]
    assert len(found) == 1, f"expected one {kind} {name!r} in namespace {namespace!r}, found {len(found)}"
    return found[0]


@dataclass(frozen=True)
class PodTemplate:
    """A pod that some object makes: a Deployment's template or a ScaledJob's Job template."""
    owner: Manifest
    template: dict

    @property
    def spec(self) -> dict:
        return self.template["spec"]

    @property
    def labels(self) -> dict:
        return self.template.get("metadata", {}).get("labels", {})

    @property
    def component(self) -> str | None:
        return self.labels.get("app.kubernetes.io/component")

    def lathe_container(self) -> dict:
        found = [c for c in self.spec["containers"] if c.get("image") == LATHE_IMAGE]
        assert len(found) == 1, f"{self.owner.where()}: expected one container with image {LATHE_IMAGE!r}"
        return found[0]


def pod_templates() -> list[PodTemplate]:
    templates = []
    for m in manifests():
        if m.kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            templates.append(PodTemplate(m, m.doc["spec"]["template"]))
        elif m.kind == "CronJob":
            templates.append(PodTemplate(m, m.doc["spec"]["jobTemplate"]["spec"]["template"]))
        elif m.kind == "ScaledJob":
            templates.append(PodTemplate(m, m.doc["spec"]["jobTargetRef"]["template"]))
        elif m.kind == "Pod":
            templates.append(PodTemplate(m, m.doc))
    return templates


def worker_templates() -> list[PodTemplate]:
    workers = [t for t in pod_templates() if t.component == "worker"]
    assert {t.owner.kind for t in workers} == {"ScaledJob", "Deployment"}, \
        "expected workers as a ScaledJob and as the alternative Deployment"
    return workers


def controller_template() -> PodTemplate:
    found = [t for t in pod_templates() if t.component == "controller"]
    assert len(found) == 1, f"expected one controller Deployment, found {[t.owner.where() for t in found]}"
    return found[0]


def controller_service() -> Manifest:
    controller = controller_template()
    found = [m for m in objects("Service") if m.namespace == controller.owner.namespace
             and m.doc["spec"].get("selector", {}).items() <= controller.labels.items()]
    assert len(found) == 1, f"expected one Service selecting the controller pods, found {[m.where() for m in found]}"
    return found[0]


def service_port(service: Manifest, name: str) -> dict:
    found = [p for p in service.doc["spec"]["ports"] if p.get("name") == name]
    assert len(found) == 1, f"{service.where()} has no port named {name!r}"
    return found[0]


def command_of(container: dict) -> list[str]:
    return [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]


def flag(container: dict, name: str) -> str | None:
    args = command_of(container)
    return args[args.index(name) + 1] if name in args else None


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def expansion_helpers(container: dict) -> set[str]:
    """Env entries that exist to be expanded into a later entry's value (`$(NAME)`), such as the
    Redis password inside LATHE_REDIS_URL: Kubernetes' settings, not Lathe's."""
    values = " ".join(str(e.get("value", "")) for e in container.get("env", []))
    return {name for name in env_of(container) if f"$({name})" in values}


def secret_ref(pod: PodTemplate, env_name: str) -> tuple[str, str]:
    entry = env_of(pod.lathe_container()).get(env_name)
    assert entry and "secretKeyRef" in entry.get("valueFrom", {}), \
        f"{pod.owner.where()}: {env_name} is not read from a Secret"
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def listen_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def keda_trigger(scaler: Manifest) -> dict:
    triggers = scaler.doc["spec"]["triggers"]
    assert len(triggers) == 1 and triggers[0]["type"] == "metrics-api", \
        f"{scaler.where()}: expected one metrics-api trigger, found {[t.get('type') for t in triggers]}"
    return triggers[0]


def gjson_number(document, path: str) -> float:
    """The number at `path`, in the subset of GJSON path syntax the manifests use (dotted keys
    and array indexes, `data.0.demand`), as KEDA's metrics-api scaler would read it."""
    assert not re.search(r"[*?#|@\\]", path), f"valueLocation {path!r} uses GJSON syntax this check does not read"
    value = document
    for part in path.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            pytest.fail(f"valueLocation {path!r}: nothing at {part!r} in {json.dumps(document)[:400]}", pytrace=False)
    assert isinstance(value, (int, float)) and not isinstance(value, bool), \
        f"valueLocation {path!r} finds {value!r}, not a number: KEDA's metrics-api scaler refuses that"
    return value


# ---------------------------------------------------------------------------------------------
# validators


def kubernetes_problems(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path)) or '(root)'}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no Kubernetes {KUBERNETES_VERSION} schema for {doc['apiVersion']} {doc['kind']}, "
                "and no other validator here knows it"]
    return []


def run_crd_validator(*files: Path) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    if node is None:
        pytest.fail("`node` is not installed: the KEDA and PodMonitor checks run tests/deploy/validate-crds.mjs "
                    "(apt-get install nodejs npm, then scripts/setup.sh)", pytrace=False)
    for modules in CRD_NODE_MODULES:
        if not modules.is_dir():
            pytest.fail(f"{modules.relative_to(ROOT)} is missing: run scripts/setup.sh "
                        "(npm ci in tests/deploy)", pytrace=False)
    return subprocess.run([node, str(CRD_VALIDATOR), *map(str, files)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


# ---------------------------------------------------------------------------------------------
# 1. every document validates


def test_every_core_object_validates_against_the_kubernetes_1_30_schemas():
    problems, kinds = [], set()
    for m in manifests():
        if m.doc["apiVersion"] in (*CRD_API_VERSIONS, KUSTOMIZATION_API_VERSION):
            continue  # the KEDA and Prometheus-operator models and the kustomization tests below
        kinds.add(m.kind)
        problems += [f"{m.where()}: {p}" for p in kubernetes_problems(m.doc)]
    assert not problems, "\n".join(problems)
    assert {"Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Service"} <= kinds, kinds


def test_the_jobs_keda_creates_validate_as_kubernetes_1_30_jobs():
    """A ScaledJob's jobTargetRef becomes a batch/v1 Job: the pod template inside is checked
    against the same strict schemas as the Deployments."""
    scaled_jobs = objects("ScaledJob")
    assert scaled_jobs, "no ScaledJob under deploy/k8s"
    problems = []
    for m in scaled_jobs:
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": m.name, "namespace": m.namespace},
               "spec": m.doc["spec"]["jobTargetRef"]}
        problems += [f"{m.where()}: spec.jobTargetRef.{p}" for p in kubernetes_problems(job)]
    assert not problems, "\n".join(problems)


def test_every_keda_and_prometheus_operator_object_validates_against_their_models():
    custom = [m for m in manifests() if m.doc["apiVersion"] in CRD_API_VERSIONS]
    assert {m.kind for m in custom} == {"ScaledJob", "ScaledObject", "TriggerAuthentication", "PodMonitor"}, \
        [m.where() for m in custom]
    result = run_crd_validator(*manifest_files())
    assert result.returncode == 0, f"validate-crds.mjs exited {result.returncode}\n{result.stderr}{result.stdout}"
    assert f"validated {len(custom)} custom objects in {len(manifest_files())} files" in result.stdout, result.stdout
    for m in custom:
        assert f"ok {m.path.relative_to(ROOT)} {m.kind}/{m.name}" in result.stdout.replace(f"{ROOT}/", ""), \
            f"{m.where()} was not reported valid:\n{result.stdout}"


def _scaled_job_doc() -> dict:
    (scaled_job,) = [m for m in objects("ScaledJob") if m.path.name == "worker-scaledjob-a100.yaml"]
    return copy.deepcopy(scaled_job.doc)


def _misspell_polling_interval(doc):
    doc["spec"]["pollingIntervall"] = doc["spec"].pop("pollingInterval")


def _max_replicas_as_a_string(doc):
    doc["spec"]["maxReplicaCount"] = "8"


def _misspell_a_container_field(doc):
    container = doc["spec"]["jobTargetRef"]["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")


def _trigger_without_type(doc):
    del doc["spec"]["triggers"][0]["type"]


@pytest.mark.parametrize("break_it, field", [
    (_misspell_polling_interval, "pollingIntervall"),
    (_max_replicas_as_a_string, "maxReplicaCount"),
    (_misspell_a_container_field, "volumeMount"),
    (_trigger_without_type, "type"),
], ids=["misspelled-field", "wrong-type", "misspelled-pod-field", "missing-required-field"])
def test_a_broken_copy_of_the_scaledjob_fails_keda_validation_naming_the_field(tmp_path, break_it, field):
    doc = _scaled_job_doc()
    break_it(doc)
    broken = tmp_path / "worker-scaledjob-a100.yaml"
    broken.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = run_crd_validator(broken)
    assert result.returncode == 1, f"a broken ScaledJob passed ({field}):\n{result.stdout}{result.stderr}"
    complaint = [line for line in result.stderr.splitlines() if line.startswith(f"{broken}: ScaledJob/lathe-worker-a100:")]
    assert complaint and any(field in line for line in complaint), \
        f"the error does not name the file, the object and {field!r}:\n{result.stderr}"


@pytest.mark.parametrize("break_it, field", [
    (lambda spec: spec["template"]["spec"].update(terminationGracePeriodSecond=30), "terminationGracePeriodSecond"),
    (lambda spec: spec.update(replicas="2"), "replicas"),
], ids=["misspelled-field", "wrong-type"])
def test_a_broken_copy_of_the_controller_deployment_fails_kubernetes_validation_naming_the_field(break_it, field):
    doc = copy.deepcopy(controller_template().owner.doc)
    break_it(doc["spec"])
    problems = kubernetes_problems(doc)
    assert problems and field in problems[0], f"a broken Deployment ({field}) gave {problems}"


def test_the_kustomization_lists_every_manifest_meant_to_be_applied():
    (kustomization,) = [m for m in manifests() if m.doc["apiVersion"] == KUSTOMIZATION_API_VERSION]
    listed = kustomization.doc["resources"]
    missing = [r for r in listed if not (K8S / r).is_file()]
    assert not missing, f"kustomization.yaml lists files that do not exist: {missing}"
    top_level = {p.name for p in manifest_files() if p.parent == K8S} - {"kustomization.yaml"}
    forgotten = top_level - set(listed) - NOT_APPLIED_BY_KUSTOMIZE
    assert not forgotten, f"manifests `kubectl apply -k deploy/k8s` would not apply: {sorted(forgotten)}"
    assert not set(listed) & NOT_APPLIED_BY_KUSTOMIZE, "the Secret template or the scrape config is applied by kustomize"
    (image,) = kustomization.doc["images"]
    assert image["name"] == LATHE_IMAGE and image.get("newName"), image


def test_kubectl_kustomize_renders_the_manifests_with_the_built_image():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` (offline) renders what `apply -k` sends")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    (kustomization,) = [m for m in manifests() if m.doc["apiVersion"] == KUSTOMIZATION_API_VERSION]
    listed = set(kustomization.doc["resources"])
    expected = {(m.kind, m.name) for m in manifests() if m.path.relative_to(K8S).as_posix() in listed}
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == expected
    (image,) = kustomization.doc["images"]
    built = f"{image['newName']}:{image['newTag']}"
    text = json.dumps(rendered)
    assert f'"image": "{LATHE_IMAGE}"' not in text, "a Lathe container kept the bare image name after kustomize"
    assert text.count(f'"image": "{built}"') == 2, "the controller and the ScaledJob's worker should run the built image"


def test_grafana_provisioning_renders_as_configmaps_the_sidecar_loads():
    """deploy/grafana/kustomization.yaml: every dashboard file, byte for byte, in a ConfigMap
    labelled for Grafana's sidecar, and a datasource file Grafana can provision from."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` (offline) renders what `apply -k` sends")
    grafana = ROOT / "deploy" / "grafana"
    result = subprocess.run([kubectl, "kustomize", str(grafana)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = {d["metadata"]["name"]: d for d in yaml.safe_load_all(result.stdout) if d}
    for doc in rendered.values():
        assert doc["kind"] == "ConfigMap", doc["kind"]
        assert not kubernetes_problems(doc), kubernetes_problems(doc)
    dashboards = [d for d in rendered.values() if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(dashboards) == 1, sorted(rendered)
    files = {p.name: p.read_text() for p in (grafana / "dashboards").glob("*.json")}
    assert files and dashboards[0]["data"] == files, "the dashboards ConfigMap differs from deploy/grafana/dashboards"
    datasources = [d for d in rendered.values() if d["metadata"].get("labels", {}).get("grafana_datasource") == "1"]
    assert len(datasources) == 1, sorted(rendered)
    (text,) = datasources[0]["data"].values()
    provisioning = yaml.safe_load(text)
    assert provisioning["apiVersion"] == 1
    (postgres,) = [d for d in provisioning["datasources"] if d["type"] == "grafana-postgresql-datasource"]
    assert postgres["user"] != "postgres", "Grafana reads Lathe's database as the superuser"
    assert postgres["secureJsonData"]["password"].startswith("$"), "a password in a ConfigMap"


# ---------------------------------------------------------------------------------------------
# 2. the pieces agree


def test_workers_dial_the_grpc_port_of_the_controller_service():
    service = controller_service()
    grpc = service_port(service, "grpc")
    controller = controller_template().lathe_container()
    (container_port,) = [p for p in controller["ports"] if p["name"] == grpc["targetPort"]]
    assert container_port["containerPort"] == listen_port(flag(controller, "--grpc-listen")), \
        "the Service's grpc targetPort is not where the controller listens (--grpc-listen)"
    for worker in worker_templates():
        address = env_of(worker.lathe_container()).get("LATHE_CONTROLLER", {}).get("value")
        assert address, f"{worker.owner.where()}: no LATHE_CONTROLLER"
        assert "--controller" not in command_of(worker.lathe_container()), "both --controller and LATHE_CONTROLLER"
        url = urlsplit(address)
        assert worker.owner.namespace == service.namespace, f"{worker.owner.where()} is not in the controller's namespace"
        assert (url.scheme, url.hostname, url.port) == ("http", service.name, grpc["port"]), \
            f"{worker.owner.where()}: LATHE_CONTROLLER={address}, the Service answers gRPC at " \
            f"http://{service.name}:{grpc['port']}"


def test_workers_enrol_with_the_secret_the_controller_takes_as_its_fleet_secret():
    fleet = secret_ref(controller_template(), "LATHE_FLEET_SECRET")
    for worker in worker_templates():
        container = worker.lathe_container()
        assert secret_ref(worker, "LATHE_WORKER_TOKEN") == fleet, \
            f"{worker.owner.where()}: LATHE_WORKER_TOKEN is not the controller's LATHE_FLEET_SECRET"
        pod_name = env_of(container).get("LATHE_POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {})
        assert pod_name.get("fieldPath") == "metadata.name", \
            f"{worker.owner.where()}: LATHE_POD_NAME must come from the downward API (metadata.name)"


def test_every_secret_configmap_and_volume_claim_referenced_exists_with_its_keys():
    def keys_of(kind: str, name: str, namespace: str) -> set[str]:
        target = the(kind, name, namespace).doc
        return set(target.get("data") or {}) | set(target.get("stringData") or {})

    problems, checked = [], 0
    for pod in pod_templates():
        ns, where = pod.owner.namespace, pod.owner.where()
        for container in pod.spec["containers"]:
            for entry in container.get("env", []):
                for kind, ref_key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    ref = entry.get("valueFrom", {}).get(ref_key)
                    if ref:
                        checked += 1
                        if ref["key"] not in keys_of(kind, ref["name"], ns):
                            problems.append(f"{where}: {entry['name']} reads {kind} {ref['name']} "
                                            f"key {ref['key']!r}, which it lacks")
            for source in container.get("envFrom", []):
                for kind, ref_key in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                    if ref_key in source:
                        checked += 1
                        the(kind, source[ref_key]["name"], ns)
        for volume in pod.spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                checked += 1
                the("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], ns)
    for auth in objects("TriggerAuthentication"):
        for ref in auth.doc["spec"]["secretTargetRef"]:
            checked += 1
            if ref["key"] not in keys_of("Secret", ref["name"], auth.namespace):
                problems.append(f"{auth.where()}: parameter {ref['parameter']} reads Secret {ref['name']} "
                                f"key {ref['key']!r}, which it lacks")
    assert not problems, "\n".join(problems)
    assert checked >= 10, f"only {checked} references found: the walk missed them"


def test_the_secret_template_holds_placeholders_never_secrets():
    for secret in objects("Secret"):
        assert secret.path.name.endswith(".example.yaml"), f"{secret.where()}: a Secret that is not a template"
        assert not secret.doc.get("data"), \
            f"{secret.where()}: base64 `data` hides what is in it; use stringData placeholders"
        for key, value in secret.doc["stringData"].items():
            assert "CHANGE-ME" in value, f"{secret.where()}: {key} is not an obvious placeholder"


def test_keda_reads_the_demand_of_its_pool_from_the_controller_service_as_admin():
    service = controller_service()
    http = service_port(service, "http")
    admin = secret_ref(controller_template(), "LATHE_ADMIN_TOKEN")
    workers_by_owner = {(w.owner.kind, w.owner.name, w.owner.namespace): w for w in worker_templates()}
    scalers = objects("ScaledJob") + objects("ScaledObject")
    for scaler in scalers:
        trigger, meta = keda_trigger(scaler), keda_trigger(scaler)["metadata"]
        url = urlsplit(meta["url"])
        # KEDA's operator runs in its own namespace: the short Service name would not resolve there.
        in_cluster = f"{service.name}.{service.namespace}.svc"
        assert url.hostname in (in_cluster, f"{in_cluster}.cluster.local"), \
            f"{scaler.where()}: trigger host {url.hostname!r} is not the controller Service by its namespaced DNS name"
        assert url.scheme == "http" and url.port == http["port"], \
            f"{scaler.where()}: {meta['url']} is not the Service's http port {http['port']}"
        assert url.path == DEMAND_PATH, f"{scaler.where()}: {meta['url']}"
        assert meta["valueLocation"] == "data.0.demand" and meta.get("format", "json") == "json", meta
        assert gjson_number(DOCUMENTED_DEMAND_ANSWER, meta["valueLocation"]) == 4
        assert meta["targetValue"] == "1", f"{scaler.where()}: one worker per unit of demand wants targetValue \"1\""
        assert meta["authMode"] == "bearer", meta
        auth = the(trigger["authenticationRef"].get("kind", "TriggerAuthentication"), trigger["authenticationRef"]["name"],
                   scaler.namespace)
        (token,) = [r for r in auth.doc["spec"]["secretTargetRef"] if r["parameter"] == "token"]
        assert (token["name"], token["key"]) == admin, \
            f"{auth.where()} sends another secret than the controller's LATHE_ADMIN_TOKEN"

        # The pool asked for is the one pool its workers serve.
        if scaler.kind == "ScaledJob":
            worker = workers_by_owner[("ScaledJob", scaler.name, scaler.namespace)]
        else:
            target = scaler.doc["spec"]["scaleTargetRef"]
            assert target.get("kind", "Deployment") == "Deployment"
            worker = workers_by_owner[("Deployment", target["name"], scaler.namespace)]
        pools = parse_qs(url.query)["pool"]
        assert [flag(worker.lathe_container(), "--pools")] == pools, \
            f"{scaler.where()} scales on pool {pools} but its workers serve {flag(worker.lathe_container(), '--pools')}"
        assert worker.labels.get("lathe-pool") == pools[0], f"{worker.owner.where()}: label lathe-pool"
    assert scalers


def test_each_worker_has_one_gpu_the_shared_volume_and_time_to_checkpoint():
    (claim,) = objects("PersistentVolumeClaim")
    assert claim.doc["spec"]["accessModes"] == ["ReadWriteMany"], "workers on many nodes share the volume: ReadWriteMany"

    controller = controller_template()
    assert flag(controller.lathe_container(), "--data-dir") == "/data"
    for pod in [controller, *worker_templates()]:
        where, container = pod.owner.where(), pod.lathe_container()
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        assert "/data" in mounts, f"{where}: /data is not mounted"
        assert volumes[mounts["/data"]].get("persistentVolumeClaim", {}).get("claimName") == claim.name, \
            f"{where}: /data is not the shared claim {claim.name}"

    for worker in worker_templates():
        where, container = worker.owner.where(), worker.lathe_container()
        limits, requests = container["resources"]["limits"], container["resources"].get("requests", {})
        assert str(limits.get("nvidia.com/gpu")) == "1", f"{where}: one GPU per worker (limits nvidia.com/gpu: 1)"
        assert str(requests.get("nvidia.com/gpu", "1")) == "1", f"{where}: GPU request differs from the limit"
        assert worker.spec["terminationGracePeriodSeconds"] >= MIN_WORKER_GRACE_SECONDS, \
            f"{where}: terminationGracePeriodSeconds too short for a full fine-tune's checkpoint"
        assert flag(container, "--device") == "cuda", f"{where}: a GPU worker must not fall back to the CPU"
        assert flag(container, "--models-root").startswith("/data/"), f"{where}: models outside the shared volume"
        (metrics_port,) = [p for p in container["ports"] if p["name"] == "metrics"]
        assert metrics_port["containerPort"] == listen_port(flag(container, "--metrics-listen"))
        args = command_of(container)
        if worker.owner.kind == "ScaledJob":
            # KEDA never stops a Job's worker: it must leave by itself once idle.
            assert worker.spec["restartPolicy"] == "Never", where
            assert flag(container, "--exit-when-idle"), \
                f"{where}: without --exit-when-idle a worker never gives its GPU back"
        else:
            # A Deployment restarts a container that exits: leaving when idle would be a restart loop.
            assert "--exit-when-idle" not in args and "--max-jobs" not in args, where


def _source_mentions(pattern: str) -> bool:
    regex = re.compile(pattern)
    return any(regex.search(path.read_text(errors="replace")) for path in RUST_SOURCES.rglob("*.rs"))


def test_every_lathe_setting_the_manifests_pass_is_one_lathe_reads():
    """Env names and flags of the controller and worker containers, and the ConfigMap keys they
    load, must exist in the Rust sources (clap's `env = "LATHE_…"`, a `std::env::var`, or the
    flag's field): a typo would otherwise be ignored in silence."""
    env_names, flags = set(), set()
    for pod in [controller_template(), *worker_templates()]:
        container = pod.lathe_container()
        env_names |= set(env_of(container)) - expansion_helpers(container)
        flags |= {a for a in command_of(container) if a.startswith("--")}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env_names |= set(the("ConfigMap", source["configMapRef"]["name"], pod.owner.namespace).doc["data"])
    assert {"LATHE_CONTROLLER", "LATHE_WORKER_TOKEN", "LATHE_POD_NAME", "LATHE_ADMIN_TOKEN", "LATHE_FLEET_SECRET",
            "LATHE_DATABASE_URL", "LATHE_REDIS_URL"} <= env_names, sorted(env_names)
    unknown_env = sorted(n for n in env_names if not _source_mentions(rf'"{re.escape(n)}"'))
    unknown_flags = sorted(f for f in flags if not _source_mentions(rf"\b{re.escape(f[2:].replace('-', '_'))}\s*:"))
    assert not unknown_env and not unknown_flags, \
        f"settings no lathe binary reads (not in services/**/*.rs): env {unknown_env}, flags {unknown_flags}"


# -- Pod Security (restricted) and NetworkPolicies -------------------------------------------

# Volume types the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
# Where each image's process writes, outside the volumes every pod already mounts: these must be
# writable volumes, since the root filesystem is read-only. Lathe: std::env::temp_dir() (the
# inference worker links adapters there); Redis: its working directory.
WRITABLE_PATHS = {LATHE_IMAGE: ["/tmp"], "redis": ["/data"]}


def _all_containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"], *spec.get("ephemeralContainers", [])]


def restricted_pss_problems(pod: PodTemplate) -> list[str]:
    """What keeps a pod from the "restricted" Pod Security Standard (baseline included), plus a
    read-only root filesystem with writable volumes where the process writes."""
    spec, problems = pod.spec, []
    pod_sc = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"{field}: true")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for volume in volumes.values():
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']}: type {sorted(kinds - RESTRICTED_VOLUME_TYPES)} is not allowed")
    if pod_sc.get("runAsUser") == 0:
        problems.append("securityContext.runAsUser: 0")
    for container in _all_containers(spec):
        name, sc = container["name"], container.get("securityContext", {})
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
            problems.append(f"{name}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser") == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile.type is {seccomp!r}, not RuntimeDefault (pod or container)")
        capabilities = sc.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: capabilities.drop must contain ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities.add {capabilities['add']}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem must be true")
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        image = container.get("image", "").split(":")[0]
        for path in WRITABLE_PATHS.get(image, []):
            mount = mounts.get(path)
            volume = volumes.get(mount["name"], {}) if mount else {}
            if not mount or mount.get("readOnly") or not ({"emptyDir", "ephemeral", "persistentVolumeClaim"} & set(volume)):
                problems.append(f"{name}: {path} is not a writable volume (the root filesystem is read-only)")
    return problems


def test_every_pod_passes_the_restricted_pod_security_standard():
    pods = pod_templates()
    assert {p.component for p in pods} >= {"controller", "worker", "redis"}, [p.owner.where() for p in pods]
    problems = [f"{pod.owner.where()}: {problem}" for pod in pods for problem in restricted_pss_problems(pod)]
    assert not problems, "\n".join(problems)
    for image in WRITABLE_PATHS:
        assert any(c.get("image", "").split(":")[0] == image for p in pods for c in p.spec["containers"]), image


def test_a_pod_that_drops_a_restricted_field_is_caught():
    """The check above, against copies of the controller that each lose one setting."""
    def breaks(change) -> list[str]:
        pod = controller_template()
        template = copy.deepcopy(pod.template)
        change(template["spec"], template["spec"]["containers"][0])
        return restricted_pss_problems(PodTemplate(pod.owner, template))

    assert breaks(lambda spec, c: None) == []
    assert breaks(lambda spec, c: spec["securityContext"].pop("seccompProfile"))
    assert breaks(lambda spec, c: c["securityContext"].pop("readOnlyRootFilesystem"))
    assert breaks(lambda spec, c: c["securityContext"].update(allowPrivilegeEscalation=True))
    assert breaks(lambda spec, c: c["securityContext"]["capabilities"].update(drop=["NET_RAW"]))
    assert breaks(lambda spec, c: spec["securityContext"].pop("runAsNonRoot"))
    assert breaks(lambda spec, c: c.update(volumeMounts=[m for m in c["volumeMounts"] if m["mountPath"] != "/tmp"]))
    assert breaks(lambda spec, c: spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}}))


def test_env_references_name_an_earlier_entry():
    """Kubernetes expands `$(NAME)` in an env value only from entries above it; otherwise the
    process gets the literal text (a Redis URL with `$(REDIS_PASSWORD)` as its password)."""
    problems = []
    for pod in pod_templates():
        for container in pod.spec["containers"]:
            defined: set[str] = set()
            for entry in container.get("env", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(entry.get("value", ""))):
                    if ref not in defined:
                        problems.append(f"{pod.owner.where()}: {container['name']}: {entry['name']} uses $({ref}) "
                                        "before (or without) an entry of that name")
                defined.add(entry["name"])
            for arg in command_of(container):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                    if ref not in defined:
                        problems.append(f"{pod.owner.where()}: {container['name']}: argument uses $({ref}), not in env")
    assert not problems, "\n".join(problems)


def test_redis_asks_for_the_password_the_controller_and_workers_send():
    (redis,) = [t for t in pod_templates() if t.component == "redis"]
    (container,) = redis.spec["containers"]
    args = command_of(container)
    assert "--requirepass" in args, f"{redis.owner.where()}: Redis without --requirepass"
    password_ref = re.fullmatch(r"\$\((\w+)\)", args[args.index("--requirepass") + 1])
    assert password_ref, f"{redis.owner.where()}: --requirepass is not read from the environment"
    password = env_of(container)[password_ref.group(1)]["valueFrom"]["secretKeyRef"]
    redis_service = [m for m in objects("Service") if m.doc["spec"].get("selector", {}).items() <= redis.labels.items()]
    assert len(redis_service) == 1, redis_service
    port = service_port(redis_service[0], "redis")["port"]
    for pod in [controller_template(), *worker_templates()]:
        container = pod.lathe_container()
        url = env_of(container)["LATHE_REDIS_URL"]["value"]
        parts = urlsplit(url)
        assert (parts.hostname, parts.port) == (redis_service[0].name, port), f"{pod.owner.where()}: {url}"
        ref = re.fullmatch(r"\$\((\w+)\)", parts.password or "")
        assert ref, f"{pod.owner.where()}: LATHE_REDIS_URL {url} carries no password from the environment"
        assert env_of(container)[ref.group(1)]["valueFrom"]["secretKeyRef"] == password, \
            f"{pod.owner.where()}: the Redis URL's password is another secret than Redis's requirepass"


# A small NetworkPolicy evaluator: enough of the API for the policies here (pod and namespace
# selectors by matchLabels, ports by name or number), applied as the network plugin would.

@dataclass(frozen=True)
class Endpoint:
    """Something that sends or receives: a pod of the manifests, or a pod of another namespace,
    or an address outside the cluster (namespace None)."""
    name: str
    namespace: str | None
    labels: tuple = ()
    ports: tuple = ()  # (name, number)

    def port_number(self, port) -> int | None:
        if isinstance(port, int):
            return port
        return dict(self.ports).get(port)


def pod_endpoint(pod: PodTemplate) -> Endpoint:
    ports = tuple((p["name"], p["containerPort"]) for c in pod.spec["containers"] for p in c.get("ports", []) if "name" in p)
    return Endpoint(pod.owner.where(), pod.owner.namespace, tuple(sorted(pod.labels.items())), ports)


def _matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector {selector} is not simulated here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_matches(peer: dict, other: Endpoint, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return other.namespace is None  # the policies here use ipBlock only for outside addresses
    if other.namespace is None:
        return False
    namespace_labels = {"kubernetes.io/metadata.name": other.namespace}
    if "namespaceSelector" in peer:
        if not _matches(peer["namespaceSelector"], namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return _matches(peer.get("podSelector", {}), dict(other.labels))


def _port_matches(rule_ports: list | None, target: Endpoint, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    return any(p.get("protocol", "TCP") == protocol and ("port" not in p or target.port_number(p["port"]) == port)
               for p in rule_ports)


def _policies(pod: Endpoint, direction: str) -> list[dict]:
    found = []
    for m in objects("NetworkPolicy"):
        spec = m.doc["spec"]
        if m.namespace == pod.namespace and _matches(spec["podSelector"], dict(pod.labels)) \
                and direction in spec.get("policyTypes", ["Ingress"]):
            found.append(m.doc)
    return found


def _direction_allows(pod: Endpoint, other: Endpoint, direction: str, target: Endpoint, port: int, protocol: str) -> bool:
    if pod.namespace is None or pod.namespace != "lathe":
        return True  # not governed by these manifests
    policies = _policies(pod, direction)
    if not policies:
        return True
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in policies:
        for rule in policy["spec"].get(rules_key, []):
            peers = rule.get(peers_key)
            if (not peers or any(_peer_matches(peer, other, policy["metadata"]["namespace"]) for peer in peers)) \
                    and _port_matches(rule.get("ports"), target, port, protocol):
                return True
    return False


def reaches(source: Endpoint, target: Endpoint, port, protocol: str = "TCP") -> bool:
    number = target.port_number(port)
    assert number is not None, f"{target.name} has no port {port!r}"
    return (_direction_allows(source, target, "Egress", target, number, protocol)
            and _direction_allows(target, source, "Ingress", target, number, protocol))


def test_network_policies_let_each_component_reach_only_what_it_needs():
    policies = objects("NetworkPolicy")
    namespace = controller_template().owner.namespace
    default_deny = [m for m in policies if m.namespace == namespace and m.doc["spec"]["podSelector"] == {}
                    and "Ingress" in m.doc["spec"].get("policyTypes", []) and not m.doc["spec"].get("ingress")]
    assert default_deny, f"no default-deny ingress NetworkPolicy in namespace {namespace}"
    (redis_pod,) = [t for t in pod_templates() if t.component == "redis"]
    controller, redis = pod_endpoint(controller_template()), pod_endpoint(redis_pod)
    workers = [pod_endpoint(w) for w in worker_templates()]
    for who in [controller, redis, *workers]:
        own = [m.name for m in policies if m.doc["spec"]["podSelector"] != {}
               and _matches(m.doc["spec"]["podSelector"], dict(who.labels))]
        assert own, f"no NetworkPolicy selects {who.name} by its labels"

    stranger = Endpoint("an unlabelled pod in the namespace", namespace, (("app", "debug"),))
    elsewhere = Endpoint("a pod of namespace default", "default", (("app", "web"),))
    prometheus = Endpoint("Prometheus", "monitoring", (("app.kubernetes.io/name", "prometheus"),))
    postgres = Endpoint("Postgres outside the cluster", None, ports=(("postgres", 5432),))
    dns = Endpoint("the cluster DNS", "kube-system", (("k8s-app", "kube-dns"),), (("dns", 53),))

    for worker in workers:
        assert reaches(worker, controller, "grpc"), f"{worker.name} cannot reach the controller's gRPC"
        assert reaches(worker, redis, "redis"), f"{worker.name} cannot wait on Redis"
        assert reaches(worker, dns, 53, "UDP"), f"{worker.name} cannot resolve names"
        assert not reaches(worker, postgres, "postgres"), f"{worker.name} can reach Postgres"
        assert not reaches(worker, controller, "http"), f"{worker.name} can reach the REST API it never uses"
        assert reaches(prometheus, worker, "metrics"), f"Prometheus cannot scrape {worker.name}"
        assert not reaches(elsewhere, worker, "metrics"), f"any namespace can scrape {worker.name}"
    assert reaches(controller, redis, "redis"), "the controller cannot reach Redis"
    assert reaches(controller, postgres, "postgres"), "the controller cannot reach Postgres"
    for outsider in (stranger, elsewhere, prometheus):
        assert not reaches(outsider, redis, "redis"), f"{outsider.name} can reach Redis"
        assert not reaches(outsider, controller, "grpc"), f"{outsider.name} can reach the workers' gRPC port"
        assert reaches(outsider, controller, "http"), f"{outsider.name} cannot reach the REST port"
    assert not reaches(redis, postgres, "postgres"), "Redis may call out"


# -- Prometheus: discovery simulated on the pod templates ---------------------------------------


def _meta_name(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _discovered_targets(pod: PodTemplate, phase: str, pod_ip: str) -> list[dict]:
    """The targets Prometheus' `role: pod` discovery makes for one pod: one per declared
    container port, with the pod's labels and annotations as __meta_* labels."""
    meta = {"__meta_kubernetes_namespace": pod.owner.namespace, "__meta_kubernetes_pod_phase": phase,
            "__meta_kubernetes_pod_name": f"{pod.owner.name}-abcde", "__meta_kubernetes_pod_node_name": "node-1",
            "__meta_kubernetes_pod_ip": pod_ip}
    for key, value in pod.labels.items():
        meta[f"__meta_kubernetes_pod_label_{_meta_name(key)}"] = value
        meta[f"__meta_kubernetes_pod_labelpresent_{_meta_name(key)}"] = "true"
    for key, value in pod.template.get("metadata", {}).get("annotations", {}).items():
        meta[f"__meta_kubernetes_pod_annotation_{_meta_name(key)}"] = str(value)
    targets = []
    for container in pod.spec["containers"]:
        for port in container.get("ports", []) or [None]:
            target = dict(meta, __meta_kubernetes_pod_container_name=container["name"])
            if port is None:
                target["__address__"] = pod_ip
            else:
                target.update(__address__=f"{pod_ip}:{port['containerPort']}",
                              __meta_kubernetes_pod_container_port_name=port.get("name", ""),
                              __meta_kubernetes_pod_container_port_number=str(port["containerPort"]))
            targets.append(target)
    return targets


def _selected(sd: dict, pod: PodTemplate) -> bool:
    namespaces = sd.get("namespaces", {}).get("names")
    if namespaces and pod.owner.namespace not in namespaces:
        return False
    for selector in sd.get("selectors", []):
        if selector.get("role") != "pod":
            continue
        assert "field" not in selector, "field selectors are not simulated here"
        for requirement in selector.get("label", "").split(","):
            key, sep, value = requirement.partition("=")
            assert sep and not key.endswith("!"), f"label selector {requirement!r} is not simulated here"
            if pod.labels.get(key) != value:
                return False
    return True


def _relabel(labels: dict, rules: list[dict]) -> dict | None:
    for rule in rules:
        action = rule.get("action", "replace")
        value = rule.get("separator", ";").join(labels.get(n, "") for n in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if action == "keep" and not match or action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(replacement)
        elif action not in ("keep", "drop", "replace"):
            pytest.fail(f"relabel action {action!r} is not simulated here", pytrace=False)
    return labels


def _scrape_jobs() -> dict[str, dict]:
    (config_map,) = [m for m in objects("ConfigMap") if m.path.name == "prometheus-scrape.yaml"]
    (text,) = config_map.doc["data"].values()
    return {job["job_name"]: job for job in yaml.safe_load(text)["scrape_configs"]}


def _scraped(job: dict, pods: list[PodTemplate], phase: str = "Running") -> list[tuple[str, str]]:
    """(owner, address) of every target the job keeps among these pods."""
    assert "static_configs" not in job, f"{job['job_name']}: fixed addresses miss the pods KEDA starts"
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod", job["job_name"]
    kept = []
    for i, pod in enumerate(pods):
        if not _selected(sd, pod):
            continue
        for target in _discovered_targets(pod, phase, f"10.0.0.{i + 1}"):
            labels = _relabel(target, job.get("relabel_configs", []))
            if labels is not None:
                kept.append((pod.owner.where(), labels["__address__"]))
    return kept


def test_prometheus_discovers_every_worker_pod_and_each_controller_replica():
    jobs = _scrape_jobs()
    workers, controller = worker_templates(), controller_template()
    others = [t for t in pod_templates() if t.component not in ("worker", "controller")]
    everyone = [*workers, controller, *others]

    worker_targets = _scraped(jobs["lathe-worker"], everyone)
    assert sorted(owner for owner, _ in worker_targets) == sorted(w.owner.where() for w in workers), \
        f"the worker job should keep exactly one target per worker pod: {worker_targets}"
    for worker in workers:
        port = listen_port(flag(worker.lathe_container(), "--metrics-listen"))
        assert [a for o, a in worker_targets if o == worker.owner.where()][0].endswith(f":{port}"), worker_targets
    assert _scraped(jobs["lathe-worker"], workers, phase="Succeeded") == [], "finished worker pods are still scraped"

    controller_targets = _scraped(jobs["lathe-controller"], everyone)
    http_port = listen_port(flag(controller.lathe_container(), "--http-listen"))
    assert [a.rsplit(":", 1)[1] for _, a in controller_targets] == [str(http_port)], \
        f"the controller job should keep each replica's http port: {controller_targets}"
    for job in jobs.values():
        assert job.get("metrics_path", "/metrics") == "/metrics"


def test_the_pod_monitors_scrape_the_pods_and_ports_the_scrape_jobs_do():
    """podmonitor.yaml (for the Prometheus operator) against prometheus-scrape.yaml: the same
    pods, the same named ports, and the same job names, which the alerting rules select on."""
    monitors = {m.name: m for m in objects("PodMonitor")}
    jobs = _scrape_jobs()
    expected = {"lathe-controller": [controller_template()], "lathe-worker": worker_templates()}
    assert set(monitors) == set(expected) == set(jobs), (sorted(monitors), sorted(jobs))
    everyone = pod_templates()
    for name, wanted in expected.items():
        monitor = monitors[name]
        assert monitor.namespace == controller_template().owner.namespace, monitor.where()
        selected = [t for t in everyone if t.owner.namespace == monitor.namespace
                    and monitor.doc["spec"]["selector"]["matchLabels"].items() <= t.labels.items()]
        assert [t.owner.where() for t in selected] == [t.owner.where() for t in wanted], monitor.where()
        (endpoint,) = monitor.doc["spec"]["podMetricsEndpoints"]
        assert endpoint.get("path", "/metrics") == "/metrics"
        kept_ports = {a.rsplit(":", 1)[1] for _, a in _scraped(jobs[name], wanted)}
        for pod in wanted:
            (port,) = [p for p in pod.lathe_container()["ports"] if p["name"] == endpoint["port"]]
            assert {str(port["containerPort"])} == kept_ports, f"{monitor.where()} scrapes port {endpoint['port']}"
        job = [r for r in endpoint.get("relabelings", []) if r.get("targetLabel") == "job"]
        assert [r.get("replacement") for r in job] == [name], \
            f"{monitor.where()}: the job label must be {name!r}, as the alerting rules expect"
        assert "release" in monitor.doc["metadata"].get("labels", {}), \
            f"{monitor.where()}: kube-prometheus-stack selects PodMonitors by the release label"


# ---------------------------------------------------------------------------------------------
# 3. the number KEDA reads, from a real controller


def _pool_demand_gauge(service: Service, pool: str) -> float:
    """lathe_pool_demand{pool=…} from /metrics; a pool with nothing may have no sample (0)."""
    resp = service.request("GET", "/metrics")
    assert resp.status == 200, f"GET /metrics answered {resp.status}"
    pattern = re.compile(rf'^lathe_pool_demand\{{(?:[^}}]*,)?pool="{re.escape(pool)}"(?:,[^}}]*)?\}} (\S+)$', re.M)
    samples = pattern.findall(resp.body.decode())
    assert len(samples) <= 1, samples
    return float(samples[0]) if samples else 0.0


@pytest.mark.service
def test_the_demand_metric_keda_reads_rises_and_falls_with_queued_jobs(tmp_path_factory):
    (scaled_job,) = [m for m in objects("ScaledJob") if m.path.name == "worker-scaledjob-a100.yaml"]
    trigger = keda_trigger(scaled_job)["metadata"]
    url = urlsplit(trigger["url"])
    path_and_query = f"{url.path}?{url.query}"
    (pool,) = parse_qs(url.query)["pool"]

    lathe_bin = find_lathe_bin()
    require_postgres_and_redis()
    service = Service(lathe_bin, tmp_path_factory.mktemp("keda-demand"))
    admin_token = service.admin_token  # every controller of the harness has --admin-token
    try:
        service.init_model()
        # No worker at all: queued jobs stay queued, as while KEDA has not started one yet.
        service.start_controller()

        def read_as_keda() -> dict:
            resp = service.request("GET", path_and_query, headers={"Authorization": f"Bearer {admin_token}"})
            assert resp.status == 200, f"GET {path_and_query} answered {resp.status}: {resp.body[:300]!r}"
            return resp.json()

        def demand() -> float:
            return gjson_number(read_as_keda(), trigger["valueLocation"])

        api_key = service.create_key("keda")
        for refused in ({}, {"Authorization": "Bearer not-the-admin-token"}, {"Authorization": f"Bearer {api_key}"}):
            status = service.request("GET", path_and_query, headers=refused).status
            assert status in (401, 403), f"the demand endpoint answered {status} to {refused or 'no token'}"

        answer = read_as_keda()
        assert [entry["pool"] for entry in answer["data"]] == [pool], f"?pool={pool} should list that pool alone: {answer}"
        assert demand() == 0 and _pool_demand_gauge(service, pool) == 0, answer

        client = make_client(service, api_key)
        train = write_jsonl(tmp_path_factory.mktemp("keda-data") / "train.jsonl", example_rows(24))
        with open(train, "rb") as f:
            training_file = client.files.create(file=f, purpose="fine-tune").id
        jobs = [create_job(client, training_file, pool=pool, suffix=f"keda-{i}") for i in range(2)]
        wait_until(lambda: demand() == 2, 20, lambda: f"demand stayed {read_as_keda()} after queuing 2 jobs in {pool}")
        entry = read_as_keda()["data"][0]
        assert (entry["queued_jobs"], entry["running_jobs"], entry["workers"]) == (2, 0, 0), entry
        wait_until(lambda: _pool_demand_gauge(service, pool) == 2, 20,
                   lambda: f"lathe_pool_demand{{pool=\"{pool}\"}} is {_pool_demand_gauge(service, pool)}, not 2")

        for job in jobs:
            client.fine_tuning.jobs.cancel(job.id)
        for job in jobs:
            wait_for_status(client, job.id, "cancelled", timeout=30)
        wait_until(lambda: demand() == 0, 20, lambda: f"demand stayed {read_as_keda()} after cancelling the jobs")
        wait_until(lambda: _pool_demand_gauge(service, pool) == 0, 20,
                   lambda: f"lathe_pool_demand{{pool=\"{pool}\"}} is {_pool_demand_gauge(service, pool)}, not 0")
    finally:
        service.shutdown()
