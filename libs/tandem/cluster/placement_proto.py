"""tandem.v1.Placement <-> tandem.moe.placement.Placement: how the controller, workers and expert servers pass it."""

from __future__ import annotations

import torch

from tandem.moe.placement import Placement
from tandem.v1 import controller_pb2 as pb


def placement_to_proto(p: Placement, num_slots_per_server: int) -> pb.Placement:
    return pb.Placement(version=p.version, num_logical_experts=p.num_logical, num_slots_per_server=num_slots_per_server,
                        layers=[pb.LayerPlacement(phy2log=row) for row in p.phy2log.tolist()])


def placement_from_proto(p: pb.Placement) -> Placement:
    return Placement(torch.tensor([list(row.phy2log) for row in p.layers], dtype=torch.int64), p.num_logical_experts,
                     p.version)
