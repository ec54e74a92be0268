"""`tandem serve expert` as real processes: two expert servers register with an in-process controller, load
their slots' experts, join the gloo data plane with an attention rank (its own process) and serve it exactly
what the full checkpoint's experts compute; their token counts (GetStats and a real redis-server) equal what
the attention rank routed; health, UNIMPLEMENTED for dynamic placement, SIGTERM -> exit code 0."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.controller.server import ControllerServer
from services.expert.server import ExpertServerConfig, main
from tandem.cluster.config import ConfigError, ControllerConfig
from tandem.eplb.stats import connect, read_load
from tandem.model.checkpoint import save_checkpoint
from tandem.model.config import ModelConfig
from tandem.model.loading import export_state_dict
from tandem.model.presets import random_model
from tandem.v1 import controller_pb2 as cpb
from tandem.v1 import controller_pb2_grpc as cpb_grpc
from tandem.v1 import expert_pb2 as pb
from tandem.v1 import expert_pb2_grpc as pb_grpc
from test_transport import free_port

ROOT = Path(__file__).resolve().parents[2]
ATTENTION = Path(__file__).with_name("expert_service_attention.py")
E, L, SLOTS = 8, 3, 4  # routed experts; MoE layers (2 main + 1 MTP); slots per server (8 experts on 2 servers)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def wait_for(what: str, check, timeout_s: float = 20.0, procs=()):
    """Poll check() until it returns a truthy value; fail naming `what` (and a dead process's log)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        for p, log in procs:
            if p.poll() is not None:
                pytest.fail(f"{what}: a process exited with {p.returncode}:\n{Path(log).read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s}s")
        time.sleep(0.05)


def experts(stub: cpb_grpc.ControllerStub) -> list[cpb.Member]:
    return list(stub.ListMembers(cpb.ListMembersRequest(role=cpb.ROLE_EXPERT), timeout=5).members)


def health_of(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    config = ModelConfig(vocab_size=80, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=E,
                         kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
                         n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
                         max_position_embeddings=256, num_nextn_predict_layers=1)
    path = tmp_path / "ckpt"
    save_checkpoint(path, config, export_state_dict(random_model(config, seed=5, std=0.3)), max_shard_bytes=20_000)
    return path


@pytest.fixture
def controller(checkpoint):
    server = ControllerServer(ControllerConfig(
        model_dir=str(checkpoint), host="127.0.0.1", port=0, store_port=0, num_prefill=1, num_decode=0,
        num_expert_servers=2, num_gateways=0, heartbeat_interval_s=0.2, heartbeat_timeout_s=2.0, grace_s=0.5)).start()
    yield server
    server.stop()


def test_expert_servers_serve_the_attention_rank_and_count_its_tokens(tmp_path, checkpoint, controller, redis_server):
    model_name = f"expert-service-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "libs"), str(ROOT),
                                                       os.environ.get("PYTHONPATH", "")]))
    address = f"127.0.0.1:{controller.port}"
    # the service's own entry point (`tandem serve expert` runs the same `serve`; see test_help_documents_every_flag)
    cmd = [sys.executable, "-m", "services.expert.server", "--controller", address, "--model-dir",
           str(checkpoint), "--host", "127.0.0.1", "--redis-url", redis_server, "--model-name",
           model_name, "--stats-flush-interval-s", "0.1", "--timeout-s", "20", "--join-timeout-s", "60", "--grace-s",
           "1"]

    def start(name: str, *flags: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        return subprocess.Popen(cmd + list(flags), env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w")), log

    servers, extra, attention, channels = [], None, None, []
    try:
        ports, metrics_port = [free_port(), free_port()], free_port()
        servers = [start("expert0", "--port", str(ports[0]), "--metrics-port", str(metrics_port)),
                   start("expert1", "--port", str(ports[1]))]

        with grpc.insecure_channel(address) as channel:
            stub = cpb_grpc.ControllerStub(channel)
            wait_for("both expert servers register", lambda: len(experts(stub)) == 2, procs=servers)
            members = experts(stub)
        assert sorted((m.index, m.rank) for m in members) == [(0, 1), (1, 2)]
        extra = start("expert2", "--port", "0")  # one more than the deployment's shape: the controller refuses it
        channels = [grpc.insecure_channel(m.address) for m in sorted(members, key=lambda m: m.index)]
        stubs = [pb_grpc.ExpertServerStub(ch) for ch in channels]

        # loaded but the plane is not complete without the attention rank: GetStats answers, health does not serve
        for stub in stubs:
            wait_for("experts loaded", lambda: list(stub.GetStats(pb.GetStatsRequest(), timeout=5).placement_versions)
                     == [1], procs=servers)
        assert [health_of(ch) for ch in channels] == [NOT_SERVING, NOT_SERVING]
        with pytest.raises(grpc.RpcError) as err:
            stubs[0].LoadExperts(pb.LoadExpertsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not serving yet" in err.value.details()

        log = tmp_path / "attention.log"
        attention = subprocess.Popen([sys.executable, str(ATTENTION), address, str(checkpoint), str(tmp_path / "a.pt")],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"),
                                     text=True)
        wait_for("the attention rank finishes", lambda: select.select([attention.stdout], [], [], 0)[0],
                 timeout_s=40, procs=servers + [(attention, log)])
        assert attention.stdout.readline().strip() == "ready", log.read_text()[-3000:]
        result = torch.load(tmp_path / "a.pt")
        assert result["rank"] == 0
        for remote, local in zip(result["remote"], result["local"], strict=True):
            torch.testing.assert_close(remote, local, rtol=1e-5, atol=1e-6)
        routed = result["routed"]
        assert routed.shape == (L, E) and (routed.sum(1) > 0).all()

        assert [health_of(ch) for ch in channels] == [SERVING, SERVING]
        stats = [stub.GetStats(pb.GetStatsRequest(), timeout=5) for stub in stubs]
        counted = [torch.tensor([list(layer.num_tokens_per_expert) for layer in s.layers]) for s in stats]
        assert [[layer.layer for layer in s.layers] for s in stats] == [list(range(L))] * 2
        torch.testing.assert_close(counted[0] + counted[1], routed, rtol=0, atol=0)
        # each server counts only the experts of its slots (static placement: server i holds 4i .. 4i+3)
        assert counted[0][:, SLOTS:].sum() == 0 and counted[1][:, :SLOTS].sum() == 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        samples = {(m.name, tuple(sorted(m.labels.items()))): m.value
                   for family in text_string_to_metric_families(text) for m in family.samples}
        exported = torch.zeros(L, E, dtype=torch.int64)
        for (name, labels), value in samples.items():
            if name == "tandem_expert_tokens_total":
                labels = dict(labels)
                exported[int(labels["layer"]), int(labels["expert"])] = int(value)
        # servers take indices in the order they register; expert0 is the process with the metrics port
        first = next(m.index for m in members if m.address == f"127.0.0.1:{ports[0]}")
        assert torch.equal(exported, counted[first]) and samples[("tandem_expert_serving", ())] == 1
        # the attention rank (rank 0) sent each MoE layer 3 batches; this server computed those that reached its slots
        computed = samples[("tandem_expert_computed_requests_total", (("source_rank", "0"),))]
        assert 0 < computed <= L * 3 and samples[("tandem_expert_compute_seconds_total", (("source_rank", "0"),))] > 0
        with connect(redis_server) as redis_client:
            wait_for("the counts reach Redis", lambda: torch.equal(
                read_load(redis_client, model_name, L, E, windows=1000).to(torch.int64), routed))
        wait_for("the servers report connected Redis", lambda: all(
            (s := stub.GetStats(pb.GetStatsRequest(), timeout=5)).is_redis_connected and s.num_failed_flushes == 0
            for stub in stubs))
        with grpc.insecure_channel(address) as channel:
            stub = cpb_grpc.ControllerStub(channel)
            wait_for("the controller sees both ready", lambda: all(m.is_ready for m in experts(stub)))
            current = stub.GetPlacement(cpb.GetPlacementRequest(), timeout=5)

        # placement changes: version 2 (every server's experts swapped) is staged beside version 1, reading only
        # the experts a server lacks; staging it again replaces the abandoned first staging; the serving version
        # cannot be staged; keeping only version 2 frees version 1
        swapped = cpb.Placement(version=2, num_logical_experts=current.num_logical_experts,
                                num_slots_per_server=current.num_slots_per_server,
                                layers=[cpb.LayerPlacement(phy2log=list(reversed(row.phy2log)))
                                        for row in current.layers])
        for _ in range(2):
            assert [s.LoadExperts(pb.LoadExpertsRequest(placement=swapped), timeout=30).num_loaded_experts
                    for s in stubs] == [SLOTS * L] * 2
        assert [list(s.GetStats(pb.GetStatsRequest(), timeout=5).placement_versions) for s in stubs] == [[1, 2]] * 2
        with pytest.raises(grpc.RpcError) as err:
            stubs[0].LoadExperts(pb.LoadExpertsRequest(placement=current), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "holds versions [1, 2]" in err.value.details()
        assert [s.UnloadExperts(pb.UnloadExpertsRequest(keep_version=2), timeout=5).num_unloaded_experts
                for s in stubs] == [1, 1]
        assert [list(s.GetStats(pb.GetStatsRequest(), timeout=5).placement_versions) for s in stubs] == [[2]] * 2
        with pytest.raises(grpc.RpcError) as err:
            stubs[1].UnloadExperts(pb.UnloadExpertsRequest(keep_version=7), timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not loaded" in err.value.details()

        assert extra[0].wait(timeout=15) == 1
        assert "RESOURCE_EXHAUSTED" in extra[1].read_text()

        for p, _ in servers:
            p.send_signal(signal.SIGTERM)
        for p, log in servers:
            assert p.wait(timeout=15) == 0, log.read_text()[-3000:]
    finally:
        for ch in channels:
            ch.close()
        for p, _ in servers + ([extra] if extra else []):
            p.kill()
        if attention is not None:
            attention.kill()
            attention.wait()


def test_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="controller: empty"):
        ExpertServerConfig(controller="", model_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="stats_window_s"):
        ExpertServerConfig(controller="c:1", model_dir=str(tmp_path), stats_window_s=0)
    with pytest.raises(ConfigError, match="port"):
        ExpertServerConfig(controller="c:1", model_dir=str(tmp_path), port=70000)


def test_help_documents_every_flag(capsys):
    from tandem.cli import main as tandem_main

    for run in (lambda: main(["--help"]), lambda: tandem_main(["serve", "expert", "--help"])):
        with pytest.raises(SystemExit) as exit_:
            run()
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        for name in ExpertServerConfig.__dataclass_fields__:
            assert "--" + name.replace("_", "-") in out and "TANDEM_EXPERT_" + name.upper() in out
