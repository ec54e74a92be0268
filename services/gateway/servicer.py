"""tandem.v1.Gateway over an EngineRunner: proto messages in, engine requests out, and back.

This first version serves the colocated engine in-process (one `EngineRunner`); later the same servicer
fronts prefill and decode workers. Errors end the stream with a status: INVALID_ARGUMENT (the message names
the field), RESOURCE_EXHAUSTED (admission queue full), DEADLINE_EXCEEDED, UNAVAILABLE (the engine failed or
is shutting down). A client that cancels its call, or whose deadline passes, has its request aborted on the
engine at once, which frees its KV blocks.
"""

from __future__ import annotations

import uuid

import grpc

from tandem.engine.runner import EngineFailed, EngineRunner, QueueFull, RequestStream, RunnerClosed
from tandem.engine.sampling import SamplingError
from tandem.gateway.requests import RequestError, parse_generate_request
from tandem.gateway.stream import TextStream
from tandem.v1 import gateway_pb2 as pb
from tandem.v1 import gateway_pb2_grpc as pb_grpc

POLL_S = 0.1  # how soon a waiting stream notices its call ended
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "cancelled": pb.FINISH_REASON_CANCELLED}


class GatewayServicer(pb_grpc.GatewayServicer):
    def __init__(self, runner: EngineRunner, tokenizer, model_info: pb.ModelInfo):
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_info = model_info

    def GetModelInfo(self, request, context):
        return self.model_info

    def Generate(self, request, context):
        try:
            req = parse_generate_request(request, self.tokenizer, self.model_info)
        except RequestError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        client_id = request.request_id or uuid.uuid4().hex
        engine_id = uuid.uuid4().hex  # clients' ids may collide; the engine's may not
        try:
            stream = self.runner.submit(req.prompt_ids, req.params, engine_id, req.num_speculative_tokens)
        except QueueFull as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except SamplingError as e:  # the engine's own limits (for example its KV pool)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except (RunnerClosed, EngineFailed) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        if not context.add_callback(lambda: self.runner.cancel(engine_id)):
            self.runner.cancel(engine_id)  # the call ended before the callback could be registered
            return
        try:
            yield from self._responses(stream, TextStream(self.tokenizer, req.stop), client_id, context)
        finally:
            if not stream.is_finished:
                self.runner.cancel(engine_id)

    def _responses(self, stream: RequestStream, text: TextStream, request_id: str, context):
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
