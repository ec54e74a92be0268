"""tandem.v1.Gateway over a `Backend`: proto messages in, engine requests out, and back.

The backend is either the colocated engine in-process (an `EngineRunner`) or the prefill and decode workers
(`tandem.gateway.workers.WorkerBackend`); both take the same validated request and stream StepOutputs back.
Errors end the stream with a status: INVALID_ARGUMENT (the message names the field), RESOURCE_EXHAUSTED
(admission queue full), DEADLINE_EXCEEDED, UNAVAILABLE (the engine failed or is shutting down), or a worker's
own status and message. A client that cancels its call, or whose deadline passes, has its request aborted on
the engine or decode worker at once, which frees its KV blocks.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Protocol

import grpc

from tandem.cluster.metrics import ServiceMetrics
from tandem.engine.engine import StepOutput
from tandem.engine.runner import EngineFailed, QueueFull, RunnerClosed
from tandem.engine.sampling import SamplingError, SamplingParams
from tandem.engine.token_healing import TokenHealer
from tandem.gateway.requests import RequestError, parse_generate_request
from tandem.gateway.stream import TextStream
from tandem.gateway.workers import WorkerError
from tandem.v1 import gateway_pb2 as pb
from tandem.v1 import gateway_pb2_grpc as pb_grpc

POLL_S = 0.1  # how soon a waiting stream notices its call ended
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "cancelled": pb.FINISH_REASON_CANCELLED}


class Stream(Protocol):
    """One request's StepOutputs (a `RequestStream`, from the engine runner or the worker backend)."""

    num_prompt_tokens: int
    num_draft_tokens: int
    num_accepted_draft_tokens: int
    is_finished: bool

    def get(self, timeout: float | None) -> StepOutput | None: ...


class Backend(Protocol):
    """Where requests run: `EngineRunner` (colocated) or `WorkerBackend` (prefill and decode workers)."""

    max_queued: int

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
               num_speculative_tokens: int | None = None) -> Stream: ...

    def cancel(self, request_id: str) -> None: ...

    def close(self, grace_s: float = 0.0) -> None: ...


class GatewayServicer(pb_grpc.GatewayServicer):
    """`model_info` answers GetModelInfo; with `cluster_shape` (a gateway in front of workers) its cluster shape
    is asked for at each call (`WorkerBackend.cluster_shape`: a WorkerError fails the call with its code)."""

    def __init__(self, backend: Backend, tokenizer, model_info: pb.ModelInfo, metrics: ServiceMetrics,
                 cluster_shape: Callable[[], pb.ClusterShape] | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.healer = TokenHealer(tokenizer) if tokenizer is not None else None
        self.model_info = model_info
        self.metrics = metrics
        self.cluster_shape = cluster_shape

    def GetModelInfo(self, request, context):
        if self.cluster_shape is None:
            return self.model_info
        try:
            shape = self.cluster_shape()
        except WorkerError as e:
            context.abort(e.code, str(e))
        info = pb.ModelInfo()
        info.CopyFrom(self.model_info)
        info.cluster.CopyFrom(shape)
        return info

    def Generate(self, request, context):
        # timed from here: time to first token, inter-token latency and end-to-end latency as the client sees them
        return self.metrics.start_call().stream(context, self._generate(request, context))

    def _generate(self, request, context):
        try:
            req = parse_generate_request(request, self.tokenizer, self.model_info, self.healer)
        except RequestError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        client_id = request.request_id or uuid.uuid4().hex
        engine_id = uuid.uuid4().hex  # clients' ids may collide; the engine's may not
        try:
            stream = self.backend.submit(req.prompt_ids, req.params, engine_id, req.num_speculative_tokens)
        except QueueFull as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except SamplingError as e:  # the engine's own limits (for example its KV pool)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except (RunnerClosed, EngineFailed) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except WorkerError as e:
            context.abort(e.code, str(e))
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        if not context.add_callback(lambda: self.backend.cancel(engine_id)):
            self.backend.cancel(engine_id)  # the call ended before the callback could be registered
            return
        try:
            yield from self._responses(stream, TextStream(self.tokenizer, req.stop, req.params.skip_text_prefix), client_id, context)
        finally:
            if not stream.is_finished:
                self.backend.cancel(engine_id)

    def _responses(self, stream: Stream, text: TextStream, request_id: str, context):
        num_sent = 0
        while True:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before generation ended")
            if not context.is_active():
                return
            try:
                out = stream.get(POLL_S if remaining is None else min(POLL_S, remaining))
            except EngineFailed as e:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            except WorkerError as e:
                context.abort(e.code, str(e))
            if out is None:
                continue
            token_ids, piece = text.add(out.new_token_ids)
            num_sent += len(token_ids)
            if not (out.finished or text.stopped):
                if token_ids or piece:
                    yield pb.GenerateResponse(token_ids=token_ids, text=piece, request_id=request_id)
                continue
            reason = "stop" if text.stopped else out.finish_reason
            yield pb.GenerateResponse(
                token_ids=token_ids, text=piece + text.finish(), request_id=request_id,
                finish_reason=FINISH_REASONS.get(reason, pb.FINISH_REASON_UNSPECIFIED),
                usage=pb.Usage(num_prompt_tokens=stream.num_prompt_tokens,
                               num_completion_tokens=num_sent,
                               num_draft_tokens=stream.num_draft_tokens,
                               num_accepted_draft_tokens=stream.num_accepted_draft_tokens))
            return
