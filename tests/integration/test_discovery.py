"""Kubernetes discovery with the real `kubernetes` client against a local API server that speaks the real wire
format (pod lists, and watches as chunked streams of JSON events), and the controller's membership following it:
a pod deleted mid-watch marks its member down at once, and its replacement takes the slot and rank back."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import grpc
import pytest

from services.controller.server import ControllerServer
from tandem.cluster.config import ConfigError, ControllerConfig, build_config
from tandem.cluster.discovery import DiscoveryError, PodWatcher, connect, watch_pools
from tandem.cluster.membership import Membership, Role, Shape
from tandem.model.presets import preset_config
from tandem.v1 import controller_pb2 as pb
from tandem.v1 import controller_pb2_grpc as pb_grpc

NS = "inference"
TOKEN = "test-token"
RELEASE = {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/instance": "t"}
SELECTOR = "app.kubernetes.io/instance=t,app.kubernetes.io/name=tandem"
ROLE_LABEL = "app.kubernetes.io/component"
WAIT_S = 10.0


def pod(name: str, role: str, ip: str, ready: bool, phase: str = "Running") -> dict:
    """A Pod as the API server serialises it (the fields discovery reads, and enough besides to look real)."""
    return {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": NS, "uid": str(uuid.uuid4()), "resourceVersion": "0",
                     "creationTimestamp": "2025-05-16T19:01:00Z",
                     "labels": {**RELEASE, ROLE_LABEL: role, "statefulset.kubernetes.io/pod-name": name}},
        "spec": {"containers": [{"name": role, "image": "tandem:0.1.0",
                                 "args": ["serve", role, "--config", f"/etc/tandem/{role}.yaml"]}],
                 "hostname": name, "subdomain": f"t-tandem-{role}", "restartPolicy": "Always"},
        "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}] if ip else [],
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                   "lastTransitionTime": "2025-05-16T19:02:00Z"}]},
    }


def selects(selector: str, labels: dict) -> bool:
    """Kubernetes label-selector matching for the forms discovery sends: `k=v` and `k in (a,b)`."""
    for term in re.split(r",(?![^()]*\))", selector):
        if m := re.fullmatch(r"\s*(\S+)\s+in\s+\(([^)]*)\)\s*", term):
            if labels.get(m[1]) not in [v.strip() for v in m[2].split(",")]:
                return False
        elif labels.get(term.partition("=")[0].strip()) != term.partition("=")[2].strip():
            return False
    return True


class FakeKubeApi:
    """The pods of one namespace behind /api/v1/namespaces/NS/pods: list, and watch from a resourceVersion
    (events after it, then new ones as they happen, until timeoutSeconds). `expire_next_watch` answers the next
    watch with 410 Gone, as a real server does for a version it has compacted away."""

    def __init__(self):
        self.version = 100
        self.pods: dict[str, dict] = {}
        self.events: list[tuple[int, str, dict]] = []  # (resourceVersion, type, pod)
        self.requests: list[tuple[dict, str]] = []  # (query, Authorization header)
        self.expire_next_watch = False
        self.changed = threading.Condition()
        self.stopping = False
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def put(self, obj: dict, event: str | None = None) -> None:
        """Create or change a pod; `event` None changes it silently (no watch event: as if compacted away)."""
        with self.changed:
            self.version += 1
            obj["metadata"]["resourceVersion"] = str(self.version)
            self.pods[obj["metadata"]["name"]] = obj
            if event:
                self.events.append((self.version, event, json.loads(json.dumps(obj))))
            self.changed.notify_all()

    def delete(self, name: str, silently: bool = False) -> None:
        with self.changed:
            self.version += 1
            obj = self.pods.pop(name)
            obj["metadata"]["resourceVersion"] = str(self.version)
            obj["metadata"]["deletionTimestamp"] = "2025-05-16T19:10:00Z"
            if not silently:
                self.events.append((self.version, "DELETED", obj))
            self.changed.notify_all()

    def watches(self) -> list[dict]:
        return [q for q, _ in self.requests if q.get("watch") == ["true"]]

    def close(self) -> None:
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        self.http.shutdown()
        self.http.server_close()

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlparse(self.path)
                query = parse_qs(url.query)
                api.requests.append((query, self.headers.get("Authorization", "")))
                if url.path != f"/api/v1/namespaces/{NS}/pods":
                    return self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                            "reason": "NotFound", "code": 404, "message": f"{url.path} not found"})
                selector = query.get("labelSelector", [""])[0]
                if query.get("watch") == ["true"]:
                    return self._watch(selector, int(query["resourceVersion"][0]),
                                       float(query.get("timeoutSeconds", ["300"])[0]))
                with api.changed:
                    items = [p for p in api.pods.values() if selects(selector, p["metadata"]["labels"])]
                    self._json(200, {"kind": "PodList", "apiVersion": "v1",
                                     "metadata": {"resourceVersion": str(api.version)}, "items": items})

            def _json(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _watch(self, selector: str, since: int, timeout_s: float) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                deadline = time.monotonic() + timeout_s
                try:
                    if api.expire_next_watch:
                        api.expire_next_watch = False
                        return self._chunk({"type": "ERROR", "object": {
                            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": f"too old resource version: {since}", "reason": "Expired", "code": 410}})
                    while True:
                        with api.changed:
                            pending = [e for e in api.events
                                       if e[0] > since and selects(selector, e[2]["metadata"]["labels"])]
                            if not pending:
                                api.changed.wait(max(0.0, min(0.2, deadline - time.monotonic())))
                        for version, kind, obj in pending:
                            self._chunk({"type": kind, "object": obj})
                            since = version
                        if api.stopping or time.monotonic() >= deadline:
                            return
                except (BrokenPipeError, ConnectionResetError):  # the client closed the watch
                    self.close_connection = True
                finally:
                    if not self.close_connection:
                        self.wfile.write(b"0\r\n\r\n")

            def _chunk(self, event: dict) -> None:
                data = json.dumps(event).encode() + b"\n"
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        return Handler


@pytest.fixture
def api():
    server = FakeKubeApi()
    yield server
    server.close()


@pytest.fixture
def kubeconfig(api, tmp_path) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": api.url}}],
        "users": [{"name": "tandem", "user": {"token": TOKEN}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "tandem", "namespace": NS}}]}))
    return str(path)


class Recorder:
    def __init__(self):
        self.changes: list[tuple[str, str]] = []
        self.cond = threading.Condition()

    def __call__(self, change, p) -> None:
        with self.cond:
            self.changes.append((p.name, change.value))
            self.cond.notify_all()

    def wait_for(self, n: int) -> list[tuple[str, str]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.changes) >= n, WAIT_S), self.changes
            return list(self.changes)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def test_watcher_reports_added_ready_and_deleted_pods(api, kubeconfig):
    api.put(pod("t-tandem-prefill-0", "prefill", "10.0.0.10", ready=True))
    api.put(pod("t-tandem-decode-0", "decode", "10.0.0.11", ready=False))
    api.put(pod("t-tandem-gateway-5d8f", "gateway", "10.0.0.2", ready=True))  # not a pool: never reported
    seen = Recorder()
    watcher = PodWatcher(connect(kubeconfig), NS, SELECTOR, ROLE_LABEL, on_change=seen, watch_timeout_s=30).start()
    try:
        assert watcher.wait_synced(WAIT_S)
        assert seen.wait_for(3) == [("t-tandem-prefill-0", "added"), ("t-tandem-prefill-0", "ready"),
                                    ("t-tandem-decode-0", "added")]
        wait_until(lambda: api.watches(), "the watch is open")
        api.put(pod("t-tandem-decode-0", "decode", "10.0.0.11", ready=True), "MODIFIED")
        api.put(pod("t-tandem-expert-0", "expert", "", ready=False), "ADDED")
        api.put(pod("t-tandem-expert-0", "expert", "10.0.0.12", ready=True), "MODIFIED")
        api.delete("t-tandem-prefill-0")
        assert seen.wait_for(7)[3:] == [("t-tandem-decode-0", "ready"), ("t-tandem-expert-0", "added"),
                                        ("t-tandem-expert-0", "ready"), ("t-tandem-prefill-0", "deleted")]
        assert [(p.name, p.role, p.ip, p.is_ready) for p in watcher.pods()] == [
            ("t-tandem-decode-0", Role.DECODE, "10.0.0.11", True),
            ("t-tandem-expert-0", Role.EXPERT, "10.0.0.12", True)]
    finally:
        watcher.stop()
    # every request: the pools' label selector, the kubeconfig's token; the watch resumed from the list's version
    pools = f"{SELECTOR},{ROLE_LABEL} in (prefill,decode,expert)"
    assert {q["labelSelector"][0] for q, _ in api.requests} == {pools}
    assert {auth for _, auth in api.requests} == {f"Bearer {TOKEN}"}
    assert api.watches()[0]["resourceVersion"] == ["103"] and api.watches()[0]["allowWatchBookmarks"] == ["true"]


def test_expired_watch_lists_again_and_reports_pods_gone_meanwhile(api, kubeconfig):
    api.put(pod("t-tandem-decode-0", "decode", "10.0.0.30", ready=True))
    api.put(pod("t-tandem-decode-1", "decode", "10.0.0.31", ready=True))
    seen = Recorder()
    watcher = PodWatcher(connect(kubeconfig), NS, SELECTOR, ROLE_LABEL, on_change=seen, watch_timeout_s=1).start()
    try:
        seen.wait_for(4)
        wait_until(lambda: api.watches(), "the watch is open")
        # the watch after this one's timeout is answered 410 Gone, and decode-1's DELETED event is compacted away:
        # only the list that follows the 410 can tell discovery it is gone
        api.expire_next_watch = True
        api.delete("t-tandem-decode-1", silently=True)
        assert seen.wait_for(5)[4] == ("t-tandem-decode-1", "deleted")
        assert [p.name for p in watcher.pods()] == ["t-tandem-decode-0"]
        assert sum(q.get("watch") != ["true"] for q, _ in api.requests) == 2  # listed again after the 410
    finally:
        watcher.stop()


def test_stop_ends_a_blocked_watch_at_once(api, kubeconfig):
    watcher = PodWatcher(connect(kubeconfig), NS, SELECTOR, ROLE_LABEL, on_change=Recorder(),
                         watch_timeout_s=300).start()
    wait_until(lambda: api.watches(), "the watch is open")
    start = time.monotonic()
    watcher.stop()
    assert time.monotonic() - start < 2.0 and not watcher._thread.is_alive()


def test_follow_marks_only_the_deleted_pods_members_down(api, kubeconfig):
    membership = Membership(Shape(1, 2, 0, num_gateways=0), heartbeat_timeout_s=60.0)
    by_name = membership.register(Role.DECODE, f"t-tandem-decode-0.t-tandem-decode.{NS}.svc.cluster.local:50062")
    by_ip = membership.register(Role.DECODE, "10.0.0.41:50062")
    prefill = membership.register(Role.PREFILL, "t-tandem-prefill-0:50061")
    api.put(pod("t-tandem-decode-0", "decode", "10.0.0.40", ready=True))
    api.put(pod("t-tandem-decode-1", "decode", "10.0.0.41", ready=True))
    api.put(pod("t-tandem-prefill-0", "prefill", "10.0.0.42", ready=True))
    watcher = watch_pools(membership, namespace=NS, pod_selector=SELECTOR, role_label=ROLE_LABEL,
                          kubeconfig=kubeconfig).start()
    try:
        assert watcher.wait_synced(WAIT_S)
        wait_until(lambda: api.watches(), "the watch is open")
        api.delete("t-tandem-decode-1")
        wait_until(lambda: not membership.get(by_ip.member_id).is_alive, "the member at the pod's IP is down")
        api.delete("t-tandem-decode-0")
        wait_until(lambda: not membership.get(by_name.member_id).is_alive, "the member at the pod's name is down")
        assert membership.get(prefill.member_id).is_alive
    finally:
        watcher.stop()


@pytest.fixture
def model_dir(tmp_path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(preset_config("tiny").to_dict()))
    return tmp_path


def test_controller_marks_the_member_of_a_pod_deleted_mid_watch_down(api, kubeconfig, model_dir):
    """The controller follows the pods: the deleted decode pod's member goes down (ListMembers: not ready) at once,
    long before its heartbeat timeout, and the StatefulSet's replacement pod takes its slot and rank back."""
    pods = {"prefill": "10.0.1.10", "decode": "10.0.1.11", "expert": "10.0.1.12"}
    for role, ip in pods.items():
        api.put(pod(f"t-tandem-{role}-0", role, ip, ready=False))
    config = ControllerConfig(model_dir=str(model_dir), host="127.0.0.1", port=0, store_port=0, num_prefill=1,
                              num_decode=1, num_expert_servers=1, heartbeat_timeout_s=60.0, grace_s=0.2,
                              discovery="kubernetes", namespace=NS, pod_selector=SELECTOR, role_label=ROLE_LABEL,
                              kubeconfig=kubeconfig)
    controller = ControllerServer(config).start()
    roles = {"prefill": pb.ROLE_PREFILL, "decode": pb.ROLE_DECODE, "expert": pb.ROLE_EXPERT}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
            stub = pb_grpc.ControllerStub(channel)
            members = {}
            for role in pods:
                address = f"t-tandem-{role}-0.t-tandem-{role}.{NS}.svc.cluster.local:5006{len(members)}"
                members[role] = stub.Register(pb.RegisterRequest(role=roles[role], address=address)).member
                stub.Heartbeat(pb.HeartbeatRequest(member_id=members[role].member_id, is_ready=True))
                api.put(pod(f"t-tandem-{role}-0", role, pods[role], ready=True), "MODIFIED")

            def ready() -> dict[str, bool]:
                listed = stub.ListMembers(pb.ListMembersRequest()).members
                return {m.member_id: m.is_ready for m in listed}

            assert all(ready().values())
            wait_until(lambda: controller.discovery.pods() and all(p.is_ready for p in controller.discovery.pods()),
                       "discovery sees every pod ready")
            api.delete("t-tandem-decode-0")  # mid-watch
            wait_until(lambda: not ready()[members["decode"].member_id], "the decode member is not ready")
            assert not controller.membership.get(members["decode"].member_id).is_alive
            assert ready() == {members["prefill"].member_id: True, members["decode"].member_id: False,
                               members["expert"].member_id: True}
            assert [p.name for p in controller.discovery.pods()] == ["t-tandem-prefill-0", "t-tandem-expert-0"]
            # the replacement (same pod name, a new IP) registers under the same stable name: same slot and rank
            api.put(pod("t-tandem-decode-0", "decode", "10.0.1.99", ready=False), "ADDED")
            again = stub.Register(pb.RegisterRequest(role=pb.ROLE_DECODE, address=members["decode"].address)).member
            assert (again.member_id, again.index, again.rank) == (members["decode"].member_id, 0, 1)
    finally:
        controller.stop()
    assert not controller.discovery._thread.is_alive()


