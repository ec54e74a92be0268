"""docker-compose.yml against the launcher's topology, and every service's command line against its config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.expert.server import ExpertServerConfig
from services.gateway.server import GatewayConfig
from tandem.cli import _build_parser
from tandem.cluster.config import ControllerConfig, build_config
from tandem.cluster.topology import COMPOSE_MODEL_DIR, REDIS_SERVICE, Topology, local_services, services
from tandem.cluster.worker import WorkerConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"controller": ControllerConfig, "expert": ExpertServerConfig, "prefill": WorkerConfig,
           "decode": WorkerConfig, "gateway": GatewayConfig}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def parsed_config(args: list[str]):
    """The service's typed config exactly as `tandem <args>` would build it (no environment)."""
    namespace = _build_parser().parse_args(args)
    return build_config(CONFIGS[namespace.service], namespace.service, namespace, environ={})


def test_compose_has_the_launchers_services_with_the_same_commands_and_environment(compose):
    launcher = services(Topology(model=COMPOSE_MODEL_DIR, redis_url=f"redis://{REDIS_SERVICE}:6379/0"),
                        address_of=lambda name: name, bind_host="0.0.0.0")
    assert set(compose["services"]) == {REDIS_SERVICE} | {s.name for s in launcher}
    for spec in launcher:
        service = compose["services"][spec.name]
        assert service["command"] == spec.args, spec.name
        assert service["environment"] == spec.env, spec.name
        assert service["healthcheck"]["test"][-1] == f"127.0.0.1:{spec.grpc_port}"


def test_compose_wiring_points_at_services_that_exist(compose):
    names = set(compose["services"])
    published = {name: s.get("ports", []) for name, s in compose["services"].items()}
    assert published.pop("gateway") == ["50051:50051"]
    assert not any(published.values()), "only the gateway is published outside"
    for name, service in compose["services"].items():
        if name == REDIS_SERVICE:
            continue
        assert set(service["depends_on"]) <= names
        config = parsed_config(service["command"])
        if name != "controller":
            host, port = config.controller.split(":")
            assert host == "controller" and int(port) == parsed_config(compose["services"]["controller"]["command"]).port
        if name.startswith(("expert", "controller")):  # the controller re-plans from the experts' statistics
            assert config.redis_url == f"redis://{REDIS_SERVICE}:6379/0"
        if name.startswith(("expert", "prefill", "decode")):
            assert config.advertise_host == name
        assert config.host == "0.0.0.0"
    controller = parsed_config(compose["services"]["controller"]["command"])
    assert controller.rebalance_interval_s == 0.0, "docker compose re-plans on demand only"
    assert REDIS_SERVICE in compose["services"]["controller"]["depends_on"]
    gateway = compose["services"]["gateway"]["depends_on"]
    assert set(gateway) == names - {REDIS_SERVICE, "controller", "gateway"}, "the gateway starts after the pools"


def test_every_local_command_line_builds_its_services_config():
    topology = Topology(model="models/tiny-code", num_prefill=2, num_decode=3, num_expert_servers=4,
                        redis_url="redis://127.0.0.1:6379/0", num_speculative_tokens=1, rebalance_interval_s=90.5)
    specs = local_services(topology)
    assert [s.name for s in specs] == ["controller", "expert-0", "expert-1", "expert-2", "expert-3", "prefill-0",
                                       "prefill-1", "decode-0", "decode-1", "decode-2", "gateway"]
    ports = set()
    for spec in specs:
        config = parsed_config(spec.args)
        assert config.port == spec.grpc_port and config.metrics_port == spec.metrics_port
        ports |= {config.port, config.metrics_port}
        if spec.name.startswith(("prefill", "decode", "gateway")):
            assert config.num_speculative_tokens == 1
    controller = parsed_config(specs[0].args)
    assert (controller.num_prefill, controller.num_decode, controller.num_expert_servers) == (2, 3, 4)
    assert (controller.redis_url, controller.rebalance_interval_s) == ("redis://127.0.0.1:6379/0", 90.5)
    assert all(parsed_config(s.args).redis_url == controller.redis_url for s in specs if s.name.startswith("expert"))
    assert len(ports) == 2 * len(specs), "every service has its own gRPC and metrics port"


def test_up_flags_reach_the_topology():
    from tandem.cluster.launcher import topology_from_args

    args = _build_parser().parse_args(["up", "--model", "m", "--print-compose", "--rebalance-interval-s", "600",
                                       "--redis-url", "redis://10.0.0.1:6379/0"])
    topology = topology_from_args(args)
    assert (topology.rebalance_interval_s, topology.redis_url) == (600.0, "redis://10.0.0.1:6379/0")
    assert _build_parser().parse_args(["up", "--model", "m"]).rebalance_interval_s == 0.0


def test_free_ports_come_from_below_the_ephemeral_range():
    """Outgoing connections take source ports from the ephemeral range: a port picked there for a server could be
    taken before the server binds it."""
    from tandem.cluster.launcher import free_port, free_port_range, listening_ports

    ephemeral_start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = listening_ports()
    assert ports.start >= 10000 and ports.stop <= max(ephemeral_start, 32768)
    assert all(free_port() in ports for _ in range(20))
    start = free_port_range(6)
    assert start in ports and start + 5 in ports


def test_the_dockerfile_holds_the_bundled_model_and_runs_tandem():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY models ./models" in dockerfile and "WORKDIR /opt/tandem" in dockerfile
    assert COMPOSE_MODEL_DIR.startswith("/opt/tandem/models/")
    assert 'ENTRYPOINT ["tandem"]' in dockerfile
    assert "torch==${TORCH_VERSION}" in dockerfile and "ARG TORCH_VERSION=2.13.0" in dockerfile


@pytest.mark.parametrize("changes, message", [
    (dict(num_decode=0), "num-decode"),
    (dict(gateway_port=50050), "ports overlap"),
    (dict(metrics_port_base=65530), "metrics-port-base"),
    (dict(num_speculative_tokens=-1), "speculative-tokens"),
    (dict(rebalance_interval_s=-1.0), "rebalance-interval-s"),
])
def test_bad_topologies_name_the_problem(changes, message):
    with pytest.raises(ValueError, match=message):
        Topology(model="m", **changes)
