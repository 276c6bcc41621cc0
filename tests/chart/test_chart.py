"""Offline tests for the Helm chart (chart/) and its contract with the Dockerfile.

No cluster and no Docker: `helm lint`/`helm template`, kubernetes-validate --strict for the
built-in kinds, JSON schemas in crd_schemas/ for the CRD kinds (KEDA, App Configuration,
PodMonitor), yamllint, and assertions on the parsed objects.

helm comes from $HELM or target/tools/bin/helm (tests/setup/helm.sh provides it).
Run: .venv/bin/python -m pytest tests/chart -q
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "chart"
CI_VALUES = CHART / "ci"
CRD_SCHEMAS = Path(__file__).resolve().parent / "crd_schemas"
DOCKERFILE = ROOT / "Dockerfile"

# The chart's minimum (Chart.yaml kubeVersion) and a current AKS release.
KUBE_VERSIONS = ("1.28.0", "1.33.0")
RENDER_KUBE = "1.33.0"

BUILTIN_KINDS = {"Deployment", "ServiceAccount", "PodDisruptionBudget", "ConfigMap", "Secret"}
CRD_KINDS = {p.stem for p in CRD_SCHEMAS.glob("*.json")}

BIN = "/usr/local/bin"
CELERIAC = f"{BIN}/celeriac"
READINESS = f"{BIN}/worker-readiness"
LIVENESS = f"{BIN}/worker-liveness"
STATE_DIR = "/var/run/celeriac"

SPOT_TOLERATION = {
    "key": "kubernetes.azure.com/scalesetpriority",
    "operator": "Equal",
    "value": "spot",
    "effect": "NoSchedule",
}
SPOT_EXPR = {"key": "kubernetes.azure.com/scalesetpriority", "operator": "In", "values": ["spot"]}
AGENTPOOL = "kubernetes.azure.com/agentpool"


# --------------------------------------------------------------------------------------------
# helm plumbing


def _helm_path() -> str | None:
    candidate = os.environ.get("HELM") or str(ROOT / "target" / "tools" / "bin" / "helm")
    return candidate if os.path.isfile(candidate) and os.access(candidate, os.X_OK) else None


@pytest.fixture(scope="session")
def helm() -> str:
    path = _helm_path()
    if path is None:
        pytest.fail(
            "helm not found: set HELM=/path/to/helm or run `bash tests/setup/helm.sh` "
            "(it installs helm into target/tools/bin/helm)",
            pytrace=False,
        )
    return path


class RenderError(Exception):
    pass


@functools.lru_cache(maxsize=None)
def _template(helm: str, files: tuple[str, ...], sets: tuple[str, ...], kube: str) -> str:
    cmd = [helm, "template", "celeriac", str(CHART), "--namespace", "workers-blue", "--kube-version", kube]
    for f in files:
        cmd += ["-f", str(CI_VALUES / f)]
    for s in sets:
        # "json:key=<json>" passes a JSON value (--set-json); anything else is a plain --set.
        cmd += ["--set-json", s.removeprefix("json:")] if s.startswith("json:") else ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RenderError(proc.stderr)
    return proc.stdout


def render_text(helm: str, *files: str, sets: tuple[str, ...] = (), kube: str = RENDER_KUBE) -> str:
    return _template(helm, tuple(files), tuple(sets), kube)


def render(helm: str, *files: str, sets: tuple[str, ...] = (), kube: str = RENDER_KUBE) -> list[dict]:
    return [d for d in yaml.safe_load_all(render_text(helm, *files, sets=sets, kube=kube)) if d]


def render_fails(helm: str, *files: str, sets: tuple[str, ...] = ()) -> str:
    with pytest.raises(RenderError) as err:
        render_text(helm, *files, sets=sets)
    return str(err.value)


def kinds(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = kinds(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def container(docs: list[dict]) -> dict:
    containers = pod_spec(docs)["containers"]
    assert [c["name"] for c in containers] == ["worker"]
    return containers[0]


def arg_after(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} should appear once in {args}"
    return args[args.index(flag) + 1]


# The values matrix: defaults plus every example under chart/ci/.
CASES = {"defaults": ()} | {p.name.removesuffix("-values.yaml"): (p.name,) for p in sorted(CI_VALUES.glob("*-values.yaml"))}
REQUIRED_CASES = {"defaults", "spot", "spot-seed", "keda", "appconfig", "identity", "podmonitor", "extensions"}


def test_matrix_covers_the_required_cases():
    assert REQUIRED_CASES <= set(CASES)


# --------------------------------------------------------------------------------------------
# lint, schema validation of every rendered object, yamllint


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_strict(helm, case):
    cmd = [helm, "lint", "--strict", str(CHART), "--kube-version", RENDER_KUBE]
    for f in CASES[case]:
        cmd += ["-f", str(CI_VALUES / f)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def validate_rendered(docs: list[dict], kube: str, tmp_path: Path) -> None:
    """kubernetes-validate --strict for the built-in kinds, crd_schemas/ for the CRD kinds."""
    assert docs, "nothing rendered"
    unknown = {d["kind"] for d in docs} - BUILTIN_KINDS - CRD_KINDS
    assert not unknown, f"no schema for rendered kinds {unknown}: add one to crd_schemas/ or BUILTIN_KINDS"

    builtin = [d for d in docs if d["kind"] in BUILTIN_KINDS]
    manifest = tmp_path / "builtin.yaml"
    manifest.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", kube, str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "WARN" not in out and "ERROR" not in out, out
    assert out.count("passed for resource") == len(builtin), out

    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            schema = json.loads((CRD_SCHEMAS / f"{doc['kind']}.json").read_text())
            jsonschema.Draft7Validator(schema).validate(doc)


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_rendered_objects_validate(helm, case, kube, tmp_path):
    validate_rendered(render(helm, *CASES[case], kube=kube), kube, tmp_path)


def test_crd_schemas_reject_misspelled_fields():
    """The hand-written CRD schemas are strict: a typo in a rendered field must not pass."""
    schema = json.loads((CRD_SCHEMAS / "ScaledObject.json").read_text())
    bad = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "worker", "namespace": "workers-blue"},
        "spec": {"scaleTargetRef": {"name": "worker"}, "maxReplicas": 3, "triggers": []},
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(bad)


# Rendered output mixes toYaml's compact sequences with hand-written indented ones, so
# indentation is not checked; the rules that catch real bugs are duplicate keys (a pod
# label/annotation given twice silently keeps one), YAML 1.1 truthy strings and syntax.
YAMLLINT_RENDERED = YamlLintConfig(
    """
extends: default
rules:
  document-start: disable
  indentation: disable
  line-length: disable
  comments: disable
  comments-indentation: disable
"""
)
YAMLLINT_SOURCES = YamlLintConfig(
    """
extends: default
rules:
  document-start: disable
  line-length: {max: 120}
