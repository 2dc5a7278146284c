"""The deployment files: the static checks of scripts/check_deploy.sh (each skipped only when
its tool is absent), the image entrypoint run under a stub PATH, and the contracts that the
files must keep with each other and with the code (ports, metric names, runbook anchors)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "rules" / "fraudflow.rules.yml"
RULE_TESTS = PROMETHEUS / "rules" / "fraudflow.rules.test.yml"
CHECK_SCRIPT = ROOT / "scripts" / "check_deploy.sh"
EX_USAGE = 64
TRAIN_METRICS_PORT = 9401  # 9400 is the DCGM exporter's

# The metric names the decision service and the trainer expose (the contract).
METRIC_CONTRACT = {
    "fraudflow_decision_latency_seconds",
    "fraudflow_decisions_total",
    "fraudflow_score",
    "fraudflow_errors_total",
    "fraudflow_requests_total",
    "fraudflow_state_store_latency_seconds",
    "fraudflow_audit_commit_seconds",
    "fraudflow_model_info",
    "fraudflow_model_loaded",
    "fraudflow_score_psi",
    "fraudflow_cases_open",
    "fraudflow_cases_oldest_open_age_seconds",
    "fraudflow_cases_overdue",
    "fraudflow_case_verdicts_total",
    "fraudflow_case_time_to_verdict_seconds",
    "fraudflow_shadow_score",
    "fraudflow_shadow_decisions_total",
    "fraudflow_shadow_errors_total",
    "fraudflow_train_samples_per_second",
    "fraudflow_train_loss",
    "fraudflow_train_validation_average_precision",
    "fraudflow_train_epoch",
    "fraudflow_train_last_progress_timestamp_seconds",
    "fraudflow_train_gpu_utilization_ratio",
    "fraudflow_train_gpu_memory_bytes",
}


# --- the static checks (scripts/check_deploy.sh) -----------------------------------------------


def run_check(name: str) -> None:
    """Run one check of scripts/check_deploy.sh; skip if it reports its tool missing (exit 3)."""
    result = subprocess.run(
        ["sh", str(CHECK_SCRIPT), name],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=300,
    )
    output = result.stdout + result.stderr
    if result.returncode == 3:
        missing = [line for line in output.splitlines() if line.startswith("MISSING:")]
        pytest.skip("; ".join(missing) or output)
    assert result.returncode == 0, output


@pytest.mark.parametrize("check", ["hadolint", "shellcheck", "compose", "kustomize", "amtool"])
def test_static_check_passes(check: str) -> None:
    run_check(check)


@pytest.mark.slow  # promtool test rules evaluates a day of series: about 15 seconds
def test_promtool_checks_and_alert_unit_tests_pass() -> None:
    run_check("promtool")


def test_kubernetes_validator_rejects_what_it_should(tmp_path: Path) -> None:
    """validate.py is not vacuous: an unknown field, a bad PyTorchJob and a kind without a
    schema all fail."""
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {portz: []}\n---\n"
        "apiVersion: kubeflow.org/v1\nkind: PyTorchJob\nmetadata: {name: j}\n"
        "spec:\n  nprocPerNode: 4\n  pytorchReplicaSpecs:\n"
        "    Master: {replicas: 1, template: {spec: {containers: [{name: x, image: i}]}}}\n"
        "---\napiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n"
    )
    result = subprocess.run(
        [sys.executable, str(K8S / "validate.py"), "--kubernetes-version", "1.30", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "'portz' was unexpected" in result.stdout
    assert "spec.nprocPerNode: 4 is not of type 'string'" in result.stdout
    assert "pytorch" in result.stdout  # the operator needs a container named `pytorch`
    assert "no schema: Couldn't find schema for kind Widget" in result.stdout


# --- the entrypoint under a stub PATH ------------------------------------------------------------

STUB = """#!/bin/sh
# Stand-in for {name}: prints its name, then each argument on its own line.
printf '%s\\n' {name} "$@"
"""
# `python` stands in for the password hashing (jupyter_server.auth.passwd) and the health probe.
PYTHON_STUB = """#!/bin/sh
case "$2" in
  *passwd*) printf 'argon2:stub-hash-of-%s\\n' "${JUPYTER_PASSWORD}" ;;
  *) printf '%s\\n' python "$@" ;;
