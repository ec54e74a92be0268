"""An expert server for test_workers.py, run as its own process (independent of `tandem serve expert`).

    python worker_expert_server.py CHECKPOINT CONTROLLER_ADDRESS

Registers with the controller as an expert server, joins the data plane at the announced store, loads the
experts of its slots under the controller's placement and serves until every attention rank has released it.
"""

from __future__ import annotations

import socket
import sys
import threading

import grpc

from tandem.cluster.worker import placement_from_proto
from tandem.model.checkpoint import Checkpoint
from tandem.transport import DataPlane, ExpertWorker, Roles
from tandem.transport.expert_parallel import load_server_experts
from tandem.v1 import controller_pb2 as cpb
from tandem.v1 import controller_pb2_grpc as cpb_grpc


def main(ckpt_dir: str, controller: str) -> None:
    with socket.socket() as s:  # a unique address to register under; nothing listens there
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    with grpc.insecure_channel(controller) as channel:
        stub = cpb_grpc.ControllerStub(channel)
        reply = stub.Register(cpb.RegisterRequest(role=cpb.ROLE_EXPERT, address=address), timeout=30)
        placement_pb = stub.GetPlacement(cpb.GetPlacementRequest(), timeout=30)
    dp, slots = reply.data_plane, placement_pb.num_slots_per_server
    placement = placement_from_proto(placement_pb)
    num_servers = placement.num_physical // slots
    plane = DataPlane.join(dp.store_host, dp.store_port, reply.member.rank, dp.world_size, dp.backend, timeout_s=120,
                           roles=Roles(dp.world_size - num_servers, num_servers))
    ckpt = Checkpoint(ckpt_dir)
    banks, phy2log = load_server_experts(ckpt, placement, reply.member.index, slots,
                                         ckpt.config.num_nextn_predict_layers)
    ExpertWorker(plane, banks, phy2log, ckpt.config.n_routed_experts).serve_forever(threading.Event())
    plane.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
