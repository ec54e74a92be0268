"""Discovery: how the controller learns the pods of the prefill, decode and expert pools.

`--discovery static` (make up, docker-compose): there is nothing to watch; members register and heartbeat, and
a member whose heartbeats stop is down after `heartbeat_timeout_s` (see `tandem.cluster.membership`).

`--discovery kubernetes`: a `PodWatcher` lists and watches the pools' pods in one namespace through the
Kubernetes API (one label selector over the deployment's pods; the pool is the value of `role_label`) and
reports each change: pod added, ready, not ready, deleted. `follow` turns the reports into membership: the
members registered from a deleted pod (or one whose containers have all ended: phase Failed or Succeeded) are
marked down at once, so no gateway routes to them while their last heartbeat would still count them alive.

A member belongs to a pod when the role matches and the host it registered (`host:port`) is the pod's stable
DNS name (`<pod>.<service>.<namespace>.svc.<domain>`, what the Helm chart's StatefulSets register), its bare
name or its IP.

Watch protocol: list (at resourceVersion R), then watch from R; when the server ends a watch
(`watch_timeout_s`) watch again from the last version seen (bookmarks keep it fresh); when it answers
410 Gone (R too old) list again, and report the pods missing from the new list as deleted; after any other
API or connection error wait `retry_s` and list again.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import urllib3
from kubernetes import client, watch
from kubernetes import config as kube_config
from kubernetes.client.rest import ApiException

from tandem.cluster.membership import Member, Membership, Role, UnknownMember

log = logging.getLogger(__name__)
POOLS = (Role.PREFILL, Role.DECODE, Role.EXPERT)
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
ENDED_PHASES = ("Failed", "Succeeded")  # every container has terminated and will not restart
CONNECT_TIMEOUT_S = 10.0
LIST_TIMEOUT_S = 30.0


class DiscoveryError(ValueError):
    """Discovery cannot start: no cluster to talk to, or no namespace to watch."""


class PodChange(enum.Enum):
    ADDED = "added"
    READY = "ready"
    NOT_READY = "not ready"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class Pod:
    """What discovery keeps of one pool pod; `ip` is empty until the pod is scheduled."""

    name: str
    role: Role
    ip: str
    is_ready: bool

    def holds(self, member: Member) -> bool:
        """Whether `member` registered from this pod: same role, and its host is the pod's DNS name, name or IP."""
        if member.role is not self.role:
            return False
        host = member.address.rpartition(":")[0].strip("[]")
        return host == self.name or host.startswith(self.name + ".") or (bool(self.ip) and host == self.ip)


def pool_pod(obj: client.V1Pod, role_label: str) -> Pod | None:
    """A pod of the API as a `Pod`, or None when its `role_label` names no pool."""
    labels = obj.metadata.labels or {}
    if labels.get(role_label) not in {role.value for role in POOLS}:
        return None
    status = obj.status or client.V1PodStatus()
    is_ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or ())
    return Pod(name=obj.metadata.name, role=Role(labels[role_label]), ip=status.pod_ip or "", is_ready=is_ready)


def has_ended(obj: client.V1Pod) -> bool:
    return obj.status is not None and obj.status.phase in ENDED_PHASES