esac
"""


@pytest.fixture
def stub_path(tmp_path: Path) -> Path:
    """A folder of stand-ins for jupyter, fraudflow, torchrun and python."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("jupyter", "fraudflow", "torchrun"):
        (stubs / name).write_text(STUB.format(name=name))
    (stubs / "python").write_text(PYTHON_STUB)
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    return stubs


def entrypoint(stub_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`sh deploy/docker/entrypoint.sh ARGS` with the stubs first on PATH and a clean env."""
    environment = {
        "PATH": f"{stub_path}:/usr/bin:/bin",
        "FRAUDFLOW_RUNTIME_DIR": str(stub_path.parent),
        **env,
    }
    return subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=30,
    )


def called(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_entrypoint_without_a_mode_prints_usage(stub_path: Path) -> None:
    result = entrypoint(stub_path)
    assert result.returncode == EX_USAGE
    assert "jupyter [ARGS...]" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "env",
    [{}, {"JUPYTER_TOKEN": ""}, {"JUPYTER_PASSWORD": ""}],
    ids=["unset", "empty-token", "empty-password"],
)
def test_jupyter_refuses_to_start_without_a_token_or_password(
    stub_path: Path, env: dict[str, str]
) -> None:
    result = entrypoint(stub_path, "jupyter", **env)
    assert result.returncode == EX_USAGE
    assert "jupyter needs JUPYTER_TOKEN or JUPYTER_PASSWORD set (non-empty)" in result.stderr
    assert result.stdout == ""  # JupyterLab never started


def test_jupyter_with_a_token_starts_jupyterlab_without_the_token_in_its_arguments(
    stub_path: Path,
) -> None:
    lines = called(entrypoint(stub_path, "jupyter", "--log-level=INFO", JUPYTER_TOKEN="s3cret"))
    assert lines == [
        "jupyter",
        "lab",
        "--ip=0.0.0.0",
        "--port=8888",
        "--no-browser",
        "--ServerApp.root_dir=/workspace/notebooks",
        "--log-level=INFO",
    ]  # Jupyter Server reads JUPYTER_TOKEN from the environment


def test_jupyter_with_a_password_passes_only_its_hash(stub_path: Path) -> None:
    lines = called(entrypoint(stub_path, "jupyter", JUPYTER_PASSWORD="hunter2"))
    assert lines[:2] == ["jupyter", "lab"]
    assert lines[-1] == "--PasswordIdentityProvider.hashed_password=argon2:stub-hash-of-hunter2"
    assert not any(line.endswith("=hunter2") for line in lines)


@pytest.mark.parametrize(
    "arg", ["--IdentityProvider.token=", "--ServerApp.token=abc", "--ServerApp.password=x"]
)
def test_jupyter_refuses_credentials_in_arguments(stub_path: Path, arg: str) -> None:
    result = entrypoint(stub_path, "jupyter", arg, JUPYTER_TOKEN="s3cret")
    assert result.returncode == EX_USAGE
    assert "pass credentials through JUPYTER_TOKEN or JUPYTER_PASSWORD" in result.stderr
    assert result.stdout == ""


def test_train_runs_a_fraudflow_command(stub_path: Path) -> None:
    lines = called(entrypoint(stub_path, "train", "train", "--data", "/data/f", "--resume"))
    assert lines == ["fraudflow", "train", "--data", "/data/f", "--resume"]
    spelled_out = called(entrypoint(stub_path, "train", "fraudflow", "generate", "--out", "x"))
    assert spelled_out == ["fraudflow", "generate", "--out", "x"]


def test_train_runs_torchrun(stub_path: Path) -> None:
    args = ["--nproc-per-node", "2", "-m", "fraudflow", "train", "--ddp"]
    assert called(entrypoint(stub_path, "train", "torchrun", *args)) == ["torchrun", *args]


def test_train_without_a_command_is_refused(stub_path: Path) -> None:
    result = entrypoint(stub_path, "train")
    assert result.returncode == EX_USAGE
    assert "train needs a fraudflow command" in result.stderr


def test_serve_listens_on_all_interfaces_port_8000(stub_path: Path) -> None:
    lines = called(entrypoint(stub_path, "serve", "--run", "/runs/mlp"))
    assert lines == [
        "fraudflow",
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--run",
        "/runs/mlp",
    ]


def test_serve_takes_settings_from_the_environment_and_arguments_win(stub_path: Path) -> None:
    env = {
        "FRAUDFLOW_RUN": "/runs/mlp",
        "FRAUDFLOW_STATE": "redis://redis:6379/0",
        "FRAUDFLOW_WORKERS": "2",
        "FRAUDFLOW_PORT": "9000",
    }
    lines = called(entrypoint(stub_path, "serve", "--workers", "4", **env))
    assert lines == [
        "fraudflow", "serve",
        "--run", "/runs/mlp", "--state", "redis://redis:6379/0", "--workers", "2",
        "--host", "0.0.0.0", "--port", "9000",
        "--workers", "4",  # last: a repeated option takes its last value
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("mode_args", "url"),
    [
        (["serve"], "http://127.0.0.1:8000/healthz"),
        (["jupyter"], "http://127.0.0.1:8888/api"),
    ],
)
def test_healthcheck_probes_the_mode_the_container_started_in(
    stub_path: Path, mode_args: list[str], url: str
) -> None:
    called(entrypoint(stub_path, *mode_args, JUPYTER_TOKEN="t"))
    probe = called(entrypoint(stub_path, "healthcheck"))
    assert probe[0] == "python"
    assert probe[-1] == url


def test_healthcheck_of_training_or_an_unknown_mode_checks_nothing(stub_path: Path) -> None:
    assert called(entrypoint(stub_path, "healthcheck")) == []
    called(entrypoint(stub_path, "train", "train"))
    assert called(entrypoint(stub_path, "healthcheck")) == []


def test_any_other_command_runs_as_given(stub_path: Path) -> None:
    assert called(entrypoint(stub_path, "echo", "hello")) == ["hello"]


# --- the image -----------------------------------------------------------------------------------


def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def test_image_is_pinned_multi_stage_non_root_with_a_healthcheck() -> None:
    text = dockerfile()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"pytorch/pytorch:2\.9\.\d+-cuda12\.\d+-cudnn9-runtime", base.group(1))
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 2
    user = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert user and not user[-1].startswith(("root", "0"))
    assert "HEALTHCHECK" in text
    assert 'ENTRYPOINT ["/usr/local/bin/fraudflow-entrypoint"]' in text


def lock_pins() -> dict[str, str]:
    text = (DOCKER / "requirements.lock").read_text()
    return dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", text, re.MULTILINE))


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_leaves_torch_and_its_cuda_wheels_to_the_base_image() -> None:
    pins = lock_pins()
    assert pins, "requirements.lock pins nothing"
    assert not [n for n in pins if n in ("torch", "triton") or n.startswith("nvidia-")]
    torch_in_lock_sh = re.search(r"^torch_version=(\S+)", (DOCKER / "lock.sh").read_text(), re.M)
    assert torch_in_lock_sh is not None
    assert f"pytorch/pytorch:{torch_in_lock_sh.group(1)}-" in dockerfile()


def test_lock_covers_every_runtime_dependency_of_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {
        normalize(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0])
        for requirement in project["dependencies"]
    } - {"torch"}
    pinned = {normalize(name) for name in lock_pins()}
    missing = sorted(wanted - pinned)
    assert not missing, (
        f"deploy/docker/requirements.lock lacks {missing} from pyproject.toml: "
        "regenerate it with `sh deploy/docker/lock.sh`"
    )


# --- compose -------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_has_the_stack_with_named_volumes() -> None:
    spec = compose()
    services = spec["services"]
    assert {"api", "redis", "prometheus", "alertmanager", "jupyter", "train"} <= set(services)
    assert {"data", "runs", "notebooks"} <= set(spec["volumes"])
    assert "notebooks:/workspace/notebooks" in services["jupyter"]["volumes"]
    assert {"data:/data", "runs:/runs"} <= set(services["train"]["volumes"])
    assert services["api"]["environment"]["FRAUDFLOW_STATE"].startswith("redis://redis:")


def test_compose_publishes_ports_on_loopback_only_by_default() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("${FRAUDFLOW_BIND:-127.0.0.1}:"), (name, port)


@pytest.mark.parametrize("name", ["train", "jupyter"])
def test_compose_reserves_gpus_for_training_and_jupyter(name: str) -> None:
    devices = compose()["services"][name]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_compose_jupyter_gets_its_credentials_only_from_the_environment() -> None:
    jupyter = compose()["services"]["jupyter"]
    assert jupyter["command"] == ["jupyter"]
    assert jupyter["environment"] == {
        "JUPYTER_TOKEN": "${JUPYTER_TOKEN:-}",
        "JUPYTER_PASSWORD": "${JUPYTER_PASSWORD:-}",
    }


# --- Kubernetes ----------------------------------------------------------------------------------


def render(overlay: str) -> list[dict[str, Any]]:
    """`kustomize build` (or `kubectl kustomize`) of deploy/k8s/overlays/OVERLAY."""
    if kustomize := shutil.which("kustomize"):
        command = [kustomize, "build"]
    elif kubectl := shutil.which("kubectl"):
        command = [kubectl, "kustomize"]
    else:
        pytest.skip("no kustomize or kubectl to render the overlays")
    result = subprocess.run(
        [*command, str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_specs(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = resource.get("spec", {})
    if "template" in spec:
        yield spec["template"]["spec"]
    for replica in spec.get("pytorchReplicaSpecs", {}).values():
        yield replica["template"]["spec"]


OVERLAYS = ["dev", "dev/train", "prod", "prod/train", "prod/train-ddp", "prod/features-spark"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_non_root_read_only_with_resources(overlay: str) -> None:
    for resource in render(overlay):
        for pod in pod_specs(resource):
            name = resource["metadata"]["name"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            tmp_volumes = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
            for container in pod["containers"]:
                security = container["securityContext"]
                assert security["readOnlyRootFilesystem"] is True, name
                assert security["allowPrivilegeEscalation"] is False, name
                assert security["capabilities"]["drop"] == ["ALL"], name
                resources = container["resources"]
                assert resources["requests"]["cpu"] and resources["requests"]["memory"], name
                assert resources["limits"]["memory"], name
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                if container["image"].startswith(("fraudflow", "registry.example.com/fraudflow")):
                    assert mounts.get("/tmp") in tmp_volumes, f"{name}: no emptyDir on /tmp"


@pytest.mark.parametrize(("overlay", "replicas"), [("dev", 1), ("prod", 3)])
def test_api_deployment(overlay: str, replicas: int) -> None:
    resources = render(overlay)
    deployment = find(resources, "Deployment", "fraudflow-api")
    assert deployment["spec"]["replicas"] == replicas
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "serve"
    assert args[args.index("--state") + 1].startswith("redis://")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    secret_env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert {"FRAUDFLOW_API_KEYS", "FRAUDFLOW_ADMIN_KEYS"} <= set(secret_env)
    # The console's PostgreSQL, shared by the replicas: required where there are several.
    cases = secret_env["FRAUDFLOW_CASES"]
    assert (cases["name"], cases["key"]) == ("fraudflow-cases", "url")
    assert cases.get("optional", False) is (replicas == 1)
    hpa = find(resources, "HorizontalPodAutoscaler", "fraudflow-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] == replicas
    find(resources, "PodDisruptionBudget", "fraudflow-api")
    find(resources, "Service", "fraudflow-api")
    find(resources, "StatefulSet", "fraudflow-redis")
    find(resources, "Service", "fraudflow-redis")


def test_base_runs_at_least_two_api_replicas() -> None:
    base = yaml.safe_load_all((K8S / "base" / "api.yaml").read_text())
    deployment = next(r for r in base if r["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] >= 2


def test_network_policies_admit_only_the_ingress_path_to_the_api_and_the_api_to_redis() -> None:
    resources = render("prod")
    deny = find(resources, "NetworkPolicy", "fraudflow-default-deny-ingress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    api = find(resources, "NetworkPolicy", "fraudflow-api")["spec"]
    sources = [peer["namespaceSelector"]["matchLabels"] for peer in api["ingress"][0]["from"]]
    assert sources == [
        {"kubernetes.io/metadata.name": "ingress-nginx"},
        {"kubernetes.io/metadata.name": "monitoring"},
    ]
    assert api["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8000}]
    egress_ports = [port["port"] for rule in api["egress"] for port in rule["ports"]]
    assert sorted(egress_ports) == [53, 53, 5432, 6379]  # DNS, the console's PostgreSQL, Redis
    redis = find(resources, "NetworkPolicy", "fraudflow-redis")["spec"]
    assert redis["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "fraudflow-api"}}}],
            "ports": [{"protocol": "TCP", "port": 6379}],
        }
    ]
    assert redis["egress"] == []


def training_containers(overlay: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, container) of every training pod the overlay renders."""
    return [
        (pod, container)
        for resource in render(overlay)
        for pod in pod_specs(resource)
        for container in pod["containers"]
    ]


@pytest.mark.parametrize("overlay", ["prod/train", "prod/train-ddp", "dev/train"])
def test_training_resumes_on_the_shared_volume_and_serves_metrics_on_9401(overlay: str) -> None:
    shared = find(render("prod"), "PersistentVolumeClaim", "fraudflow-shared")
    assert shared["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod, container in training_containers(overlay):
        args = container["args"]
        assert "--resume" in args
        assert args[args.index("--metrics-port") + 1] == str(TRAIN_METRICS_PORT)
        assert {"name": "metrics", "containerPort": TRAIN_METRICS_PORT} in container["ports"]
        claims = [
            volume["persistentVolumeClaim"]["claimName"]
            for volume in pod["volumes"]
            if "persistentVolumeClaim" in volume
        ]
        assert claims == ["fraudflow-shared"]
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/data", "/runs"}


def test_gpu_job_requests_a_gpu_and_the_dev_job_does_not() -> None:
    ((_, prod),) = training_containers("prod/train")
    assert prod["resources"]["limits"]["nvidia.com/gpu"] == 1
    ((_, dev),) = training_containers("dev/train")
    assert "nvidia.com/gpu" not in str(dev["resources"])
    assert dev["args"][dev["args"].index("--device") + 1] == "cpu"


def test_pytorchjob_runs_ddp_under_torchrun_on_every_replica() -> None:
    (job,) = render("prod/train-ddp")
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    for replica in replicas.values():
        (container,) = replica["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"
        assert container["args"][:2] == ["train", "torchrun"]
        assert "--ddp" in container["args"]
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert str(gpus) == job["spec"]["nprocPerNode"]


# --- Prometheus and the alerts -------------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def test_scrape_configs_use_the_training_and_dcgm_ports() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["fraudflow-api"]["static_configs"][0]["targets"] == ["api:8000"]
    assert jobs["fraudflow-training"]["static_configs"][0]["targets"] == ["train:9401"]
    assert jobs["dcgm"]["static_configs"][0]["targets"][0].endswith(":9400")
    assert config["rule_files"] == ["rules/*.rules.yml"]
    assert config["alerting"]["alertmanagers"]
    k8s = yaml.safe_load((PROMETHEUS / "prometheus.k8s.yml").read_text())
    assert {job["job_name"] for job in k8s["scrape_configs"]} >= set(jobs) - {"alertmanager"}
    assert "--metrics-port 9401" in (PROMETHEUS / "prometheus.yml").read_text()
    assert "9401" in str(compose()["services"]["train"]["command"])


def test_rules_use_only_contracted_metric_names() -> None:
    used = set()
    for rule in rules():
        used |= set(re.findall(r"\bfraudflow_[a-z_]+", rule["expr"]))
    used = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert used <= METRIC_CONTRACT, sorted(used - METRIC_CONTRACT)


def test_every_alert_has_severity_summary_description_and_a_runbook_entry() -> None:
    readme = (DEPLOY / "README.md").read_text()
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', readme))
    for alert in alerts():
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], alert["alert"]
        assert annotations["runbook"] == f"deploy/README.md#{alert['alert'].lower()}"
        assert alert["alert"].lower() in anchors, f"no runbook entry for {alert['alert']}"


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_does_not() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {alert["alert"] for alert in alerts()}
    assert names - fires == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"
