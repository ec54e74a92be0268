"""The controller over real gRPC on loopback: membership and ranks, heartbeats, the rendezvous store, the
versioned placement (get, watch, ack), status codes for bad input, health, reflection, config and CLI; expert
load balancing against a real redis-server (Rebalance, Redis outages, metrics) with the expert servers' gRPC API
played by fakes (the whole cluster's rebalance is in test_eplb_online.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch
import torch.distributed as dist
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import free_port
from services.controller.server import ControllerServer, main
from tandem.cluster.config import ConfigError, ControllerConfig, build_config
from tandem.cluster.placement_store import PlacementStore, static_phy2log
from tandem.eplb.stats import ExpertLoadRecorder, connect
from tandem.model.presets import preset_config
from tandem.v1 import controller_pb2 as pb
from tandem.v1 import controller_pb2_grpc as pb_grpc
from tandem.v1 import expert_pb2 as epb
from tandem.v1 import expert_pb2_grpc as epb_grpc

ROOT = Path(__file__).resolve().parents[2]
E = 16  # the tiny preset's routed experts
L = 5  # its MoE layers: 3 main (one of 4 is dense) + 2 MTP modules


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-config")
    (out / "config.json").write_text(json.dumps(preset_config("tiny").to_dict()))
    return out


def start(model_dir: Path, **overrides) -> ControllerServer:
    settings = dict(model_dir=str(model_dir), host="127.0.0.1", port=0, store_port=0, num_prefill=2,
                    num_decode=1, num_expert_servers=2, grace_s=0.5) | overrides
    return ControllerServer(ControllerConfig(**settings)).start()


@pytest.fixture(scope="module")
def controller(model_dir):
    server = start(model_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(controller):
    with grpc.insecure_channel(f"127.0.0.1:{controller.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.ControllerStub(channel)


def register(stub, role, address: str) -> pb.RegisterResponse:
    return stub.Register(pb.RegisterRequest(role=role, address=address), timeout=5)


def status_of(call, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        result = call(*args, timeout=5)
        if hasattr(result, "__next__"):  # a stream fails on its first message
            next(result)
    return err.value.code(), err.value.details()


# attention workers first (prefill, then decode), expert servers after them; gateways are off the plane
EXPECTED = [(pb.ROLE_PREFILL, 0, 0), (pb.ROLE_PREFILL, 1, 1), (pb.ROLE_DECODE, 0, 2), (pb.ROLE_EXPERT, 0, 3),
            (pb.ROLE_EXPERT, 1, 4)]


@pytest.fixture(scope="module")
def registered(stub) -> list[pb.RegisterResponse]:
    """The module's controller with every data-plane slot registered, in EXPECTED's order."""
    return [register(stub, role, f"10.0.0.{n}:7000") for n, (role, _, _) in enumerate(EXPECTED)]


def test_roles_get_the_documented_ranks_and_the_data_plane(controller, stub, registered):
    for reply, (role, index, rank) in zip(registered, EXPECTED, strict=True):
        assert (reply.member.role, reply.member.index, reply.member.rank) == (role, index, rank)
        assert reply.member.member_id and not reply.member.is_ready
        assert reply.data_plane == pb.DataPlane(store_host="127.0.0.1", store_port=controller.store.port,
                                                world_size=5, backend="gloo")
        assert reply.heartbeat_interval_ms == 1000
    gateway = register(stub, pb.ROLE_GATEWAY, "10.0.0.9:8000")
    assert gateway.member.rank == -1 and not gateway.HasField("data_plane")

    # the announced store is the real rendezvous: a rank can connect and share keys through it
    client = dist.TCPStore("127.0.0.1", controller.store.port, None, is_master=False, wait_for_workers=False)
    client.set("tandem-test", "hello")
    assert controller.store.get("tandem-test") == b"hello"

    listed = stub.ListMembers(pb.ListMembersRequest(role=pb.ROLE_EXPERT), timeout=5).members
    assert [(m.index, m.rank, m.address) for m in listed] == [(0, 3, "10.0.0.3:7000"), (1, 4, "10.0.0.4:7000")]
    assert len(stub.ListMembers(pb.ListMembersRequest(), timeout=5).members) == 6


def test_reregister_and_full_role(model_dir):
    server = start(model_dir, num_prefill=1, num_decode=1, num_expert_servers=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.ControllerStub(ch)
            first = register(stub, pb.ROLE_DECODE, "10.0.1.1:7000")
            again = register(stub, pb.ROLE_DECODE, "10.0.1.1:7000")
            assert again.member.member_id == first.member.member_id and again.member.rank == first.member.rank == 1
            code, message = status_of(stub.Register, pb.RegisterRequest(role=pb.ROLE_DECODE, address="10.0.1.2:7000"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "all 1 decode slots" in message and "10.0.1.1:7000" in message
    finally:
        server.stop()


def test_expert_servers_of_one_node_get_one_block_of_indices(model_dir):
    """num_nodes 2, 4 expert servers: a node's servers get indices 0-1 or 2-3 whatever order they register in."""
    server = start(model_dir, num_prefill=1, num_decode=1, num_expert_servers=4, num_nodes=2,
                   heartbeat_interval_s=0.1, heartbeat_timeout_s=0.4)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.ControllerStub(ch)

            def expert(address: str, node: str) -> pb.Member:
                return stub.Register(pb.RegisterRequest(role=pb.ROLE_EXPERT, address=address, node=node),
                                     timeout=5).member

            b1 = expert("10.0.3.1:7000", "node-b")
            a1 = expert("10.0.3.2:7000", "node-a")
            a2 = expert("10.0.3.3:7000", "node-a")
            assert (b1.index, a1.index, a2.index) == (0, 2, 3) and a1.node == "node-a"
            code, message = status_of(stub.Register, pb.RegisterRequest(role=pb.ROLE_EXPERT, address="10.0.3.4:7000",
                                                                         node="node-a"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "node 'node-a' already runs its 2 expert servers" \
                in message
            code, message = status_of(stub.Register, pb.RegisterRequest(role=pb.ROLE_EXPERT, address="10.0.3.5:7000"))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "must say which node it runs on" in message
            code, message = status_of(stub.Register, pb.RegisterRequest(role=pb.ROLE_EXPERT, address="10.0.3.6:7000",
                                                                         node="node-c"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "held by live servers of another node" in message
            assert expert("10.0.3.7:7000", "node-b").index == 1
            assert expert("10.0.3.2:7000", "node-a").member_id == a1.member_id  # a restart keeps its slot

            # only node-b's first server stays alive; a third node takes node-a's block over
            b2 = expert("10.0.3.7:7000", "node-b")
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                stub.Heartbeat(pb.HeartbeatRequest(member_id=b1.member_id, is_ready=True), timeout=5)
                time.sleep(0.05)
            assert expert("10.0.3.6:7000", "node-c").index == 2
            # node-a's other server comes back: its block is node-c's now and node-b's is in use
            code, message = status_of(stub.Register, pb.RegisterRequest(role=pb.ROLE_EXPERT, address="10.0.3.3:7000",
                                                                         node="node-a"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "held by live servers of another node" in message
            assert a2.member_id not in {m.member_id for m in stub.ListMembers(pb.ListMembersRequest()).members}
            assert expert("10.0.3.7:7000", "node-b").member_id == b2.member_id  # node-b's block is still its own
    finally:
        server.stop()


def test_missing_heartbeats_mark_a_member_down_and_a_replacement_takes_its_rank(model_dir):
    server = start(model_dir, num_prefill=2, heartbeat_interval_s=0.1, heartbeat_timeout_s=0.4)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.ControllerStub(ch)
            alive = register(stub, pb.ROLE_PREFILL, "10.0.2.1:7000").member
            silent = register(stub, pb.ROLE_PREFILL, "10.0.2.2:7000").member
            assert stub.Heartbeat(pb.HeartbeatRequest(member_id=silent.member_id, is_ready=True),
                                  timeout=5).placement_version == 1
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                stub.Heartbeat(pb.HeartbeatRequest(member_id=alive.member_id, is_ready=True), timeout=5)
                time.sleep(0.05)
            listed = {m.member_id: m for m in stub.ListMembers(pb.ListMembersRequest(), timeout=5).members}
            assert listed[alive.member_id].is_ready and not listed[silent.member_id].is_ready
            assert not server.membership.get(silent.member_id).is_alive
            assert server.membership.alive_ids() == {alive.member_id}

            # the down member keeps its slot until a replacement of its role registers, then is forgotten
            replacement = register(stub, pb.ROLE_PREFILL, "10.0.2.3:7000").member
            assert (replacement.index, replacement.rank) == (silent.index, silent.rank) == (1, 1)
            code, message = status_of(stub.Heartbeat, pb.HeartbeatRequest(member_id=silent.member_id))
            assert code == grpc.StatusCode.NOT_FOUND and "register again" in message
    finally:
        server.stop()


def test_get_placement_is_the_static_one_each_expert_once_spread_evenly(stub):
    placement = stub.GetPlacement(pb.GetPlacementRequest(), timeout=5)
    assert (placement.version, placement.num_logical_experts, placement.num_slots_per_server) == (1, E, 8)
    assert len(placement.layers) == L
    for layer in placement.layers:
        assert sorted(layer.phy2log) == list(range(E))  # each expert exactly once
        servers = [layer.phy2log[i * 8:(i + 1) * 8] for i in range(2)]
        assert [len(s) for s in servers] == [8, 8]
        assert list(layer.phy2log) == list(range(E))  # contiguous blocks: Placement.identity
    assert stub.GetPlacement(pb.GetPlacementRequest(version=1), timeout=5) == placement


def test_static_placement_with_uneven_servers_and_replicas():
    # 16 experts on 3 servers of 6 slots: blocks of 6, 5, 5, then replicas of experts 0 and 1 on servers 1 and 2
    phy2log = static_phy2log(2, 16, 3, 6)
    assert phy2log.shape == (2, 18) and torch.equal(phy2log[0], phy2log[1])
    servers = phy2log[0].view(3, 6).tolist()
    assert servers == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 0], [11, 12, 13, 14, 15, 1]]
    counts = torch.bincount(phy2log[0], minlength=16)
    assert counts.min() == 1 and counts.sum() == 18
    with pytest.raises(ValueError, match="cannot hold 16 experts"):
        static_phy2log(1, 16, 2, 7)


def test_watch_receives_a_new_version_promptly_and_acks_are_tracked(controller, stub, registered):
    stream = stub.WatchPlacement(pb.WatchPlacementRequest(known_version=0), timeout=10)
    first = next(stream)
    assert first.version == controller.placements.version
    shuffled = torch.tensor(first.layers[0].phy2log).flip(0).repeat(L, 1)
    received = []
    reader = threading.Thread(target=lambda: received.append((next(stream), time.monotonic())))
    reader.start()
    time.sleep(0.2)
    published_at = time.monotonic()
    version = controller.placements.publish(shuffled)
    reader.join(timeout=5)
    stream.cancel()
    newer, arrived_at = received[0]
    assert newer.version == version == first.version + 1
    assert list(newer.layers[2].phy2log) == shuffled[2].tolist()
    assert arrived_at - published_at < 0.5
    assert stub.Heartbeat(pb.HeartbeatRequest(member_id=_member_id(stub, pb.ROLE_DECODE)),
                          timeout=5).placement_version == version

    # a watcher that already has the current version waits for the next one
    quiet = stub.WatchPlacement(pb.WatchPlacementRequest(known_version=version), timeout=0.8)
    code, _ = status_of(lambda *_, **__: quiet)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED

    plane = {m.member_id for m in stub.ListMembers(pb.ListMembersRequest(), timeout=5).members if m.rank >= 0}
    assert not controller.placements.all_acked(version, plane)
    for member_id in sorted(plane):
        stub.AckPlacement(pb.AckPlacementRequest(member_id=member_id, version=version), timeout=5)
        assert controller.placements.acked_version(member_id) == version
    assert controller.placements.all_acked(version, plane)
    assert controller.placements.all_acked(version - 1, plane)


def _member_id(stub, role) -> str:
    return stub.ListMembers(pb.ListMembersRequest(role=role), timeout=5).members[0].member_id


def test_bad_inputs_get_the_right_status_codes(controller, stub, registered):
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    current = controller.placements.version
    cases = [
        (stub.Register, pb.RegisterRequest(role=pb.ROLE_UNSPECIFIED, address="h:1"), invalid, "role 0"),
        (stub.Register, pb.RegisterRequest(role=42, address="h:1"), invalid, "role 42"),
        (stub.Register, pb.RegisterRequest(role=pb.ROLE_EXPERT, address="no-port"), invalid, "not host:port"),
        (stub.Heartbeat, pb.HeartbeatRequest(member_id="nobody"), not_found, "'nobody' is not registered"),
        (stub.Heartbeat, pb.HeartbeatRequest(), invalid, "member_id is empty"),
        (stub.ListMembers, pb.ListMembersRequest(role=9), invalid, "role 9"),
        (stub.GetPlacement, pb.GetPlacementRequest(version=-1), invalid, "negative"),
        (stub.GetPlacement, pb.GetPlacementRequest(version=current + 5), not_found, "never published"),
        (stub.WatchPlacement, pb.WatchPlacementRequest(known_version=-3), invalid, "known_version -3"),
        (stub.AckPlacement, pb.AckPlacementRequest(member_id="nobody", version=1), not_found, "not registered"),
        (stub.AckPlacement, pb.AckPlacementRequest(member_id=_member_id(stub, pb.ROLE_PREFILL), version=0), invalid,
         "at least 1"),
        (stub.AckPlacement, pb.AckPlacementRequest(member_id=_member_id(stub, pb.ROLE_PREFILL), version=current + 1),
         invalid, "never published"),
    ]
    for call, request, code, text in cases:
        got, message = status_of(call, request)
        assert (got, text in message) == (code, True), (request, got, message)


def test_old_versions_beyond_the_history_are_not_found(model_dir):
    store = PlacementStore(static_phy2log(1, 4, 2, 2), 4, 2, history=2)
    for _ in range(3):
        store.publish(torch.tensor([[3, 2, 1, 0]]))
    assert store.version == 4 and store.get(3).version == 3
    with pytest.raises(KeyError, match="version 2 is not kept"):
        store.get(2)
    with pytest.raises(ValueError, match="no physical slot"):
        store.publish(torch.tensor([[0, 0, 1, 2]]))
    with pytest.raises(ValueError, match="shape"):
        store.publish(torch.tensor([[0, 1, 2, 3, 0, 1]]))


def test_health_is_serving_and_reflection_lists_the_services(controller, channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tandem.v1.Controller"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=5)
    names = {s.name for s in next(replies).list_services_response.service}
    assert {"tandem.v1.Controller", "grpc.health.v1.Health"} <= names


def test_shutdown_turns_health_not_serving_and_metrics_are_exported(model_dir):
    metrics_port = free_port()
    server = start(model_dir, metrics_port=metrics_port)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        register(pb_grpc.ControllerStub(ch), pb.ROLE_EXPERT, "10.0.3.1:7000")
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'tandem_controller_members{role="expert",state="alive"} 1.0' in text
    assert "tandem_controller_placement_version 1.0" in text
    server.stop()
    reply = server.health.Check(health_pb2.HealthCheckRequest(service=""), None)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_sigterm_shuts_the_process_down_gracefully(model_dir):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "libs"), str(ROOT)]))
    proc = subprocess.Popen([sys.executable, "-m", "services.controller.server", "--model-dir", str(model_dir),
                             "--host", "127.0.0.1", "--port", str(port), "--store-port", "0", "--grace-s", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=15)
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "controller shutting down" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_help_documents_every_flag(capsys):
    from tandem.cli import main as tandem_main

    for run in (lambda: main(["--help"]), lambda: tandem_main(["serve", "controller", "--help"])):
        with pytest.raises(SystemExit) as exit_:
            run()
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        for name in ControllerConfig.__dataclass_fields__:
            assert "--" + name.replace("_", "-") in out and "TANDEM_CONTROLLER_" + name.upper() in out
        assert "--config" in out


def test_config_precedence_yaml_env_flags(tmp_path, model_dir):
    import argparse

    from tandem.cluster.config import add_config_flags

    yaml_file = tmp_path / "controller.yaml"
    yaml_file.write_text(f"model_dir: {model_dir}\nport: 6000\nnum_decode: 3\nbackend: nccl\n")
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ControllerConfig, "controller")

    def build(argv, env=None):
        return build_config(ControllerConfig, "controller", parser.parse_args(argv), env or {})

    config = build(["--config", str(yaml_file)])
    assert (config.port, config.num_decode, config.backend, config.num_prefill) == (6000, 3, "nccl", 1)
    env = {"TANDEM_CONTROLLER_PORT": "7000", "TANDEM_CONTROLLER_HEARTBEAT_TIMEOUT_S": "9.5", "OTHER": "x"}
    config = build(["--config", str(yaml_file)], env)
    assert (config.port, config.num_decode, config.heartbeat_timeout_s) == (7000, 3, 9.5)
    config = build(["--config", str(yaml_file), "--port", "8000", "--backend", "gloo"], env)
    assert (config.port, config.backend, config.num_decode) == (8000, "gloo", 3)

    bad = [
        (["--config", str(yaml_file), "--port", "eighty"], {}, "port: 'eighty' from --port is not a valid int"),
        (["--config", str(yaml_file)], {"TANDEM_CONTROLLER_NUM_DECODE": "1.5"},
         "num_decode: '1.5' from TANDEM_CONTROLLER_NUM_DECODE is not a valid int"),
        (["--config", str(yaml_file)], {"TANDEM_CONTROLLER_PROT": "1"}, "unknown setting 'prot'"),
        (["--config", str(yaml_file), "--backend", "mpi"], {}, "backend: 'mpi' is not one of gloo, nccl"),
        (["--config", str(yaml_file), "--port", "70000"], {}, "port: 70000 is not a port number"),
        (["--config", str(yaml_file), "--heartbeat-timeout-s", "0.5"], {}, "heartbeat_timeout_s: 0.5 is shorter"),
        ([], {}, "model_dir is required (--model-dir, TANDEM_CONTROLLER_MODEL_DIR"),
    ]
    for argv, env, message in bad:
        with pytest.raises(ConfigError) as err:
            build(argv, env)
        assert message in str(err.value)
    yaml_file.write_text("model_dir: x\nprot: 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        build(["--config", str(yaml_file)])


# --- expert load balancing: the Rebalance RPC, Redis, the expert servers over gRPC ----------------------------

def metric(port: int, line_start: str) -> float | None:
    """The value of the first metrics line starting with `line_start` (None when there is none)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_metric(port: int, line_start: str, value: float, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (got := metric(port, line_start)) != value:
        assert time.monotonic() < deadline, f"{line_start} is {got}, expected {value}"
        time.sleep(0.1)


def start_balancing(model_dir: Path, redis_url: str, **overrides) -> ControllerServer:
    """A controller with load balancing on, its Redis checked every 0.2 s, and metrics."""
    settings = dict(model_dir=str(model_dir), host="127.0.0.1", port=0, store_port=0, num_prefill=1, num_decode=1,
                    num_expert_servers=2, grace_s=0.5, redis_url=redis_url, metrics_port=free_port(),
                    stats_model_name=f"ctl-{uuid.uuid4().hex[:8]}", heartbeat_timeout_s=60.0) | overrides
    server = ControllerServer(ControllerConfig(**settings))
    server.redis_load.check_interval_s = 0.2
    return server.start()


def record_load(redis_url: str, model: str, load: list[list[int]]) -> None:
    recorder = ExpertLoadRecorder(connect(redis_url), model, window_s=3600.0)
    for row, counts in enumerate(load):
        recorder.add(row, torch.tensor(counts))
    assert recorder.flush()


def test_rebalance_without_redis_is_a_failed_precondition(stub):
    code, message = status_of(stub.Rebalance, pb.RebalanceRequest(force=True))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "load balancing is off" in message and "redis_url" in message


def test_rebalance_without_statistics_changes_nothing(model_dir, redis_server):
    server = start_balancing(model_dir, redis_server)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            reply = pb_grpc.ControllerStub(ch).Rebalance(pb.RebalanceRequest(), timeout=10)
        assert not reply.applied and reply.reason == "no expert load recorded yet"
        assert reply.placement_version == 1 == server.placements.version
        assert (reply.balancedness_before, reply.balancedness_after, reply.num_moved_experts) == (0, 0, 0)
        port = server.config.metrics_port
        assert metric(port, "tandem_eplb_redis_up") == 1.0
        assert metric(port, 'tandem_eplb_rebalances_total{outcome="applied"}') == 0.0
        assert metric(port, "tandem_eplb_balancedness") is None  # nothing planned yet
    finally:
        server.stop()


def test_periodic_rebalance_runs_by_itself_until_stopped(model_dir, redis_server):
    server = start_balancing(model_dir, redis_server, rebalance_interval_s=0.2)
    try:
        deadline = time.monotonic() + 10
        while server.rebalancer.last is None:
            assert time.monotonic() < deadline, "no periodic re-plan"
            time.sleep(0.05)
        assert server.rebalancer.last.reason == "no expert load recorded yet"
    finally:
        server.stop()
    assert not server.rebalancer._thread.is_alive()


def test_redis_outage_keeps_the_placement_and_statistics_resume(model_dir, redis_process, caplog):
    caplog.set_level(logging.INFO, logger="tandem.cluster.expert_fleet")
    server = start_balancing(model_dir, redis_process.url)
    port = server.config.metrics_port
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.ControllerStub(ch)
            assert metric(port, "tandem_eplb_redis_up") == 1.0
            redis_process.stop()
            wait_metric(port, "tandem_eplb_redis_up", 0.0)  # noticed without a re-plan
            for _ in range(2):
                reply = stub.Rebalance(pb.RebalanceRequest(force=True), timeout=10)
                assert not reply.applied and reply.reason.startswith("statistics unavailable")
                assert reply.placement_version == 1
            # serving goes on: members still register and heartbeat, the placement is still there
            member = register(stub, pb.ROLE_DECODE, "10.0.4.1:7000").member
            assert stub.Heartbeat(pb.HeartbeatRequest(member_id=member.member_id, is_ready=True),
                                  timeout=5).placement_version == 1
            assert stub.GetPlacement(pb.GetPlacementRequest(), timeout=5).version == 1
            time.sleep(0.5)  # more failed checks: still logged once

            redis_process.start()
            wait_metric(port, "tandem_eplb_redis_up", 1.0)
            record_load(redis_process.url, server.stats_model_name, [[10] * E] * L)  # even: nothing to gain
            reply = stub.Rebalance(pb.RebalanceRequest(), timeout=10)
            assert not reply.applied and reply.reason == "nothing to move"
            assert reply.balancedness_before == pytest.approx(1.0) and reply.placement_version == 1
            assert metric(port, 'tandem_eplb_balancedness{placement="serving"}') == pytest.approx(1.0)
    finally:
        server.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("is unreachable" in m for m in messages) == 1, messages
    assert sum("answers again; statistics resume" in m for m in messages) == 1, messages


class FakeExpertServer(epb_grpc.ExpertServerServicer):
    """An expert server's gRPC API only: records LoadExperts and UnloadExperts; `fail_load` makes loads fail,
    `fail_unload` the next unloads."""

    def __init__(self):
        self.loaded: list[pb.Placement] = []
        self.kept: list[int] = []
        self.fail_load: str | None = None
        self.fail_unload = 0  # how many UnloadExperts calls fail before they work again
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        epb_grpc.add_ExpertServerServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def LoadExperts(self, request, context):
        if self.fail_load:
            context.abort(grpc.StatusCode.INTERNAL, self.fail_load)
        self.loaded.append(request.placement)
        return epb.LoadExpertsResponse(num_loaded_experts=3)

    def UnloadExperts(self, request, context):
        self.kept.append(request.keep_version)
        if self.fail_unload:
            self.fail_unload -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        return epb.UnloadExpertsResponse(num_unloaded_experts=1)


def test_rebalance_stages_on_every_expert_server_publishes_and_frees_after_the_acks(model_dir, redis_server):
    experts = [FakeExpertServer(), FakeExpertServer()]
    # 16 experts on 2 servers x 10 slots: 4 redundant slots, hot experts 0 and 1 (both on server 0 at first)
    server = start_balancing(model_dir, redis_server, num_slots_per_server=10, ack_timeout_s=10.0)
    port = server.config.metrics_port
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.ControllerStub(ch)
            for fake in experts:
                member = register(stub, pb.ROLE_EXPERT, fake.address).member
                stub.Heartbeat(pb.HeartbeatRequest(member_id=member.member_id, is_ready=True), timeout=5)
            decode = register(stub, pb.ROLE_DECODE, "10.0.5.1:7000").member
            stub.Heartbeat(pb.HeartbeatRequest(member_id=decode.member_id, is_ready=True), timeout=5)
            skewed = [[1000, 800] + [10] * (E - 2)] * L
            record_load(redis_server, server.stats_model_name, skewed)

            # the decode worker acknowledges the new version when it sees it; the old copies are freed after
            watch = stub.WatchPlacement(pb.WatchPlacementRequest(known_version=1), timeout=30)
            acker = threading.Thread(target=lambda: stub.AckPlacement(
                pb.AckPlacementRequest(member_id=decode.member_id, version=next(watch).version), timeout=5))
            acker.start()
            reply = stub.Rebalance(pb.RebalanceRequest(), timeout=30)
            acker.join(timeout=10)
            watch.cancel()
            assert reply.applied and reply.reason == "applied" and reply.placement_version == 2
            assert reply.balancedness_after > reply.balancedness_before + 0.01 and reply.num_moved_experts > 0
            published = stub.GetPlacement(pb.GetPlacementRequest(version=2), timeout=5)
            for fake in experts:  # staged on both before it was published, then the old copies freed
                assert [p.version for p in fake.loaded] == [2] and fake.loaded[0] == published
                assert fake.kept == [2]
            assert metric(port, 'tandem_eplb_rebalances_total{outcome="applied"}') == 1.0
            assert metric(port, "tandem_eplb_moved_experts_total") == reply.num_moved_experts
            assert metric(port, 'tandem_eplb_balancedness{placement="planned"}') == \
                pytest.approx(reply.balancedness_after)

            # a server failing to load: nothing published, every server drops what it staged, version 2 serves
            experts[1].fail_load = "CUDA out of memory"
            record_load(redis_server, server.stats_model_name, [[0] * (E - 1) + [5000]] * L)
            reply = stub.Rebalance(pb.RebalanceRequest(force=True), timeout=30)
            assert not reply.applied and reply.placement_version == 2 == server.placements.version
            assert "staging failed" in reply.reason and f"expert server 1 ({experts[1].address})" in reply.reason
            assert "INTERNAL: CUDA out of memory" in reply.reason and "expert server 0" not in reply.reason
            assert [p.version for p in experts[0].loaded] == [2, 3] and experts[0].kept == [2, 2]
            assert experts[1].kept == [2, 2]
            assert metric(port, 'tandem_eplb_rebalances_total{outcome="failed"}') == 1.0

            # the clean-up fails too: nothing new is planned until a retry, at the next re-plans, succeeds
            experts[0].fail_unload = 2
            reply = stub.Rebalance(pb.RebalanceRequest(force=True), timeout=30)
            assert not reply.applied and "staging failed" in reply.reason and experts[0].kept == [2] * 3
            reply = stub.Rebalance(pb.RebalanceRequest(force=True), timeout=30)  # the retry fails again
            assert not reply.applied and "waiting until every worker routes with version 2" in reply.reason
            assert experts[0].kept == [2] * 4 and [p.version for p in experts[0].loaded] == [2, 3, 3]
            reply = stub.Rebalance(pb.RebalanceRequest(force=True), timeout=30)  # the retry works: planned again
            assert [p.version for p in experts[0].loaded] == [2, 3, 3, 3] and "staging failed" in reply.reason
            assert experts[0].kept == experts[1].kept == [2] * 6 and server.placements.version == 2

            # an expert server that is not ready: refused before anything is sent
            stub.Heartbeat(pb.HeartbeatRequest(member_id=_member_id(stub, pb.ROLE_EXPERT), is_ready=False), timeout=5)
            experts[1].fail_load = None
            reply = stub.Rebalance(pb.RebalanceRequest(force=True), timeout=30)
            assert not reply.applied and "expert server 0: " in reply.reason and "is not ready" in reply.reason
            assert len(experts[0].loaded) == 4
    finally:
        server.stop()
        for fake in experts:
            fake.server.stop(0)


@pytest.mark.parametrize("changes, message", [
    ({"redis_url": "http://:secret@cache:6379"}, "redis_url: 'http://:***@cache:6379' is not a redis://"),
    ({"rebalance_interval_s": -1.0}, "rebalance_interval_s: -1.0 is negative"),
    ({"rebalance_interval_s": 60.0, "redis_url": ""}, "rebalance_interval_s: 60.0, but redis_url is empty"),
    ({"rebalance_min_gain": 1.0}, "rebalance_min_gain: 1.0 is not in [0, 1)"),
    ({"rebalance_min_gain": -0.1}, "rebalance_min_gain: -0.1 is not in [0, 1)"),
    ({"rebalance_margin": 1.5}, "rebalance_margin: 1.5 is not in [0, 1)"),
    ({"rebalance_windows": 0}, "rebalance_windows: 0 must be at least 1"),
    ({"rebalance_decay": 0.0}, "rebalance_decay: 0.0 is not in (0, 1]"),
    ({"rebalance_decay": 1.5}, "rebalance_decay: 1.5 is not in (0, 1]"),
    ({"eplb_policy": "best"}, "eplb_policy: 'best' is not one of auto, global, hierarchical"),
    ({"num_nodes": 0}, "num_nodes: 0 must be at least 1"),
    ({"num_nodes": 3}, "num_nodes: 2 expert servers cannot be spread evenly over 3 nodes"),
    ({"stage_timeout_s": 0.0}, "stage_timeout_s: 0.0 must be positive"),
    ({"ack_timeout_s": -1.0}, "ack_timeout_s: -1.0 is negative"),
])
def test_bad_load_balancing_settings_name_the_field(model_dir, changes, message):
    settings = {"model_dir": str(model_dir), "redis_url": "redis://127.0.0.1:6379/0"} | changes
    with pytest.raises(ConfigError) as err:
        ControllerConfig(**settings)
    assert message in str(err.value) and "secret" not in str(err.value)


def test_load_balancing_settings_from_flags_and_their_defaults(model_dir):
    import argparse

    from tandem.cluster.config import add_config_flags

    parser = argparse.ArgumentParser()
    add_config_flags(parser, ControllerConfig, "controller")
    config = build_config(ControllerConfig, "controller", parser.parse_args(["--model-dir", str(model_dir)]), {})
    assert (config.redis_url, config.stats_model_name, config.rebalance_interval_s, config.rebalance_min_gain,
            config.rebalance_margin, config.rebalance_windows, config.rebalance_decay, config.eplb_policy,
            config.num_nodes, config.stage_timeout_s, config.ack_timeout_s) == \
        ("", "", 0.0, 0.01, 0.0, 6, 0.8, "auto", 1, 120.0, 30.0)
    argv = ["--model-dir", str(model_dir), "--redis-url", "redis://:pw@r:6379/1", "--rebalance-interval-s", "30",
            "--eplb-policy", "hierarchical", "--num-nodes", "2", "--rebalance-windows", "12"]
    config = build_config(ControllerConfig, "controller", parser.parse_args(argv),
                          {"TANDEM_CONTROLLER_REBALANCE_DECAY": "0.5"})
    assert (config.rebalance_interval_s, config.eplb_policy, config.num_nodes, config.rebalance_windows,
            config.rebalance_decay) == (30.0, "hierarchical", 2, 12, 0.5)
    assert config.redis_url_redacted == "redis://:***@r:6379/1"
    with pytest.raises(ConfigError, match="eplb_policy: 'best' is not one of"):
        build_config(ControllerConfig, "controller", parser.parse_args([*argv, "--eplb-policy", "best"]), {})

    # the model decides whether the hierarchical policy applies: the tiny model's 4 expert groups on 8 nodes
    with pytest.raises(ValueError, match=r"eplb_policy: the hierarchical policy needs the expert groups \(4\)"):
        ControllerServer(ControllerConfig(model_dir=str(model_dir), port=0, store_port=0, num_expert_servers=8,
                                          num_nodes=8, eplb_policy="hierarchical", redis_url="redis://127.0.0.1:1/0"))
