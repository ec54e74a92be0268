"""The torch.distributed data plane: expert activations and KV handoff (gloo on CPU, NCCL on GPU)."""

from tandem.transport.expert_dispatch import InFlight, RemoteExperts
from tandem.transport.expert_server import ExpertWorker, stop_expert_server
from tandem.transport.group import DataPlane, Roles
from tandem.transport.kv_transfer import recv_kv, send_kv
from tandem.transport.wire import TransportError

__all__ = ["DataPlane", "ExpertWorker", "InFlight", "RemoteExperts", "Roles", "TransportError", "recv_kv", "send_kv",
           "stop_expert_server"]
