"""The generated gRPC code: it imports, the public API has the issue's field names, a real server answers
with health checking and reflection, and code generation is idempotent."""

from __future__ import annotations

import os
import shutil
from concurrent import futures

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor as F
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tandem.rpc import codegen

codegen.generate()  # `make install` generated it; this only catches up with protos edited since

from tandem.v1 import (controller_pb2, controller_pb2_grpc, expert_pb2, expert_pb2_grpc,  # noqa: E402
                       gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc)


def fields(message) -> dict[str, tuple[int, bool]]:
    """{field name: (type, is repeated)} of a message class."""
    return {f.name: (f.type, f.is_repeated) for f in message.DESCRIPTOR.fields}


def test_generated_modules_define_the_services():
    assert gateway_pb2.DESCRIPTOR.package == "tandem.v1"
    for module, services in [(gateway_pb2, {"Gateway"}), (worker_pb2, {"PrefillWorker", "DecodeWorker"}),
                             (expert_pb2, {"ExpertServer"}), (controller_pb2, {"Controller"})]:
        assert set(module.DESCRIPTOR.services_by_name) == services
    for grpc_module in (gateway_pb2_grpc, worker_pb2_grpc, expert_pb2_grpc, controller_pb2_grpc):
        assert any(name.endswith("Stub") for name in dir(grpc_module))


def test_generate_request_has_the_public_fields():
    assert fields(gateway_pb2.GenerateRequest) == {
        "prompt": (F.TYPE_STRING, False),
        "prompt_token_ids": (F.TYPE_INT32, True),
        "max_tokens": (F.TYPE_INT32, False),
        "temperature": (F.TYPE_FLOAT, False),
        "top_p": (F.TYPE_FLOAT, False),
        "top_k": (F.TYPE_INT32, False),
        "seed": (F.TYPE_UINT64, False),
        "stop": (F.TYPE_STRING, True),
        "speculative_tokens": (F.TYPE_INT32, False),
        "request_id": (F.TYPE_STRING, False),
        "disable_token_healing": (F.TYPE_BOOL, False),
    }
    # unset differs from 0 where 0 is a real value (seed 0) or invalid (top_p 0)
    assert gateway_pb2.GenerateRequest().HasField("seed") is False
    assert gateway_pb2.GenerateRequest(top_p=0.0).HasField("top_p")


def test_generate_response_and_model_info_fields():
    assert fields(gateway_pb2.GenerateResponse) == {
        "token_ids": (F.TYPE_INT32, True),
        "text": (F.TYPE_STRING, False),
        "request_id": (F.TYPE_STRING, False),
        "finish_reason": (F.TYPE_ENUM, False),
        "usage": (F.TYPE_MESSAGE, False),
    }
    assert gateway_pb2.FinishReason.keys() == ["FINISH_REASON_UNSPECIFIED", "FINISH_REASON_STOP",
                                               "FINISH_REASON_LENGTH", "FINISH_REASON_CANCELLED"]
    usage = set(fields(gateway_pb2.Usage))
    assert {"num_prompt_tokens", "num_completion_tokens", "num_accepted_draft_tokens"} <= usage
    model_info = set(fields(gateway_pb2.ModelInfo))
    assert {"model_name", "max_context_tokens", "vocab_size", "num_mtp_layers", "cluster"} <= model_info
    assert set(fields(gateway_pb2.ClusterShape)) == {"num_prefill_workers", "num_decode_workers", "num_expert_servers",
                                                     "num_slots_per_server", "placement_version"}


MODEL_INFO = gateway_pb2.ModelInfo(
    model_name="tiny-code", max_context_tokens=4096, vocab_size=4096, num_mtp_layers=2, num_routed_experts=8,
    num_moe_layers=3, cluster=gateway_pb2.ClusterShape(num_prefill_workers=1, num_decode_workers=1,
                                                       num_expert_servers=2, num_slots_per_server=4,
                                                       placement_version=1))


class Gateway(gateway_pb2_grpc.GatewayServicer):
    def GetModelInfo(self, request, context):
        return MODEL_INFO


@pytest.fixture
def gateway_channel():
    """A real gRPC server on a free loopback port: Gateway.GetModelInfo, health and reflection."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    gateway_pb2_grpc.add_GatewayServicer_to_server(Gateway(), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name, health.SERVICE_NAME,
                     reflection.SERVICE_NAME]
    reflection.enable_server_reflection(service_names, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("tandem.v1.Gateway", health_pb2.HealthCheckResponse.SERVING)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    server.stop(grace=None)


def test_real_server_answers_model_info_health_and_reflection(gateway_channel):
    stub = gateway_pb2_grpc.GatewayStub(gateway_channel)
    assert stub.GetModelInfo(gateway_pb2.GetModelInfoRequest(), timeout=5) == MODEL_INFO

    health_stub = health_pb2_grpc.HealthStub(gateway_channel)
    for service in ("", "tandem.v1.Gateway"):
        reply = health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        health_stub.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Nope"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    # what grpcurl does: list the services, then fetch their descriptors from the server alone
    database = ProtoReflectionDescriptorDatabase(gateway_channel)
    assert "tandem.v1.Gateway" in database.get_services()
    service = descriptor_pool.DescriptorPool(database).FindServiceByName("tandem.v1.Gateway")
    generate = service.methods_by_name["Generate"]
    assert generate.server_streaming and generate.output_type.full_name == "tandem.v1.GenerateResponse"
    assert [f.name for f in generate.input_type.fields][:2] == ["prompt", "prompt_token_ids"]


def test_codegen_is_idempotent_and_regenerates_when_a_proto_changes(tmp_path):
    def mtimes() -> dict:
        return {f: f.stat().st_mtime_ns for f in (codegen.OUT_ROOT / "tandem" / "v1").glob("*.py*")}

    codegen.generate()
    before = mtimes()
    assert codegen.generate() == [] and codegen.main([]) == 0
    assert mtimes() == before and len(before) == 1 + 3 * 4

    protos, out = tmp_path / "protos", tmp_path / "out"
    shutil.copytree(codegen.PROTO_ROOT, protos)
    first = codegen.generate(protos, out)
    assert (out / "tandem" / "v1" / "gateway_pb2_grpc.py") in first and (out / "tandem" / "v1" / "__init__.py") in first
    assert codegen.generate(protos, out) == []
    proto = protos / "tandem" / "v1" / "expert.proto"
    newer = max(f.stat().st_mtime for f in (out / "tandem" / "v1").iterdir()) + 1
    os.utime(proto, (newer, newer))
    assert len(codegen.generate(protos, out)) == 3 * 4  # every proto's three outputs, no __init__.py
    proto.unlink()
    codegen.generate(protos, out)
    assert not list((out / "tandem" / "v1").glob("expert_pb2*"))  # outputs of a deleted proto go too