class PodWatcher:
    """Lists and watches the pools' pods and calls `on_change(change, pod)` for each change, on its own thread
    between `start` and `stop`. `pods()` is the current view; `wait_synced` waits for the first list."""

    def __init__(self, api: client.CoreV1Api, namespace: str, pod_selector: str, role_label: str,
                 on_change: Callable[[PodChange, Pod], None], watch_timeout_s: int = 300, retry_s: float = 2.0):
        if not namespace:
            raise DiscoveryError("namespace: empty")
        self.api = api
        self.namespace = namespace
        self.role_label = role_label
        pools = ",".join(role.value for role in POOLS)
        self.label_selector = ",".join(filter(None, (pod_selector, f"{role_label} in ({pools})")))
        self.on_change = on_change
        self.watch_timeout_s = watch_timeout_s
        self.retry_s = retry_s
        self._pods: dict[str, Pod] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "PodWatcher":
        log.info("watching the pods of %s in namespace %s", self.label_selector, self.namespace)
        self._thread = threading.Thread(target=self._run, daemon=True, name="pod-watcher")
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()  # shuts the stream's socket down, so a blocked read returns now
        if self._thread is not None:
            self._thread.join(timeout_s)

    def pods(self) -> list[Pod]:
        with self._lock:
            return sorted(self._pods.values(), key=lambda p: (POOLS.index(p.role), p.name))

    def wait_synced(self, timeout_s: float | None = None) -> bool:
        """Whether the first list has been applied (waits up to `timeout_s`)."""
        return self._synced.wait(timeout_s)

    def _run(self) -> None:
        version: str | None = None
        while not self._stopping.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self._watch_from(version)
            except ApiException as e:
                version = None
                if e.status == 410:
                    log.info("pod watch expired (410 Gone): listing again")
                    continue
                log.warning("Kubernetes API answered %s %s; listing again in %.0f s", e.status, e.reason,
                            self.retry_s)
                self._stopping.wait(self.retry_s)
            except (urllib3.exceptions.HTTPError, OSError) as e:
                version = None
                if not self._stopping.is_set():
                    log.warning("Kubernetes API unreachable (%s); listing again in %.0f s", e, self.retry_s)
                    self._stopping.wait(self.retry_s)

    def _list(self) -> str:
        """Apply a fresh list (pods known but missing from it are deleted); returns its resourceVersion."""
        reply = self.api.list_namespaced_pod(self.namespace, label_selector=self.label_selector,
                                             _request_timeout=(CONNECT_TIMEOUT_S, LIST_TIMEOUT_S))
        listed = {obj.metadata.name for obj in reply.items}
        for pod in [pod for pod in self.pods() if pod.name not in listed]:
            self._update(pod, is_gone=True)
        for obj in reply.items:
            pod = pool_pod(obj, self.role_label)
            if pod is not None:
                self._update(pod, is_gone=has_ended(obj))
        self._synced.set()
        return reply.metadata.resource_version

    def _watch_from(self, version: str) -> str:
        """Apply watch events from `version` until the server ends the watch; returns the last version seen."""
        self._watch = watch.Watch()
        stream = self._watch.stream(self.api.list_namespaced_pod, self.namespace,
                                    label_selector=self.label_selector, resource_version=version,
                                    allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout_s,
                                    _request_timeout=(CONNECT_TIMEOUT_S, self.watch_timeout_s + LIST_TIMEOUT_S))
        for event in stream:
            if event["type"] == "BOOKMARK":
                version = event["raw_object"]["metadata"]["resourceVersion"]
                continue
            obj = event["object"]
            version = obj.metadata.resource_version or version
            pod = pool_pod(obj, self.role_label)
            if pod is not None:
                self._update(pod, is_gone=event["type"] == "DELETED" or has_ended(obj))
            if self._stopping.is_set():
                break
        return version

    def _update(self, pod: Pod, is_gone: bool) -> None:
        with self._lock:
            old = self._pods.pop(pod.name, None) if is_gone else self._pods.get(pod.name)
            if not is_gone:
                self._pods[pod.name] = pod
        if is_gone:
            changes = [PodChange.DELETED] if old is not None else []
        else:
            changes = [PodChange.ADDED] if old is None else []
            if pod.is_ready != (old is not None and old.is_ready):
                changes.append(PodChange.READY if pod.is_ready else PodChange.NOT_READY)
        for change in changes:
            self.on_change(change, pod)


def follow(membership: Membership) -> Callable[[PodChange, Pod], None]:
    """An `on_change` for `PodWatcher` that logs the pools' pods and marks the members of a deleted pod down."""

    def on_change(change: PodChange, pod: Pod) -> None:
        if change is not PodChange.DELETED:
            log.info("%s pod %s (%s) %s", pod.role.value, pod.name, pod.ip or "no IP yet", change.value)
            return
        down = []
        for member in membership.members(pod.role):
            if member.is_alive and pod.holds(member):
                try:
                    membership.mark_down(member.member_id)
                except UnknownMember:  # replaced by a new member meanwhile: gone already
                    continue
                down.append(member)
        log.warning("%s pod %s deleted: %s", pod.role.value, pod.name,
                    "marked down " + ", ".join(f"{m.member_id} (index {m.index}, rank {m.rank})" for m in down)
                    if down else "no live member had registered from it")

    return on_change


def connect(kubeconfig: str = "") -> client.CoreV1Api:
    """The core API of the cluster this process runs in (its service account), or of `kubeconfig`'s context."""
    try:
        if kubeconfig:
            return client.CoreV1Api(kube_config.new_client_from_config(config_file=kubeconfig, persist_config=False))
        configuration = client.Configuration()
        kube_config.load_incluster_config(client_configuration=configuration)
        return client.CoreV1Api(client.ApiClient(configuration))
    except kube_config.ConfigException as e:
        where = kubeconfig or "the in-cluster service account (not running in a pod? set --kubeconfig)"
        raise DiscoveryError(f"cannot reach the Kubernetes API with {where}: {e}") from None


def own_namespace() -> str:
    """The namespace of the pod this process runs in, from its service account."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except FileNotFoundError:
        raise DiscoveryError(f"namespace: empty and {SERVICE_ACCOUNT_NAMESPACE} does not exist (not running in a "
                             "pod?): set --namespace") from None


def watch_pools(membership: Membership, *, namespace: str, pod_selector: str, role_label: str,
                kubeconfig: str = "") -> PodWatcher:
    """A `PodWatcher` (not started) whose changes `membership` follows."""
    return PodWatcher(connect(kubeconfig), namespace or own_namespace(), pod_selector, role_label,
                      on_change=follow(membership))
