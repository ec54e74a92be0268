"""The Helm chart (helm/tandem): `helm lint` and `helm template` for each preset and for overridden values, every
rendered object validated strictly (unknown fields fail) against the Kubernetes schema of the oldest version the
chart supports and of a recent one, and assertions on what the objects do.

helm comes from scripts/fetch-helm.sh (run by `make test`, or here when .tools/bin/helm is missing)."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tandem"
HELM = ROOT / ".tools" / "bin" / "helm"
FETCH_HELM = ROOT / "scripts" / "fetch-helm.sh"
RELEASE, NAMESPACE = "t", "inference"
# the chart's kubeVersion floor (gRPC probes are GA from 1.27) and a recent release
K8S_VERSIONS = ("1.27.0", "1.37.0")
POOLS = ("prefill", "decode", "expert")
SERVICES = ("controller", "gateway", *POOLS)
PRESETS = {"default": [], "cpu-tiny": ["-f", str(CHART / "values-cpu-tiny.yaml")],
           "deepseek-v3": ["-f", str(CHART / "values-deepseek-v3.yaml")]}
OVERRIDES = {
    "external-redis": ["--set", "redis.enabled=false", "--set", "redis.external.host=redis.example.internal",
                       "--set", "redis.external.tls=true", "--set", "redis.auth.existingSecret=shared-redis"],
    "redis-without-auth": ["--set", "redis.auth.enabled=false"],
    "model-pvc": ["--set", "model.source=pvc", "--set", "model.pvc.claimName=models", "--set",
                  "model.pvc.subPath=tiny-code"],
    "model-hostpath": ["--set", "model.source=hostPath", "--set", "model.hostPath.path=/mnt/models/tiny-code"],
    "public-gateway": ["--set", "gateway.service.type=LoadBalancer", "--set", "gateway.autoscaling.enabled=true",
                       "--set", "gateway.service.loadBalancerSourceRanges={10.0.0.0/8}",
                       "--set", "networkPolicy.gatewayFrom[0].ipBlock.cidr=10.0.0.0/8",
                       "--set", "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring"],
    "static-no-extras": ["--set", "controller.discovery=static", "--set", "rbac.create=false", "--set",
                         "serviceAccount.create=false", "--set", "networkPolicy.enabled=false", "--set",
                         "gateway.pdb.enabled=false", "--set", "controller.pdb.enabled=true"],
    "long-names": ["--set", "fullnameOverride=a-release-name-that-is-much-longer-than-anyone-would-type"],
    "more-ranks": ["--set", "prefill.replicas=3", "--set", "decode.replicas=4", "--set", "expert.replicas=8",
                   "--set", "expert.slotsPerServer=3", "--set", "device=cuda", "--set", "prefill.gpus=2"],
}


@functools.cache
def helm() -> str:
    """The helm binary; fetches it once if it is missing, and fails (never skips) when that is impossible."""
    if not HELM.exists():
        fetched = subprocess.run([str(FETCH_HELM)], capture_output=True, text=True)
        if fetched.returncode != 0 or not HELM.exists():
            pytest.fail(f"helm is needed for the chart tests and {FETCH_HELM.relative_to(ROOT)} could not install "
                        f"it at {HELM.relative_to(ROOT)} (`make install-test` runs it):\n{fetched.stderr}",
                        pytrace=False)
    return str(HELM)


def run_helm(*args: str) -> str:
    done = subprocess.run([helm(), *args], capture_output=True, text=True)
    assert done.returncode == 0, f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@functools.cache
def _render(args: tuple[str, ...]) -> tuple[dict, ...]:
    out = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def render(*args: str) -> list[dict]:
    return list(_render(args))


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict], kind: str, component: str) -> dict:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    assert len(found) == 1, f"{len(found)} {kind}s of {component}"
    return found[0]


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def containers(obj: dict) -> list[dict]:
    return obj["spec"]["template"]["spec"]["containers"]


def tandem_container(objects: list[dict], component: str) -> dict:
    kind = "StatefulSet" if component in POOLS else "Deployment"
    return containers(named(objects, kind, component))[0]


def service_config(objects: list[dict], service: str) -> dict:
    return yaml.safe_load(of_kind(objects, "ConfigMap")[0]["data"][f"{service}.yaml"])


# --- every preset and override: lint, render, validate ------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_lint(preset):
    out = run_helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *PRESETS[preset])
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("case", [*PRESETS, *OVERRIDES])
def test_rendered_objects_are_valid_kubernetes(case):
    objects = render(*PRESETS.get(case, []), *OVERRIDES.get(case, []))
    assert {o["kind"] for o in objects} >= {"ConfigMap", "Deployment", "StatefulSet", "Service"}
    errors = []
    for obj in objects:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {e.message} at "
                              f"{'.'.join(map(str, e.path))}")
    assert not errors, "\n".join(errors)
    for obj in objects:
        labels = obj["metadata"]["labels"]
        for key in ("name", "instance", "component", "version", "part-of", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels, f"{obj['kind']}/{obj['metadata']['name']} lacks {key}"
        assert len(obj["metadata"]["name"]) <= (52 if obj["kind"] == "StatefulSet" else 63)
    for w in workloads(objects):
        selector = w["spec"]["selector"]["matchLabels"]
        assert selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("case", [*PRESETS, *OVERRIDES])
def test_every_container_has_probes_and_resources(case):
    objects = render(*PRESETS.get(case, []), *OVERRIDES.get(case, []))
    for w in workloads(objects):
        spec = w["spec"]["template"]["spec"]
        for c in spec["containers"]:
            where = f"{w['metadata']['name']}/{c['name']}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{where} has no {probe}"
            resources = c.get("resources", {})
            assert {"cpu", "memory"} <= resources.get("requests", {}).keys(), where
            assert "memory" in resources.get("limits", {}), where
            if c["name"] in SERVICES:  # Tandem services: the standard gRPC health service on their gRPC port
                grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert c[probe]["grpc"] == {"port": grpc_port}, where
        for c in spec.get("initContainers", []):
            assert {"cpu", "memory"} <= c["resources"]["requests"].keys(), c["name"]


# --- the DeepSeek-V3 preset matches the published deployment --------------------------------------------------


def gpus(workload: dict) -> int:
    limits = containers(workload)[0]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu", 0) == containers(workload)[0]["resources"]["requests"].get("nvidia.com/gpu", 0)
    return workload["spec"]["replicas"] * int(limits.get("nvidia.com/gpu", 0))


def test_deepseek_v3_gpus_match_the_published_shape():
    """Prefill: 4 nodes x 8 GPUs; decode: 40 nodes x 8 GPUs, with 256 routed + 64 redundant physical experts
    (the mapping onto pools is documented in values-deepseek-v3.yaml)."""
    objects = render(*PRESETS["deepseek-v3"])
    sets = {pool: named(objects, "StatefulSet", pool) for pool in POOLS}
    per_pool = {pool: gpus(s) for pool, s in sets.items()}
    assert per_pool == {"prefill": 4 * 8, "decode": 160, "expert": 160}
    assert per_pool["decode"] + per_pool["expert"] == 40 * 8
    for pool, s in sets.items():  # one rank per GPU, on the nodes of its stage
        assert containers(s)[0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        stage = "prefill" if pool == "prefill" else "decode"
        assert s["spec"]["template"]["spec"]["nodeSelector"]["tandem/stage"] == stage
    controller = service_config(objects, "controller")
    assert (controller["num_prefill"], controller["num_decode"], controller["num_expert_servers"]) == (32, 160, 160)
    assert controller["num_expert_servers"] * controller["num_slots_per_server"] == 256 + 64
    assert controller["backend"] == "nccl"
    for pool in POOLS:
        assert service_config(objects, pool)["device"] == "cuda"
        env = {e["name"]: e.get("value") for e in tandem_container(objects, pool)["env"]}
        assert env["NCCL_IB_DISABLE"] == "0" and env["NCCL_SOCKET_IFNAME"] == "eth0"
    # no GPU anywhere else
    for component in ("controller", "gateway"):
        assert "nvidia.com/gpu" not in tandem_container(objects, component)["resources"]["limits"]


def test_cpu_tiny_is_the_make_up_topology_without_gpus():
    objects = render(*PRESETS["cpu-tiny"])
    assert {pool: named(objects, "StatefulSet", pool)["spec"]["replicas"] for pool in POOLS} == \
        {"prefill": 1, "decode": 1, "expert": 2}
    assert not any("nvidia.com/gpu" in c["resources"].get("limits", {}) for w in workloads(objects)
                   for c in containers(w))
    assert service_config(objects, "controller")["backend"] == "gloo"
    copy = named(objects, "StatefulSet", "expert")["spec"]["template"]["spec"]["initContainers"][0]
    assert "/opt/tandem/models/tiny-code" in copy["command"]


# --- what the objects do -------------------------------------------------------------------------------------


def test_pools_are_parallel_statefulsets_with_stable_names_shm_and_a_read_only_model():
    objects = render()
    for pool in POOLS:
        s = named(objects, "StatefulSet", pool)
        service = named(objects, "Service", pool)
        assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
        assert s["spec"]["serviceName"] == service["metadata"]["name"]
        assert s["spec"]["podManagementPolicy"] == "Parallel"
        pod = s["spec"]["template"]["spec"]
        c = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env[f"TANDEM_{pool.upper()}_ADVERTISE_HOST"] == \
            f"$(POD_NAME).{service['metadata']['name']}.$(POD_NAMESPACE).svc.cluster.local"
        node = [e for e in c["env"] if e["name"] == "TANDEM_EXPERT_NODE"]  # the controller groups a node's servers
        assert node == ([{"name": "TANDEM_EXPERT_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
                        if pool == "expert" else [])
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["model"]["readOnly"] is True and mounts["model"]["mountPath"] == "/models/tiny-code"
        assert mounts["dshm"]["mountPath"] == "/dev/shm"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert c["args"] == ["serve", pool, "--config", f"/etc/tandem/{pool}.yaml"]
    pvc = render(*OVERRIDES["model-pvc"])
    volume = next(v for v in named(pvc, "StatefulSet", "decode")["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == "model")
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_network_policy_admits_only_the_gateway_port_from_outside():
    for case in ("default", "deepseek-v3", "public-gateway"):
        objects = render(*PRESETS.get(case, []), *OVERRIDES.get(case, []))
        release = {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/instance": RELEASE}
        policies = of_kind(objects, "NetworkPolicy")
        gateway_port = tandem_container(objects, "gateway")["ports"][0]["containerPort"]
        metrics_ports = {p["containerPort"] for s in SERVICES for p in tandem_container(objects, s)["ports"]
                         if p["name"] == "metrics"}
        # every pod of the release is isolated for ingress by some policy
        for w in workloads(objects):
            labels = w["spec"]["template"]["metadata"]["labels"]
            assert any("Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], labels)
                       for p in policies), w["metadata"]["name"]
        for p in policies:
            for rule in p["spec"]["ingress"]:
                peers = rule.get("from", [])
                internal = peers and all(peer == {"podSelector": {"matchLabels": release}} for peer in peers)
                if internal:
                    continue
                ports = {(port["port"], port["protocol"]) for port in rule.get("ports", [])}
                selector = p["spec"]["podSelector"]
                if ports == {(gateway_port, "TCP")}:  # the public API: only the gateway pods
                    assert selector["matchLabels"]["app.kubernetes.io/component"] == "gateway", p["metadata"]["name"]
                    continue
                # the only other outside rule: metrics, from named peers only, and only when asked for
                assert case == "public-gateway" and peers, f"{p['metadata']['name']} admits {ports} from outside"
                assert ports == {(port, "TCP") for port in metrics_ports}


def selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))


def test_controller_role_grants_only_reads_of_pods_and_endpointslices():
    objects = render()
    roles = of_kind(objects, "Role")
    assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")
    assert len(roles) == 1
    granted = {(group, resource, verb) for rule in roles[0]["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert all(rule.keys() == {"apiGroups", "resources", "verbs"} for rule in roles[0]["rules"])  # no names, no URLs
    assert granted == {(group, resource, verb) for group, resource in (("", "pods"),
                                                                       ("discovery.k8s.io", "endpointslices"))
                       for verb in ("get", "list", "watch")}
    binding = of_kind(objects, "RoleBinding")[0]
    controller = named(objects, "Deployment", "controller")["spec"]["template"]["spec"]
    assert binding["roleRef"]["name"] == roles[0]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": controller["serviceAccountName"],
                                    "namespace": NAMESPACE}]
    assert controller["automountServiceAccountToken"] is True
    # nobody else holds an API token
    for w in workloads(objects):
        if w["metadata"]["labels"]["app.kubernetes.io/component"] != "controller":
            spec = w["spec"]["template"]["spec"]
            assert spec["automountServiceAccountToken"] is False, w["metadata"]["name"]
            assert spec.get("serviceAccountName") != controller["serviceAccountName"]
    assert service_config(objects, "controller")["discovery"] == "kubernetes"


def redis_secret_refs(objects: list[dict]) -> dict[str, set[str]]:
    """Container name -> the Secrets its environment reads."""
    return {c["name"]: {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                        if "secretKeyRef" in e.get("valueFrom", {})}
            for w in workloads(objects) for c in containers(w)}


@pytest.mark.parametrize("clients", [["expert"], ["controller", "expert"], list(SERVICES)])
def test_changing_the_redis_secret_name_changes_every_clients_environment(clients):
    chosen = ["--set", "redis.clients={" + ",".join(clients) + "}"]
    before = render(*chosen)
    after = render(*chosen, "--set", "redis.auth.existingSecret=team-redis", "--set", "redis.auth.secretKey=pw")
    default_secret = f"{RELEASE}-tandem-redis"
    assert [s["metadata"]["name"] for s in of_kind(before, "Secret")] == [default_secret]
    assert not of_kind(after, "Secret")  # an existing Secret is used, not created
    assert redis_secret_refs(before) == {c: {default_secret} if c in (*clients, "redis") else set()
                                         for c in (*SERVICES, "redis")}
    assert redis_secret_refs(after) == {c: {"team-redis"} if c in (*clients, "redis") else set()
                                        for c in (*SERVICES, "redis")}
    for client in clients:
        env = tandem_container(after, client)["env"]
        names = [e["name"] for e in env]
        password = env[names.index("REDIS_PASSWORD")]
        assert password["valueFrom"]["secretKeyRef"] == {"name": "team-redis", "key": "pw"}
        url = env[names.index(f"TANDEM_{client.upper()}_REDIS_URL")]["value"]
        # defined after the password, so the kubelet expands $(REDIS_PASSWORD) in it
        assert names.index("REDIS_PASSWORD") < names.index(f"TANDEM_{client.upper()}_REDIS_URL")
        assert url == f"redis://:$(REDIS_PASSWORD)@{RELEASE}-tandem-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    external = render(*OVERRIDES["external-redis"])
    assert not of_kind(external, "Secret") and "redis" not in redis_secret_refs(external)
    for client in ("controller", "expert"):  # the default clients
        env = {e["name"]: e for e in tandem_container(external, client)["env"]}
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "shared-redis"
        assert env[f"TANDEM_{client.upper()}_REDIS_URL"]["value"] == \
            "rediss://:$(REDIS_PASSWORD)@redis.example.internal:6379/0"


def test_the_controller_reads_the_expert_statistics_and_gets_the_rebalance_settings(tmp_path):
    """By default the controller is a Redis client with the expert servers (the same URL), so load balancing
    works on demand; controller.rebalance becomes its ControllerConfig settings."""
    from tandem.cluster.config import ControllerConfig, build_config

    objects = render()
    urls = {c: {e["name"]: e.get("value") for e in tandem_container(objects, c)["env"]}[f"TANDEM_{c.upper()}_REDIS_URL"]
            for c in ("controller", "expert")}
    assert urls["controller"] == urls["expert"]
    settings = {k: v for k, v in service_config(objects, "controller").items()
                if k.startswith("rebalance_") or k in ("eplb_policy", "num_nodes", "stage_timeout_s", "ack_timeout_s")}
    assert settings == {"rebalance_interval_s": 0, "rebalance_min_gain": 0.01, "rebalance_margin": 0,
                        "rebalance_windows": 6, "rebalance_decay": 0.8, "eplb_policy": "auto", "num_nodes": 1,
                        "stage_timeout_s": 120, "ack_timeout_s": 30}

    args = ("--set", "controller.rebalance.intervalSeconds=30", "--set", "controller.rebalance.policy=hierarchical",
            "--set", "controller.rebalance.nodes=2", "--set", "controller.rebalance.minGain=0.05")
    path = tmp_path / "controller.yaml"
    path.write_text(yaml.safe_dump(service_config(render(*args), "controller")))
    config = build_config(ControllerConfig, "controller", environ={"TANDEM_CONTROLLER_REDIS_URL": urls["controller"]},
                          yaml_path=path)
    assert (config.rebalance_interval_s, config.eplb_policy, config.num_nodes, config.rebalance_min_gain) == \
        (30.0, "hierarchical", 2, 0.05)
    assert config.redis_url == urls["controller"] and "$(REDIS_PASSWORD)" not in config.redis_url_redacted

    deepseek = service_config(render(*PRESETS["deepseek-v3"]), "controller")
    assert (deepseek["rebalance_interval_s"], deepseek["eplb_policy"]) == (600, "global")


def test_service_configs_load_into_the_services_own_config_classes(tmp_path):
    """Each service's YAML from the ConfigMap, with its pod's TANDEM_* variables, builds that service's config:
    no key the service does not know, every value of the right type."""
    from services.expert.server import ExpertServerConfig
    from services.gateway.server import GatewayConfig
    from tandem.cluster.config import ControllerConfig, build_config
    from tandem.cluster.worker import WorkerConfig

    classes = {"controller": ControllerConfig, "gateway": GatewayConfig, "prefill": WorkerConfig,
               "decode": WorkerConfig, "expert": ExpertServerConfig}
    for preset in PRESETS:
        objects = render(*PRESETS[preset])
        for service, cls in classes.items():
            path = tmp_path / f"{preset}-{service}.yaml"
            path.write_text(yaml.safe_dump(service_config(objects, service)))
            container = tandem_container(objects, service)
            env = {e["name"]: e.get("value", "filled-in-by-kubernetes") for e in container["env"]
                   if e["name"].startswith("TANDEM_")}  # valueFrom: the pod's fields
            config = build_config(cls, service, environ=env, yaml_path=path)
            assert config.port == next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
            assert config.metrics_port == next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
            if service == "controller":
                assert config.namespace == NAMESPACE and config.discovery == "kubernetes"
                assert set(config.pod_selector.split(",")) == {f"app.kubernetes.io/instance={RELEASE}",
                                                               "app.kubernetes.io/name=tandem"}
                assert config.store_host == f"{RELEASE}-tandem-controller.{NAMESPACE}.svc.cluster.local"
            else:
                assert config.controller == f"{RELEASE}-tandem-controller.{NAMESPACE}.svc.cluster.local:50050"
            if service == "expert":
                assert config.node == "filled-in-by-kubernetes"


def notes(tmp_path: Path, *args: str) -> str:
    """NOTES.txt rendered (`helm template` skips it and `helm install --dry-run` wants a cluster): a copy of the
    chart renders it through `tpl` into a ConfigMap-like document."""
    chart = tmp_path / "tandem"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes-source.txt")
    (chart / "templates" / "notes.yaml").write_text('notes: {{ tpl (.Files.Get "notes-source.txt") . | toJson }}\n')
    out = run_helm("template", RELEASE, str(chart), "--namespace", NAMESPACE, "--show-only", "templates/notes.yaml",
                   *args)
    return yaml.safe_load(out)["notes"]


def test_notes_say_how_to_reach_the_gateway(tmp_path):
    text = notes(tmp_path)
    assert f"kubectl -n {NAMESPACE} port-forward svc/{RELEASE}-tandem-gateway 50051:50051" in text
    assert "tandem generate --gateway $GATEWAY --prompt" in text
    assert "grpcurl -plaintext -d" in text and "$GATEWAY tandem.v1.Gateway/Generate" in text
    assert "tandem eplb rebalance --controller 127.0.0.1:50050" in text  # load balancing, on demand
    public = notes(tmp_path / "public", *OVERRIDES["public-gateway"])
    assert f"port-forward svc/{RELEASE}-tandem-gateway" not in public
    assert ".status.loadBalancer.ingress[0]" in public
    assert "gateway x1-4," in public


def test_bad_values_fail_with_a_message():
    for args, message in ((["--set", "model.source=s3"], 'model.source "s3" is not one of image, pvc, hostPath'),
                          (["--set", "model.source=pvc"], "set model.pvc.claimName"),
                          (["--set", "redis.enabled=false", "--set", "redis.auth.existingSecret=r"],
                           "set redis.external.host"),
                          (["--set", "redis.enabled=false", "--set", "redis.external.host=r"],
                           "redis.auth.existingSecret"),
                          (["--set", "device=tpu"], 'device "tpu" is not one of cpu, cuda'),
                          (["--set", "redis.clients={expert}", "--set", "controller.rebalance.intervalSeconds=60"],
                           "add controller to redis.clients"),
                          (["--set", "controller.rebalance.policy=random"],
                           'controller.rebalance.policy "random" is not one of'),
                          (["--set", "controller.discovery=dns"], "controller.discovery")):
        done = subprocess.run([helm(), "template", RELEASE, str(CHART), *args], capture_output=True, text=True)
        assert done.returncode != 0 and message in done.stderr, (args, done.stderr)