def test_config_and_startup_errors(kubeconfig, model_dir, monkeypatch):
    with pytest.raises(ConfigError, match="discovery"):
        ControllerConfig(model_dir=str(model_dir), discovery="consul")
    with pytest.raises(ConfigError, match="discovery: 'dns' is not one of static, kubernetes"):
        build_config(ControllerConfig, "controller", environ={"TANDEM_CONTROLLER_MODEL_DIR": str(model_dir),
                                                                "TANDEM_CONTROLLER_DISCOVERY": "dns"})
    config = build_config(ControllerConfig, "controller", environ={
        "TANDEM_CONTROLLER_MODEL_DIR": str(model_dir), "TANDEM_CONTROLLER_DISCOVERY": "kubernetes",
        "TANDEM_CONTROLLER_NAMESPACE": NS})
    assert (config.discovery, config.namespace) == ("kubernetes", NS)
    assert config.pod_selector == "app.kubernetes.io/name=tandem"
    assert ControllerConfig(model_dir=str(model_dir)).discovery == "static"
    # outside a pod: no service account, so no API and no namespace, each said plainly
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(DiscoveryError, match="in-cluster service account"):
        ControllerServer(config)
    with pytest.raises(DiscoveryError, match="set --namespace"):
        watch_pools(Membership(Shape(1, 1, 1), 3.0), namespace="", pod_selector=SELECTOR, role_label=ROLE_LABEL,
                    kubeconfig=kubeconfig)