"""
)


@pytest.mark.parametrize("case", CASES)
def test_yamllint_rendered(helm, case):
    problems = list(linter.run(render_text(helm, *CASES[case]), YAMLLINT_RENDERED))
    assert not problems, "\n".join(f"{p.line}:{p.column} {p.rule} {p.desc}" for p in problems)


@pytest.mark.parametrize(
    "path",
    [CHART / "Chart.yaml", CHART / "values.yaml", *sorted(CI_VALUES.glob("*.yaml"))],
    ids=lambda p: str(p.relative_to(CHART)),
)
def test_yamllint_chart_sources(path):
    problems = list(linter.run(path.read_text(), YAMLLINT_SOURCES))
    assert not problems, "\n".join(f"{p.line}:{p.column} {p.rule} {p.desc}" for p in problems)


def test_user_labels_cannot_duplicate_or_override_managed_keys(helm):
    """Labels and annotations are merged as maps: a user key equal to a chart key neither
    produces a duplicate YAML key nor changes the selector or the Workload Identity opt-in."""
    sets = (
        "json:workers.podLabels=" + json.dumps({"app.kubernetes.io/name": "x", "azure.workload.identity/use": "false", "team": "a"}),
        "json:workers.commonLabels=" + json.dumps({"app.kubernetes.io/instance": "x", "cost-center": "42"}),
        "json:workers.podAnnotations=" + json.dumps({"kubectl.kubernetes.io/default-container": "x"}),
    )
    text = render_text(helm, sets=sets)
    assert not [p for p in linter.run(text, YAMLLINT_RENDERED) if p.rule == "key-duplicates"]
    docs = render(helm, sets=sets)
    meta = one(docs, "Deployment")["spec"]["template"]["metadata"]
    assert meta["labels"]["app.kubernetes.io/name"] == "celeriac"
    assert meta["labels"]["app.kubernetes.io/instance"] == "celeriac"
    assert meta["labels"]["azure.workload.identity/use"] == "true"
    assert meta["labels"]["team"] == "a" and meta["labels"]["cost-center"] == "42"
    assert meta["annotations"]["kubectl.kubernetes.io/default-container"] == "worker"
    for doc in docs:
        assert doc["metadata"]["labels"]["cost-center"] == "42"


# --------------------------------------------------------------------------------------------
# defaults: every field of the brief


def test_defaults_deployment(helm):
    docs = render(helm)
    dep = one(docs, "Deployment")
    assert dep["metadata"]["name"] == "worker"
    assert dep["metadata"]["namespace"] == "workers-blue"
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    tmpl = dep["spec"]["template"]
    assert tmpl["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    for key, value in dep["spec"]["selector"]["matchLabels"].items():
        assert tmpl["metadata"]["labels"][key] == value
    spec = tmpl["spec"]
    assert spec["serviceAccountName"] == "sa-workers-workloadidentity"
    assert spec["automountServiceAccountToken"] is False
    assert spec["terminationGracePeriodSeconds"] == 120
    assert spec["nodeSelector"] == {AGENTPOOL: "workers"}
    assert "tolerations" not in spec
    assert "affinity" not in spec
    assert spec["enableServiceLinks"] is False


def test_defaults_worker_command(helm):
    c = container(render(helm))
    assert c["command"] == [CELERIAC]
    assert c["args"] == [
        "worker",
        "--pool", "prefork",
        "-Q", "$(BROKER_REQUESTS_QUEUE)",
        "--events",
        "--shutdown-timeout", "105",
        "--state-dir", STATE_DIR,
        "--metrics-bind", "0.0.0.0:9808",
    ]  # fmt: skip
    assert "--concurrency" not in c["args"]
    assert c["image"] == "celeriac:0.1.0"


def test_defaults_environment(helm):
    c = container(render(helm))
    assert c["env"] == [{"name": "CELERIAC_STATE_DIR", "value": STATE_DIR}]
    assert c["envFrom"] == [
        {"configMapRef": {"name": "configmap-api-workers", "optional": False}},
        {"secretRef": {"name": "secret-api-workers", "optional": False}},
    ]


def test_defaults_probes(helm):
    c = container(render(helm))
    assert c["startupProbe"]["exec"]["command"] == [LIVENESS]
    assert c["readinessProbe"]["exec"]["command"] == [READINESS]
    assert c["livenessProbe"]["exec"]["command"] == [LIVENESS]
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[name]
        assert set(probe) - {"exec"} <= {
            "initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold", "terminationGracePeriodSeconds",
        }  # fmt: skip
        assert all(isinstance(arg, str) for arg in probe["exec"]["command"])
        assert probe["timeoutSeconds"] >= 2
    # The startup probe replaces the blind 60 s delay.
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] == 180
    assert c["livenessProbe"]["initialDelaySeconds"] == 0
    assert c["readinessProbe"]["initialDelaySeconds"] == 0
    assert c["readinessProbe"] != c["livenessProbe"]


def test_liveness_initial_delay_configurable_without_startup_probe(helm):
    c = container(render(helm, sets=("workers.probes.liveness.initialDelaySeconds=60", "workers.probes.startup.enabled=false")))
    assert "startupProbe" not in c
    assert c["livenessProbe"]["initialDelaySeconds"] == 60


def test_liveness_probe_grace_override(helm):
    c = container(render(helm, sets=("workers.probes.liveness.terminationGracePeriodSeconds=30",)))
    assert c["livenessProbe"]["terminationGracePeriodSeconds"] == 30


def test_defaults_resources(helm):
    assert container(render(helm))["resources"] == {
        "requests": {"cpu": "100m", "memory": "850Mi"},
        "limits": {"cpu": "200m", "memory": "1Gi"},
    }


def test_defaults_hardening(helm):
    docs = render(helm)
    spec = pod_spec(docs)
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    c = container(docs)
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 1000
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts == {STATE_DIR: "state", "/tmp": "tmp"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert set(volumes) == {"state", "tmp"}
    assert all(set(v) == {"name", "emptyDir"} for v in volumes.values())
    assert volumes["state"]["emptyDir"]["medium"] == "Memory"
    assert "hostNetwork" not in spec and "hostPID" not in spec


def test_defaults_metrics_port(helm):
    assert container(render(helm))["ports"] == [{"name": "metrics", "containerPort": 9808, "protocol": "TCP"}]


def test_defaults_service_account(helm):
    sa = one(render(helm), "ServiceAccount")
    assert sa["metadata"]["name"] == "sa-workers-workloadidentity"
    assert sa["metadata"]["namespace"] == "workers-blue"
    assert sa["automountServiceAccountToken"] is False
    assert "annotations" not in sa["metadata"]  # no client id given


def test_reuse_existing_service_account(helm):
    docs = render(helm, sets=("workers.serviceAccount.create=false", "workers.serviceAccount.name=existing-sa"))
    assert not kinds(docs, "ServiceAccount")
    assert pod_spec(docs)["serviceAccountName"] == "existing-sa"


def test_defaults_pdb(helm):
    docs = render(helm)
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["metadata"]["namespace"] == "workers-blue"
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["spec"]["selector"] == one(docs, "Deployment")["spec"]["selector"]


def test_pdb_min_available(helm):
    pdb = one(render(helm, sets=("workers.podDisruptionBudget.minAvailable=2",)), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2 and "maxUnavailable" not in pdb["spec"]


def test_defaults_topology_spread(helm):
    docs = render(helm)
    selector = one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    spread = pod_spec(docs)["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in spread] == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    for c in spread:
        assert c["maxSkew"] == 1
        assert c["whenUnsatisfiable"] == "ScheduleAnyway"
        assert c["labelSelector"]["matchLabels"] == selector
        assert c["matchLabelKeys"] == ["pod-template-hash"]


def test_defaults_render_no_config_objects_or_crds(helm):
    """The seed expects configmap-api-workers and secret-api-workers to exist already."""
    docs = render(helm)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "PodDisruptionBudget", "ServiceAccount"]


def test_all_objects_share_the_target_namespace(helm):
    for case, files in CASES.items():
        for doc in render(helm, *files):
            expected = "workers-green" if case == "identity" else "workers-blue"
            assert doc["metadata"]["namespace"] == expected, (case, doc["kind"])


def test_empty_namespace_means_release_namespace(helm):
    cmd = [helm, "template", "r", str(CHART), "-n", "other", "--set", "workers.namespace="]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert {d["metadata"]["namespace"] for d in yaml.safe_load_all(out) if d} == {"other"}


# --------------------------------------------------------------------------------------------
# identity


def test_custom_namespace_and_identity(helm):
    docs = render(helm, "identity-values.yaml")
    sa = one(docs, "ServiceAccount")
    assert sa["metadata"] == sa["metadata"] | {"name": "sa-workers-green", "namespace": "workers-green"}
    assert sa["metadata"]["annotations"] == {
        "azure.workload.identity/client-id": "99999999-8888-7777-6666-555555555555",
        "azure.workload.identity/tenant-id": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
        "azure.workload.identity/service-account-token-expiration": "7200",
    }
    dep = one(docs, "Deployment")
    assert dep["metadata"]["namespace"] == "workers-green"
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "sa-workers-green"
    assert dep["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"


def test_workload_identity_label_can_be_disabled(helm):
    labels = one(render(helm, sets=("workers.workloadIdentity.enabled=false",)), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert "azure.workload.identity/use" not in labels


# --------------------------------------------------------------------------------------------
# spot: every selector/affinity combination


SPOT_ON = ("workers.spot.enabled=true", "workers.spot.agentPool=workersspot")


def spot_pool_term(pool: str) -> dict:
    """Spot nodes of that pool only, never any other spot pool of the cluster."""
    return {"matchExpressions": [SPOT_EXPR, {"key": AGENTPOOL, "operator": "In", "values": [pool]}]}


def required_on(pool: str) -> dict:
    return {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [spot_pool_term(pool)]}}


SPOT_POOL_TERM = spot_pool_term("workersspot")
NOT_SPOT_TERM = {"matchExpressions": [{"key": "kubernetes.azure.com/scalesetpriority", "operator": "NotIn", "values": ["spot"]}]}

SPOT_CASES = {
    "off": ((), {AGENTPOOL: "workers"}, None),
    # The seed: the toggle alone makes the nodeSelector's pool the spot pool, and the selector stays.
    "toggle-alone-is-the-seed": (("workers.spot.enabled=true",), {AGENTPOOL: "workers"}, required_on("workers")),
    "named-pool-equal-to-the-selectors": (
        ("workers.spot.enabled=true", "workers.spot.agentPool=workers"),
        {AGENTPOOL: "workers"},
        required_on("workers"),
    ),
    "toggle-alone-custom-selector-pool": (
        ("workers.spot.enabled=true", "workers.nodeSelector.kubernetes\\.azure\\.com/agentpool=batch"),
        {AGENTPOOL: "batch"},
        required_on("batch"),
    ),
    # A different named spot pool: the selector's pool would conflict, so its key is dropped.
    "required-named-spot-pool": (SPOT_ON, None, required_on("workersspot")),
    "preferred-with-regular-fallback": (
        (*SPOT_ON, "workers.spot.mode=preferred"),
        None,
        {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    SPOT_POOL_TERM,
                    {"matchExpressions": [{"key": AGENTPOOL, "operator": "In", "values": ["workers"]}]},
                ]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": SPOT_POOL_TERM}],
        },
    ),
    # Without a regular pool to fall back to, the fallback is any node that is not a spot node:
    # the pods tolerate the spot taint, so "anything" would include every other spot pool.
    "preferred-without-agentpool-selector": (
        (*SPOT_ON, "workers.spot.mode=preferred", "workers.nodeSelector=null"),
        None,
        {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [SPOT_POOL_TERM, NOT_SPOT_TERM]},
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": SPOT_POOL_TERM}],
        },
    ),
    "required-keeps-other-selector-keys": (
        (*SPOT_ON, "workers.nodeSelector.kubernetes\\.io/os=linux"),
        {"kubernetes.io/os": "linux"},
        required_on("workersspot"),
    ),
    "toggle-alone-keeps-other-selector-keys": (
        ("workers.spot.enabled=true", "workers.nodeSelector.kubernetes\\.io/os=linux"),
        {AGENTPOOL: "workers", "kubernetes.io/os": "linux"},
        required_on("workers"),
    ),
    "off-custom-pool": (("workers.nodeSelector.kubernetes\\.azure\\.com/agentpool=batch",), {AGENTPOOL: "batch"}, None),
}


@pytest.mark.parametrize("case", SPOT_CASES)
def test_spot_scheduling(helm, case):
    sets, node_selector, node_affinity = SPOT_CASES[case]
    spec = pod_spec(render(helm, sets=sets))
    assert spec.get("nodeSelector") == node_selector
    if node_affinity is None:
        assert "affinity" not in spec
        assert "tolerations" not in spec
    else:
        assert spec["affinity"] == {"nodeAffinity": node_affinity}
        assert spec["tolerations"] == [SPOT_TOLERATION]
        # The conflict the chart resolves: never AND a pool selector with an affinity on another
        # pool. A selector's pool is the spot pool itself, named by every required term.
        selector_pool = (spec.get("nodeSelector") or {}).get(AGENTPOOL)
        if selector_pool is not None:
            for term in _spot_node_terms(spec):
                assert {"key": AGENTPOOL, "operator": "In", "values": [selector_pool]} in term["matchExpressions"], term


SPOT_EXAMPLES = [("spot-seed-values.yaml",), ("spot-values.yaml",), ("spot-preferred-values.yaml",), ("all-features-values.yaml",)]


def _spot_node_terms(spec: dict) -> list[dict]:
    """Every node selector term a spot pod may be scheduled by (required terms)."""
    return spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]


@pytest.mark.parametrize("files", SPOT_EXAMPLES)
def test_every_spot_term_names_the_pool(helm, files):
    """A term that admits spot nodes must also name the pool: whichever example, no required
    term lets the pods (which tolerate the spot taint) onto another spot pool."""
    spec = pod_spec(render(helm, *files))
    for term in _spot_node_terms(spec):
        exprs = {e["key"]: e for e in term["matchExpressions"]}
        spot = exprs.get("kubernetes.azure.com/scalesetpriority")
        admits_spot = spot is None or spot["operator"] == "In"
        if admits_spot:
            assert AGENTPOOL in exprs and exprs[AGENTPOOL]["operator"] == "In", term
            assert len(exprs[AGENTPOOL]["values"]) == 1, term


def test_spot_example_file(helm):
    spec = pod_spec(render(helm, "spot-values.yaml"))
    assert "nodeSelector" not in spec
    assert spec["tolerations"] == [SPOT_TOLERATION]
    assert _spot_node_terms(spec) == [SPOT_POOL_TERM]


def test_spot_toggle_alone_renders_the_seeds_scheduling(helm, tmp_path):
    """`--set workers.spot.enabled=true` and nothing else: the seed's Deployment, whose spot pool is
    the pool of its nodeSelector. Valid for the schema, helm lint and kubernetes-validate."""
    sets = ("workers.spot.enabled=true",)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values["workers"]["spot"]["enabled"] = True
    jsonschema.Draft7Validator(json.loads((CHART / "values.schema.json").read_text())).validate(values)
    lint = subprocess.run(
        [helm, "lint", "--strict", str(CHART), "--kube-version", RENDER_KUBE, "--set", sets[0]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    for kube in KUBE_VERSIONS:
        docs = render(helm, sets=sets, kube=kube)
        spec = pod_spec(docs)
        assert spec["nodeSelector"] == {AGENTPOOL: "workers"}
        assert spec["tolerations"] == [SPOT_TOLERATION]
        assert spec["affinity"] == {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "kubernetes.azure.com/scalesetpriority", "operator": "In", "values": ["spot"]},
                                {"key": AGENTPOOL, "operator": "In", "values": ["workers"]},
                            ]
                        }
                    ]
                }
            }
        }
        args = container(docs)["args"]
        assert arg_after(args, "--shutdown-timeout") == "20" and "--acks-late" in args
        validate_rendered(docs, kube, tmp_path)
    # The example file says the same.
    assert pod_spec(render(helm, "spot-seed-values.yaml")) == pod_spec(render(helm, sets=sets))


SPOT_POOL_MISSING = (
    "workers.spot.enabled needs the name of the AKS spot node pool the pods may run on (its "
    "kubernetes.azure.com/agentpool label): set workers.spot.agentPool, or name that pool in "
    "workers.nodeSelector's kubernetes.azure.com/agentpool key"
)


@pytest.mark.parametrize(
    "sets",
    [
        ("workers.spot.enabled=true", "workers.nodeSelector=null"),
        (
            "workers.spot.enabled=true",
            "workers.nodeSelector.kubernetes\\.azure\\.com/agentpool=null",
            "workers.nodeSelector.kubernetes\\.io/os=linux",
        ),
        ("workers.spot.enabled=true", "workers.nodeSelector=null", "workers.spot.mode=preferred"),
    ],
)
def test_spot_without_any_pool_name_is_refused(helm, sets):
    """Without a pool the pods, which tolerate the spot taint, could run on any spot pool: the
    template refuses, in one sentence saying what to set (the schema no longer requires agentPool)."""
    err = render_fails(helm, sets=sets)
    assert SPOT_POOL_MISSING in err, err
    assert "schema" not in err, err


@pytest.mark.parametrize(
    "sets",
    [
        ("workers.spot.enabled=true", "workers.spot.mode=preferred"),
        ("workers.spot.enabled=true", "workers.spot.mode=preferred", "workers.spot.agentPool=workers"),
    ],
)
def test_preferred_spot_needs_a_pool_other_than_the_fallback(helm, sets):
    """An AKS pool is spot or regular: preferring the spot pool "workers" and falling back to the
    regular pool "workers" would name one pool twice, so the render says what to set."""
    err = render_fails(helm, sets=sets)
    assert (
        "workers.spot.mode=preferred falls back to the regular pool named in workers.nodeSelector (workers), "
        "so the spot pool must be another one: set workers.spot.agentPool"
    ) in err, err


def test_spot_keeps_user_tolerations_and_pod_affinity(helm):
    spec = pod_spec(render(helm, "all-features-values.yaml"))
    assert spec["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "workers", "effect": "NoSchedule"},
        SPOT_TOLERATION,
    ]
    assert set(spec["affinity"]) == {"podAntiAffinity", "nodeAffinity"}


def test_spot_rejects_user_node_affinity(helm):
    err = render_fails(
        helm,
        sets=(
            *SPOT_ON,
            'json:workers.affinity={"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[]}}}',
        ),
    )
    assert "nodeAffinity" in err


def test_user_node_affinity_passes_through_without_spot(helm):
    aff = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "preference": {"matchExpressions": [{"key": "k", "operator": "Exists"}]}}]}}  # fmt: skip
    spec = pod_spec(render(helm, sets=("json:workers.affinity=" + json.dumps(aff),)))
    assert spec["affinity"] == aff


# --------------------------------------------------------------------------------------------
# drain timing


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        ((), "105"),
        (SPOT_ON, "20"),
        ((*SPOT_ON, "workers.spot.shutdownTimeoutSeconds=25"), "25"),
        (("workers.terminationGracePeriodSeconds=60",), "45"),
        (("workers.terminationGracePeriodSeconds=30", *SPOT_ON), "15"),
        (("workers.shutdownTimeoutSeconds=90",), "90"),
        # With acks-late a deadline past the notice loses nothing (the broker redelivers).
        (("workers.shutdownTimeoutSeconds=90", *SPOT_ON), "90"),
        (("workers.shutdownMarginSeconds=30",), "90"),
        ((*SPOT_ON, "workers.spot.acksLate=false"), "20"),
    ],
)
def test_shutdown_timeout(helm, sets, expected):
    docs = render(helm, sets=sets)
    assert arg_after(container(docs)["args"], "--shutdown-timeout") == expected
    assert int(expected) < pod_spec(docs)["terminationGracePeriodSeconds"]


@pytest.mark.parametrize(
    "sets",
    [
        ("workers.shutdownTimeoutSeconds=120",),
        ("workers.shutdownTimeoutSeconds=200",),
        ("workers.terminationGracePeriodSeconds=10",),
    ],
)
def test_shutdown_timeout_must_fit_the_grace_period(helm, sets):
    assert "shutdown" in render_fails(helm, sets=sets).lower()


# --------------------------------------------------------------------------------------------
# spot without loss: about 30 s between Azure's eviction notice and the VM's end


SPOT_NOTICE_SECONDS = 30


@pytest.mark.parametrize("files", SPOT_EXAMPLES)
def test_spot_defaults_lose_nothing_when_the_vm_is_reclaimed(helm, files):
    """The defaults under spot: --acks-late (a running task's message stays unacknowledged, so the
    broker redelivers it whenever the VM dies, drain finished or not), and a drain deadline that
    leaves room inside the notice for the hand-back, so the drain normally completes first."""
    docs = render(helm, *files)
    spec, args = pod_spec(docs), container(docs)["args"]
    assert args.count("--acks-late") == 1
    deadline = int(arg_after(args, "--shutdown-timeout"))
    assert deadline == 20
    assert deadline + 10 <= SPOT_NOTICE_SECONDS, "at least 10 s of the notice left for the hand-back and exit"
    # The grace period is not shortened: the VM's end bounds an eviction anyway, and every other
    # termination (rollout, scale-down, node upgrade) keeps the full time to hand back and exit.
    assert spec["terminationGracePeriodSeconds"] == 120
    assert deadline < spec["terminationGracePeriodSeconds"]
    assert spec["tolerations"][-1] == SPOT_TOLERATION


def test_acks_late_only_under_spot(helm):
    assert "--acks-late" not in container(render(helm))["args"]
    assert "--acks-late" not in container(render(helm, sets=("workers.spot.acksLate=true",)))["args"]
    assert "--acks-late" not in container(render(helm, sets=(*SPOT_ON, "workers.spot.acksLate=false")))["args"]
    # Placed before extraArgs, and a repeat there is harmless (the worker accepts a flag twice).
    args = container(render(helm, sets=(*SPOT_ON, 'json:workers.extraArgs=["--acks-late","-l","INFO"]')))["args"]
    assert args[-4:] == ["--acks-late", "--acks-late", "-l", "INFO"]


@pytest.mark.parametrize(
    "sets",
    [
        (*SPOT_ON, "workers.spot.acksLate=false", "workers.shutdownTimeoutSeconds=30"),
        (*SPOT_ON, "workers.spot.acksLate=false", "workers.shutdownTimeoutSeconds=90"),
    ],
)
def test_early_ack_on_spot_refuses_a_deadline_past_the_notice(helm, sets):
    err = render_fails(helm, sets=sets)
    assert "past the spot eviction notice" in err and "workers.spot.acksLate" in err, err


def test_early_ack_on_spot_accepts_acks_late_given_in_extra_args(helm):
    args = container(
        render(
            helm,
            sets=(*SPOT_ON, "workers.spot.acksLate=false", "workers.shutdownTimeoutSeconds=90", 'json:workers.extraArgs=["--acks-late"]'),
        )
    )["args"]
    assert arg_after(args, "--shutdown-timeout") == "90"
    assert args.count("--acks-late") == 1


@pytest.mark.parametrize(("sets", "pool"), [(SPOT_ON, "workersspot"), (("workers.spot.enabled=true",), "workers")])
def test_spot_notes_name_the_pool_and_the_ack_mode(helm, sets, pool):
    proc = subprocess.run(
        [helm, "install", "celeriac", str(CHART), "--dry-run=client", "-n", "workers-blue", *sum((["--set", s] for s in sets), [])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"spot pool {pool}:" in notes and "--acks-late" in notes, notes


def test_a_python_app_is_the_seeds_command_with_celery_replaced(helm):
    c = container(render(helm, sets=("workers.app=proj", "workers.binDir=/opt/venv/bin")))
    assert c["command"] == ["/opt/venv/bin/celeriac"]
    assert c["args"][:8] == ["-A", "proj", "worker", "--pool", "prefork", "-Q", "$(BROKER_REQUESTS_QUEUE)", "--events"]
    probes = [c["readinessProbe"]["exec"]["command"], c["livenessProbe"]["exec"]["command"]]
    assert probes == [["/opt/venv/bin/worker-readiness"], ["/opt/venv/bin/worker-liveness"]]
    assert "-A" not in container(render(helm))["args"]
    # The schema takes module paths only.
    assert "app" in render_fails(helm, sets=("workers.app=proj; rm -rf /",))


def test_concurrency_and_extra_args(helm):
    args = container(render(helm, sets=("workers.concurrency=4", 'json:workers.extraArgs=["--prefetch-multiplier","1"]')))["args"]
    assert arg_after(args, "--concurrency") == "4"
    assert args[-2:] == ["--prefetch-multiplier", "1"]


def test_events_can_be_disabled(helm):
    assert "--events" not in container(render(helm, sets=("workers.events=false",)))["args"]


def test_image_digest_wins_over_tag(helm):
    c = container(render(helm, "all-features-values.yaml"))
    assert c["image"] == "example.azurecr.io/celeriac@sha256:" + "0123456789abcdef" * 4


# --------------------------------------------------------------------------------------------
# KEDA


def test_keda_scaled_object(helm):
    docs = render(helm, "keda-values.yaml")
    assert "replicas" not in one(docs, "Deployment")["spec"]
    so = one(docs, "ScaledObject")
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "worker"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 20)
    assert (spec["pollingInterval"], spec["cooldownPeriod"]) == (30, 300)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    [trigger] = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"] == {
        "protocol": "http",
        "mode": "QueueLength",
        "value": "20",
        "queueName": "api-requests",
        "vhostName": "/",
    }
    ta = one(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"] == {"name": ta["metadata"]["name"]}
    assert ta["metadata"]["namespace"] == so["metadata"]["namespace"] == "workers-blue"
    assert ta["spec"]["secretTargetRef"] == [
        {"parameter": "host", "name": "secret-api-workers", "key": "RABBITMQ_MANAGEMENT_URL"},
        {"parameter": "username", "name": "secret-api-workers", "key": "RABBITMQ_USERNAME"},
        {"parameter": "password", "name": "secret-api-workers", "key": "RABBITMQ_PASSWORD"},
    ]


def test_keda_separate_auth_secret(helm):
    ta = one(render(helm, "keda-values.yaml", sets=("workers.keda.auth.secretName=keda-rabbitmq",)), "TriggerAuthentication")
    assert {ref["name"] for ref in ta["spec"]["secretTargetRef"]} == {"keda-rabbitmq"}


def test_no_keda_objects_by_default(helm):
    docs = render(helm)
    assert not kinds(docs, "ScaledObject") and not kinds(docs, "TriggerAuthentication")


def test_keda_pdb_min_available_must_be_below_min_replicas(helm):
    err = render_fails(helm, "keda-values.yaml", sets=("workers.podDisruptionBudget.minAvailable=2",))
    assert "minReplicaCount" in err


# --------------------------------------------------------------------------------------------
# App Configuration provider


def test_app_configuration_owns_config_objects(helm):
    docs = render(helm, "appconfig-values.yaml")
    assert not kinds(docs, "ConfigMap") and not kinds(docs, "Secret")
    provider = one(docs, "AzureAppConfigurationProvider")
    assert provider["apiVersion"] == "azconfig.io/v1"
    assert provider["metadata"]["namespace"] == "workers-blue"
    spec = provider["spec"]
    assert spec["endpoint"] == "https://celeriac-store.azconfig.io"
    assert spec["target"] == {"configMapName": "configmap-api-workers"}
    assert spec["auth"] == {"workloadIdentity": {"serviceAccountName": "sa-workers-workloadidentity"}}
    assert spec["configuration"] == {
        "selectors": [{"keyFilter": "workers/*", "labelFilter": "blue"}],
        "trimKeyPrefixes": ["workers/"],
        "refresh": {"enabled": True, "interval": "1m", "monitoring": {"keyValues": [{"key": "workers/sentinel"}]}},
    }
    assert spec["secret"] == {
        "target": {"secretName": "secret-api-workers"},
        "auth": {"workloadIdentity": {"serviceAccountName": "sa-workers-workloadidentity"}},
        "refresh": {"enabled": True, "interval": "1h"},
    }
    sa = one(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"]["azure.workload.identity/client-id"] == "11111111-2222-3333-4444-555555555555"
    # Key Vault references populate the Secret, so the pod depends on it (hard reference).
    assert container(docs)["envFrom"] == [
        {"configMapRef": {"name": "configmap-api-workers", "optional": False}},
        {"secretRef": {"name": "secret-api-workers", "optional": False}},
    ]


def test_app_configuration_without_key_vault_makes_secret_optional(helm):
    docs = render(helm, "all-features-values.yaml")
    assert "secret" not in one(docs, "AzureAppConfigurationProvider")["spec"]
    assert not kinds(docs, "ConfigMap") and not kinds(docs, "Secret")
    assert container(docs)["envFrom"][1] == {"secretRef": {"name": "secret-api-workers", "optional": True}}


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (("workers.envFrom.configMap.create=true",), "create"),
        (("workers.envFrom.secret.create=true",), "create"),
        (("appConfiguration.endpoint=",), "endpoint"),
        (("workers.serviceAccount.clientId=",), "clientId"),
    ],
)
def test_app_configuration_conflicts_fail(helm, sets, needle):
    assert needle in render_fails(helm, "appconfig-values.yaml", sets=sets)


# --------------------------------------------------------------------------------------------
# chart-rendered ConfigMap/Secret (off by default)


def test_chart_rendered_config(helm):
    docs = render(helm, "chart-config-values.yaml")
    cm = one(docs, "ConfigMap")
    assert cm["metadata"]["name"] == "configmap-api-workers"
    assert cm["data"] == {"BROKER_REQUESTS_QUEUE": "api-requests"}
    secret = one(docs, "Secret")
    assert secret["metadata"]["name"] == "secret-api-workers"
    assert secret["type"] == "Opaque"
    assert set(secret["stringData"]) == {"CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"}
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/secret"])
    assert arg_after(container(docs)["args"], "--concurrency") == "4"


def test_config_checksum_changes_with_data(helm):
    def checksum(queue):
        docs = render(helm, "chart-config-values.yaml", sets=(f"workers.envFrom.configMap.data.BROKER_REQUESTS_QUEUE={queue}",))
        return one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum("a") != checksum("b")


# --------------------------------------------------------------------------------------------
# PodMonitor


@pytest.mark.parametrize("api", ["monitoring.coreos.com/v1", "azmonitoring.coreos.com/v1"])
def test_pod_monitor(helm, api):
    docs = render(helm, "podmonitor-values.yaml", sets=(f"workers.podMonitor.apiVersion={api}",))
    pm = one(docs, "PodMonitor")
    assert pm["apiVersion"] == api
    assert pm["metadata"]["namespace"] == "workers-blue"
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}]
    assert "metrics" in {p["name"] for p in container(docs)["ports"]}


def test_no_pod_monitor_by_default(helm):
    assert not kinds(render(helm), "PodMonitor")


# --------------------------------------------------------------------------------------------
# extension points (global, extraVolumes, extraVolumeMounts, extraEnvFrom, initContainers,
# extraContainers) and the private broker CA


def named(items: list[dict] | None) -> list[str]:
    return [i["name"] for i in items or []]


def worker(docs: list[dict]) -> dict:
    """The worker container, whatever sidecars sit beside it."""
    [c] = [c for c in pod_spec(docs)["containers"] if c["name"] == "worker"]
    return c


def test_defaults_render_no_extension(helm):
    spec = pod_spec(render(helm))
    c = worker(render(helm))
    assert "initContainers" not in spec
    assert named(spec["containers"]) == ["worker"]
    assert named(spec["volumes"]) == ["state", "tmp"]
    assert named(c["volumeMounts"]) == ["state", "tmp"]
    assert c["envFrom"] == [
        {"configMapRef": {"name": "configmap-api-workers", "optional": False}},
        {"secretRef": {"name": "secret-api-workers", "optional": False}},
    ]
    assert named(c["env"]) == ["CELERIAC_STATE_DIR"]
    # Empty lists and an empty CA name render exactly the same pod as leaving the keys out.
    empty = ["json:workers." + k + "=[]" for k in ("extraVolumes", "extraVolumeMounts", "extraEnvFrom", "initContainers", "extraContainers")]
    assert pod_spec(render(helm, sets=(*empty, 'workers.brokerCA.secretName=', 'json:global={}'))) == spec


def test_extension_points_rendered_where_they_belong(helm):
    values = yaml.safe_load((CI_VALUES / "extensions-values.yaml").read_text())["workers"]
    docs = render(helm, "extensions-values.yaml")
    spec, c = pod_spec(docs), worker(docs)
    # Passed through unchanged, after the chart's own entries.
    assert spec["initContainers"] == values["initContainers"]
    assert spec["containers"][0]["name"] == "worker"
    assert spec["containers"][1:] == values["extraContainers"]
    assert spec["volumes"][:3] == [
        {"name": "state", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
        {"name": "broker-ca", "configMap": {"name": "rabbitmq-ca-bundle", "items": [{"key": "ca-bundle.pem", "path": "ca-bundle.pem"}]}},
    ]
    assert spec["volumes"][3:] == values["extraVolumes"]
    assert named(c["volumeMounts"]) == ["state", "tmp", "broker-ca", "spool"]
    assert c["volumeMounts"][3:] == values["extraVolumeMounts"]
    # extraEnvFrom after the chart's sources: a later source wins for the same key.
    assert c["envFrom"][:2] == [
        {"configMapRef": {"name": "configmap-api-workers", "optional": False}},
        {"secretRef": {"name": "secret-api-workers", "optional": False}},
    ]
    assert c["envFrom"][2:] == values["extraEnvFrom"]


def test_extensions_keep_the_default_container_annotation(helm):
    pod = one(render(helm, "extensions-values.yaml"), "Deployment")["spec"]["template"]
    assert pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "worker"


@pytest.mark.parametrize(
    ("source", "volume"),
    [
        (("workers.brokerCA.secretName=rabbitmq-ca",), {"secret": {"secretName": "rabbitmq-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}),
        (("workers.brokerCA.configMapName=kube-root-ca.crt",), {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}),
    ],
)
def test_broker_ca_mounted_and_named_by_ssl_cert_file(helm, source, volume):
    docs = render(helm, sets=source)
    spec, c = pod_spec(docs), worker(docs)
    [ca] = [v for v in spec["volumes"] if v["name"] == "broker-ca"]
    assert ca == {"name": "broker-ca", **volume}
    # A directory mount, not subPath: a rotated bundle reaches the running pod.
    [mount] = [m for m in c["volumeMounts"] if m["name"] == "broker-ca"]
    assert mount == {"name": "broker-ca", "mountPath": "/etc/celeriac/broker-ca", "readOnly": True}
    assert {"name": "SSL_CERT_FILE", "value": "/etc/celeriac/broker-ca/ca.crt"} in c["env"]


def test_broker_ca_key_and_mount_path(helm):
    c = worker(render(helm, sets=("workers.brokerCA.secretName=ca", "workers.brokerCA.key=bundle.pem", "workers.brokerCA.mountPath=/etc/pki/rabbit/")))
    assert {"name": "SSL_CERT_FILE", "value": "/etc/pki/rabbit/bundle.pem"} in c["env"]


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (("workers.brokerCA.secretName=a", "workers.brokerCA.configMapName=b"), "not both"),
        (("workers.brokerCA.secretName=a", 'json:workers.extraEnv=[{"name":"SSL_CERT_FILE","value":"/x"}]'), "SSL_CERT_FILE"),
        (("workers.brokerCA.secretName=a", "workers.brokerCA.mountPath=/tmp"), '"/tmp"'),
        (('json:workers.extraVolumes=[{"name":"state","emptyDir":{}}]',), '"state"'),
        (("workers.brokerCA.secretName=a", 'json:workers.extraVolumes=[{"name":"broker-ca","emptyDir":{}}]'), '"broker-ca"'),
        (('json:workers.extraVolumes=[{"name":"x","emptyDir":{}},{"name":"x","emptyDir":{}}]',), '"x"'),
        (('json:workers.extraVolumeMounts=[{"name":"x","mountPath":"/var/run/celeriac"}]',), "/var/run/celeriac"),
        (('json:workers.extraContainers=[{"name":"worker","image":"busybox"}]',), '"worker"'),
        (
            (
                'json:workers.initContainers=[{"name":"proxy","image":"a"}]',
                'json:workers.extraContainers=[{"name":"proxy","image":"b"}]',
            ),
            '"proxy"',
        ),
    ],
)
def test_extension_conflicts_fail_with_a_clear_message(helm, sets, needle):
    err = render_fails(helm, sets=sets)
    assert needle in err, err


def test_as_a_subchart_with_globals(helm, tmp_path):
    """An umbrella chart passes `global` to every subchart: the schema must accept it, whatever
    it holds, and the chart renders as it does on its own."""
    parent = tmp_path / "umbrella"
    (parent / "charts").mkdir(parents=True)
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: umbrella\nversion: 0.1.0\ndependencies:\n  - name: celeriac\n    version: 0.1.0\n"
    )
    (parent / "values.yaml").write_text(
        yaml.safe_dump(
            {
                "global": {"imageRegistry": "example.azurecr.io", "labels": {"team": "payments"}, "nested": [1, {"a": None}]},
                "celeriac": {"workers": {"name": "payments-worker", "replicas": 2}},
            }
        )
    )
    shutil.copytree(CHART, parent / "charts" / "celeriac")
    proc = subprocess.run(
        [helm, "template", "umbrella", str(parent), "--namespace", "workers-blue", "--kube-version", RENDER_KUBE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["name"] == "payments-worker"
    assert deployment["spec"]["replicas"] == 2
    # A subchart's own values are still checked against its schema.
    (parent / "values.yaml").write_text(yaml.safe_dump({"global": {"x": 1}, "celeriac": {"workers": {"bogus": 1}}}))
    proc = subprocess.run([helm, "template", "umbrella", str(parent)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "bogus" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------------
# values.schema.json refuses bad values


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (("bogus=1",), "bogus"),
        (("workers.bogus=1",), "bogus"),
        (("workers.probes.liveness.initialDelaySecond=60",), "initialDelaySecond"),
        (("workers.spot.enabled=notabool",), "enabled"),
        (("workers.replicas=three",), "replicas"),
        (("workers.concurrency=many",), "concurrency"),
        (("workers.spot.mode=sometimes",), "mode"),
        (("workers.spot.shutdownTimeoutSeconds=30",), "shutdownTimeoutSeconds"),
        (("workers.image.pullPolicy=Sometimes",), "pullPolicy"),
        (("workers.resources.requests.cpu=lots",), "cpu"),
        (("workers.metrics.port=80",), "port"),
        (("workers.runAsUser=0",), "runAsUser"),
        (("workers.serviceAccount.clientId=not-a-guid",), "clientId"),
        (("workers.serviceAccount.tokenExpirationSeconds=60",), "tokenExpirationSeconds"),
        (("workers.keda.enabled=true",), "queueName"),
        (("workers.keda.protocol=amqps",), "protocol"),
        (("workers.podMonitor.apiVersion=v1",), "apiVersion"),
        (("workers.namespace=Workers_Blue",), "namespace"),
        (("workers.spot.acksLate=maybe",), "acksLate"),
        (("workers.spot.agentPool=Spot_Pool",), "agentPool"),
        (("json:global=[]",), "global"),
        (("workers.extraVolumes=data",), "extraVolumes"),
        (('json:workers.extraVolumes=[{"emptyDir":{}}]',), "name"),
        (('json:workers.extraVolumeMounts=[{"name":"data"}]',), "mountPath"),
        (('json:workers.extraVolumeMounts=[{"name":"data","mountPath":"relative"}]',), "mountPath"),
        (("workers.extraEnvFrom=tuning",), "extraEnvFrom"),
        (('json:workers.extraEnvFrom=[{"configMap":{"name":"tuning"}}]',), "configMap"),
        (('json:workers.extraEnvFrom=[{"prefix":"X_"}]',), "extraEnvFrom"),
        (('json:workers.initContainers={"name":"init","image":"busybox"}',), "initContainers"),
        (('json:workers.initContainers=[{"name":"init"}]',), "image"),
        (('json:workers.extraContainers=[{"name":"Side_Car","image":"busybox"}]',), "name"),
        (("workers.extraContainers=sidecar",), "extraContainers"),
        (("workers.brokerCA.key=certs/ca.crt",), "key"),
        (("workers.brokerCA.mountPath=etc/ca",), "mountPath"),
        (("workers.brokerCA.secretName=Not_A_Name",), "secretName"),
        (
            (
                "appConfiguration.enabled=true",
                "appConfiguration.endpoint=https://x.azconfig.io",
                "workers.serviceAccount.clientId=11111111-2222-3333-4444-555555555555",
                "workers.envFrom.secret.create=true",
            ),
            "create",
        ),
    ],
)
def test_schema_rejects_bad_values(helm, sets, needle):
    err = render_fails(helm, sets=sets)
    assert needle in err, err


def test_schema_accepts_every_example(helm):
    for files in CASES.values():
        render(helm, *files)


# --------------------------------------------------------------------------------------------
# documentation covers every value


def _schema_paths(node: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        paths.append(path)
        if sub.get("type") == "object" or "properties" in sub:
            paths += _schema_paths(sub, path + ".")
    return paths


def _values_paths(node: dict, schema: dict, prefix: str = "", leaves_only: bool = False) -> list[str]:
    """Dotted paths of values.yaml; descends only where the schema declares properties, so
    free-form maps (nodeSelector, annotations, data) count as one value."""
    paths = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        sub = schema.get("properties", {}).get(key, {})
        nested = isinstance(value, dict) and "properties" in sub
        if not (leaves_only and nested):
            paths.append(path)
        if nested:
            paths += _values_paths(value, sub, path + ".", leaves_only)
    return paths


def test_every_value_is_typed_defaulted_and_documented():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema_paths = set(_schema_paths(schema))
    values_paths = set(_values_paths(values, schema))
    assert schema_paths == values_paths, (
        f"schema-only: {sorted(schema_paths - values_paths)}, values-only: {sorted(values_paths - schema_paths)}"
    )
    readme = (CHART / "README.md").read_text()
    leaves = _values_paths(values, schema, leaves_only=True)
    undocumented = sorted(p for p in leaves if f"`{p}`" not in readme)
    assert not undocumented, f"chart/README.md does not document: {undocumented}"


# --------------------------------------------------------------------------------------------
# Dockerfile contract


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _dockerfile_instructions():
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _cargo_builds(run: str) -> list[list[str]]:
    out = []
    for command in re.split(r"&&|;", run):
        tokens = shlex.split(command)
        if tokens[:2] == ["cargo", "build"]:
            out.append(tokens[2:])
    return out


def test_dockerfile_builds_the_named_packages():
    builds = [b for stage in _stages() for word, rest in stage if word == "RUN" for b in _cargo_builds(rest)]
    packages = {}
    for args in builds:
        assert "--locked" in args
        profile = "release" if "--release" in args else args[args.index("--profile") + 1]
        for i, a in enumerate(args[:-1]):
            if a in ("-p", "--package"):
                packages[args[i + 1]] = profile
    # The worker in release; the probes in the small `probes` profile (Cargo.toml).
    assert packages == {"celeriac": "release", "celeriac-probes": "probes"}


def test_dockerfile_binaries_match_the_chart(helm):
    stages = _stages()
    assert len(stages) >= 2, "expected a build stage and a runtime stage"
    build_runs = " ".join(rest for stage in stages[:-1] for word, rest in stage if word == "RUN")
    final = stages[-1]

    copies = {}
    for word, rest in final:
        if word == "COPY":
            tokens = [t for t in shlex.split(rest) if not t.startswith("--")]
            *sources, dest = tokens
            for src in sources:
                copies[dest if len(sources) == 1 else f"{dest.rstrip('/')}/{Path(src).name}"] = src

    c = container(render(helm))
    chart_paths = {c["command"][0]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        chart_paths.add(c[probe]["exec"]["command"][0])
    assert chart_paths == {CELERIAC, READINESS, LIVENESS}
    for path in chart_paths:
        assert path in copies, f"{path} is used by the chart but not copied into the runtime image"
        name = Path(path).name
        assert Path(copies[path]).name == name
        built = f"target/{'release' if name == 'celeriac' else 'probes'}/{name}"
        assert built in build_runs, f"{name} is not taken from the cargo build output"

    entrypoint = [rest for word, rest in final if word == "ENTRYPOINT"]
    assert len(entrypoint) == 1
    assert json.loads(entrypoint[0]) == c["command"] == [CELERIAC], "ENTRYPOINT must be exec form"


def test_dockerfile_runtime_matches_pod_settings(helm):
    final = _stages()[-1]
    c = container(render(helm))
    spec = pod_spec(render(helm))

    base = final[0][1].split()[0]
    args = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for word, rest in _dockerfile_instructions() if word == "ARG")))
    base = args.get(base.strip("${}"), base)
    assert "distroless/cc" in base or "bookworm-slim" in base, base

    [user] = [rest for word, rest in final if word == "USER"]
    assert user == f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}"
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for word, rest in final if word == "ENV")))
    assert env["CELERIAC_STATE_DIR"] == arg_after(c["args"], "--state-dir") == STATE_DIR
    exposed = {rest for word, rest in final if word == "EXPOSE"}
    assert exposed == {str(c["ports"][0]["containerPort"])}


def test_dockerfile_toolchain():
    args = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for word, rest in _dockerfile_instructions() if word == "ARG")))
    assert args["RUST_IMAGE"].startswith("rust:1.95")


def test_dockerignore_keeps_sources_and_drops_bulk():
    patterns = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")
    }
    assert {"target", ".git", ".venv"} <= patterns
    for needed in ("src", "Cargo.toml", "Cargo.lock", "probes", "examples"):
        assert needed not in patterns and f"/{needed}" not in patterns and "*" not in patterns


def test_broker_oauth2_sets_the_worker_environment(helm):
    c = worker(render(helm, "oauth2-values.yaml"))
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CELERIAC_BROKER_AUTH"] == "azure-workload-identity"
    assert env["CELERIAC_BROKER_OAUTH_SCOPE"] == "api://00000000-aaaa-bbbb-cccc-rabbitmq0000/.default"
    assert "CELERIAC_BROKER_OAUTH_TOKEN_FILE" not in env
    # The default: nothing about tokens.
    env = {e["name"] for e in worker(render(helm))["env"]}
    assert not any(name.startswith("CELERIAC_BROKER_") for name in env)
    c = worker(render(helm, sets=("workers.brokerAuth.mode=oauth2-token-file", "workers.brokerAuth.tokenFile=/var/run/token/access")))
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CELERIAC_BROKER_AUTH"] == "oauth2-token-file"
    assert env["CELERIAC_BROKER_OAUTH_TOKEN_FILE"] == "/var/run/token/access"


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (("workers.brokerAuth.oauthScope=",), "oauthScope is required"),
        (("workers.workloadIdentity.enabled=false",), "needs workers.workloadIdentity.enabled"),
        (("workers.serviceAccount.clientId=",), "needs workers.serviceAccount.clientId"),
        (("workers.envFrom.secret.stringData.CELERY_BROKER_URL=amqps://u:p@rabbitmq:5671/",), "carries a password"),
        (("workers.brokerAuth.mode=oauth2-token-file", "workers.brokerAuth.oauthScope="), "tokenFile is required"),
        (("workers.brokerAuth.mode=kerberos",), "brokerAuth"),
    ],
)
def test_broker_oauth2_refuses_what_cannot_work(helm, sets, needle):
    assert needle in render_fails(helm, "oauth2-values.yaml", sets=sets)
