"""A client of a running gateway (tandem.v1.Gateway): what `tandem generate --gateway` and the cluster benchmark
use."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from tandem.v1 import gateway_pb2 as pb
from tandem.v1 import gateway_pb2_grpc as pb_grpc

FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                  pb.FINISH_REASON_CANCELLED: "cancelled"}


def speculative_field(num_speculative_tokens: int | None) -> int:
    """The request's `speculative_tokens` for a CLI-style setting: None = the server's default (0 on the wire),
    0 = no speculation (-1 on the wire), n = at most n."""
    if num_speculative_tokens is None:
        return 0
    return -1 if num_speculative_tokens == 0 else num_speculative_tokens


@dataclass(slots=True)
class Completion:
    """A whole streamed completion, assembled."""

    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)

    def add(self, response: pb.GenerateResponse) -> None:
        self.request_id = response.request_id
        self.token_ids += list(response.token_ids)
        self.text += response.text
        if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = FINISH_REASONS[response.finish_reason]
            u = response.usage
            self.usage = {"prompt_tokens": u.num_prompt_tokens, "completion_tokens": u.num_completion_tokens,
                          "draft_tokens": u.num_draft_tokens, "accepted_draft_tokens": u.num_accepted_draft_tokens}


class GatewayClient:
    """One channel to a gateway; `stream` yields the responses of one Generate call."""

    def __init__(self, address: str):
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.GatewayStub(self.channel)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the channel connects; grpc.FutureTimeoutError names nothing, so say what failed."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise ConnectionError(f"no gateway answers at {self.address} (waited {timeout_s:.0f} s)") from None

    def stream(self, request: pb.GenerateRequest, timeout_s: float | None = None) -> Iterator[pb.GenerateResponse]:
        return self.stub.Generate(request, timeout=timeout_s)

    def generate(self, request: pb.GenerateRequest, timeout_s: float | None = None) -> Completion:
        completion = Completion()
        for response in self.stream(request, timeout_s):
            completion.add(response)
        return completion

    def model_info(self, timeout_s: float = 10.0) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "GatewayClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
