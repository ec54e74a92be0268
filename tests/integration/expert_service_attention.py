"""The attention rank of test_expert_service.py, run as its own process.

    python expert_service_attention.py CONTROLLER CHECKPOINT OUT_FILE

Registers with the controller as the prefill worker, joins the data plane with the announced rank and store,
and for every MoE layer (MTP included) routes random hidden states with the layer's own gate and runs them on
the expert servers (`RemoteExperts`) and on the full checkpoint's `LocalExperts`. Saves both results and the
tokens routed per (MoE layer, logical expert) to OUT_FILE, prints "ready", then waits for a line on stdin
before it leaves (the test checks the expert servers meanwhile).
"""

from __future__ import annotations

import os
import sys

import grpc
import torch

from tandem.model.loading import load_model
from tandem.moe.placement import Placement
from tandem.transport import DataPlane, RemoteExperts, Roles
from tandem.transport.expert_parallel import moe_layer_ids
from tandem.v1 import controller_pb2 as pb
from tandem.v1 import controller_pb2_grpc as pb_grpc

NUM_TOKENS = (1, 7, 33)  # batches per MoE layer


def main(controller: str, ckpt_dir: str, out_file: str) -> None:
    with grpc.insecure_channel(controller) as channel:
        stub = pb_grpc.ControllerStub(channel)
        reply = stub.Register(pb.RegisterRequest(role=pb.ROLE_PREFILL, address="127.0.0.1:1"), timeout=10)
        proto = stub.GetPlacement(pb.GetPlacementRequest(), timeout=10)
    placement = Placement(torch.tensor([list(row.phy2log) for row in proto.layers]), proto.num_logical_experts,
                          proto.version)
    slots = proto.num_slots_per_server
    dp = reply.data_plane
    num_servers = placement.num_physical // slots
    roles = Roles(num_attention=dp.world_size - num_servers, num_expert_servers=num_servers)
    plane = DataPlane.join(dp.store_host, dp.store_port, reply.member.rank, dp.world_size, dp.backend, timeout_s=30,
                           roles=roles)
    model = load_model(ckpt_dir)  # every expert: the colocated reference
    generator = torch.Generator().manual_seed(0)
    routed = torch.zeros(placement.num_layers, placement.num_logical, dtype=torch.int64)
    remote_out, local_out = [], []
    with torch.no_grad():
        for row, layer in enumerate(moe_layer_ids(model.config)):
            mlp = model.model.layers[layer].mlp
            remote = RemoteExperts(plane, layer, placement.layer_table(row), slots, timeout_s=20,
                                   version=placement.version)
            for num_tokens in NUM_TOKENS:
                x = torch.randn(num_tokens, model.config.hidden_size, generator=generator)
                weights, expert_ids = mlp.gate(x)
                routed[row] += torch.bincount(expert_ids.flatten(), minlength=placement.num_logical)
                remote_out.append(remote(x, expert_ids, weights))
                local_out.append(mlp.experts(x, expert_ids, weights))
    torch.save({"rank": reply.member.rank, "routed": routed, "remote": remote_out, "local": local_out}, out_file)
    print("ready", flush=True)
    sys.stdin.readline()
    # the expert servers are gone by now: leave without the shutdown messages or destroying the groups
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
