"""The gateway's backend over prefill and decode workers: the same submit / cancel / close as `EngineRunner`.

Per request: list the workers from the controller and, among those it lists as ready (their last heartbeat
said so; a worker whose engine failed says not) that answer GetLoad (one that failed since its last heartbeat
answers UNAVAILABLE), pick the prefill worker with the fewest queued prompt tokens and the decode worker with
the most free KV blocks; with none of a role the request fails with UNAVAILABLE saying so. Then, on a thread of
the request's own, open DecodeWorker.Decode first (it posts the KV receive) and call PrefillWorker.Prefill (it
sends the KV cache and answers with the first token); the stream yields that token, then the decode worker's. A
worker's error ends the stream with `WorkerError` carrying the worker's status code and message. `cancel` calls
the decode worker's Cancel (its KV blocks are freed at once; the stream ends "cancelled") and cancels the calls.
`stats` counts the requests waiting (for workers or their first token) and streaming, for the metrics;
`cluster_shape` asks the controller for the deployment's shape, for GetModelInfo.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

import grpc

from tandem.engine.engine import StepOutput
from tandem.engine.runner import QueueFull, RequestStream, RunnerClosed
from tandem.engine.sampling import SamplingParams
from tandem.v1 import controller_pb2 as cpb
from tandem.v1 import controller_pb2_grpc as cpb_grpc
from tandem.v1 import gateway_pb2 as gpb
from tandem.v1 import worker_pb2 as pb
from tandem.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
FINISH_REASONS = {gpb.FINISH_REASON_STOP: "stop", gpb.FINISH_REASON_LENGTH: "length",
                  gpb.FINISH_REASON_CANCELLED: "cancelled"}


class WorkerError(RuntimeError):
    """A worker (or the controller) answered a request with an error status; `code` is that status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class BackendStats:
    num_waiting: int  # admitted, waiting for workers to be picked or for the first token
    num_running: int  # streaming from a decode worker
    num_draft_tokens: int  # MTP drafts the decode workers verified for this gateway's requests, since start
    num_accepted_draft_tokens: int


class _Cancelled(Exception):
    """The request was cancelled while a worker call was open."""


class _Call:
    """One request in flight on a chosen prefill and decode worker."""

    def __init__(self, stream: RequestStream, prefill: pb_grpc.PrefillWorkerStub, prefill_rank: int,
                 decode: pb_grpc.DecodeWorkerStub, decode_rank: int, mtp_modules: int | None):
        self.stream = stream
        self.prefill, self.prefill_rank = prefill, prefill_rank
        self.decode, self.decode_rank = decode, decode_rank
        self.mtp_modules = mtp_modules  # what the decode worker asks the prefill worker to catch up; None: all
        self.cancelled = threading.Event()
        self.is_decoding = False  # the first token came: the decode worker streams the rest
        self.lock = threading.Lock()
        self.rpcs: list[grpc.Future] = []  # the open Decode and Prefill calls, cancelled with the request


class WorkerBackend:
    """Serves requests on the prefill and decode workers the controller at `controller_address` lists.

    At most `max_queued` requests are in flight at a time (QueueFull beyond). Requests that ask for the server's
    default speculation get `num_speculative_tokens`. `rpc_timeout_s` bounds the control calls (ListMembers,
    GetLoad, Cancel), `shape_timeout_s` the controller calls of `cluster_shape`."""

    def __init__(self, controller_address: str, max_queued: int, num_speculative_tokens: int,
                 rpc_timeout_s: float = 5.0, shape_timeout_s: float = 2.0):
        if max_queued <= 0:
            raise ValueError(f"max_queued must be positive, got {max_queued}")
        self.max_queued = max_queued
        self.num_speculative_tokens = num_speculative_tokens
        self.rpc_timeout_s = rpc_timeout_s
        self.shape_timeout_s = shape_timeout_s
        self.controller_address = controller_address
        self._controller_channel = grpc.insecure_channel(controller_address)
        self._controller = cpb_grpc.ControllerStub(self._controller_channel)
        self._channels: dict[str, grpc.Channel] = {}
        self._cond = threading.Condition()
        self._calls: dict[str, _Call | None] = {}  # None: its workers are being picked
        self._admitting = True
        self._num_draft_tokens = self._num_accepted_draft_tokens = 0

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
               num_speculative_tokens: int | None = None) -> RequestStream:
        """Pick the workers and start the request; raises QueueFull, RunnerClosed, or WorkerError when no
        worker of a role serves."""
        with self._cond:
            if not self._admitting:
                raise RunnerClosed("the gateway is shutting down")
            if len(self._calls) >= self.max_queued:
                raise QueueFull(f"the admission queue is full ({self.max_queued} requests in flight)")
            if request_id in self._calls:
                raise ValueError(f"request_id {request_id!r} is already running")
            stream = RequestStream(request_id, len(prompt_ids), timeout_s=None)
            self._calls[request_id] = None  # holds the place while the workers are picked
        try:
            prefill, prefill_member, _ = self._pick(cpb.ROLE_PREFILL, lambda load: -load.num_queued_prompt_tokens)
            decode, decode_member, decode_load = self._pick(cpb.ROLE_DECODE, lambda load: load.num_free_kv_blocks)
        except BaseException:
            with self._cond:
                del self._calls[request_id]
                self._cond.notify_all()
            raise
        call = _Call(stream, pb_grpc.PrefillWorkerStub(prefill), prefill_member.rank,
                     pb_grpc.DecodeWorkerStub(decode), decode_member.rank,
                     decode_load.num_mtp_modules_wanted if decode_load.HasField("num_mtp_modules_wanted") else None)
        with self._cond:
            self._calls[request_id] = call
        spec = self.num_speculative_tokens if num_speculative_tokens is None else num_speculative_tokens
        sampling = pb.SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                                     top_k=params.top_k, seed=params.seed, stop_token_ids=params.stop_token_ids,
                                     num_speculative_tokens=spec, allowed_first_tokens=params.allowed_first_tokens)
        threading.Thread(target=self._run, args=(call, list(prompt_ids), sampling), daemon=True,
                         name=f"request-{request_id[:8]}").start()
        return stream

    def cancel(self, request_id: str) -> None:
        """Stop a request: the decode worker frees its KV blocks at once and its stream ends "cancelled".
        Unknown or finished requests are ignored."""
        with self._cond:
            call = self._calls.get(request_id)
        if call is None or call.cancelled.is_set():
            return
        call.cancelled.set()
        try:
            found = call.decode.Cancel(pb.CancelRequest(request_id=request_id), timeout=self.rpc_timeout_s).is_found
        except grpc.RpcError:
            found = False
        with call.lock:
            rpcs = list(call.rpcs)
        for rpc in rpcs[1:] if found else rpcs:  # a found Decode ends itself with FINISH_REASON_CANCELLED
            rpc.cancel()  # cancelling the Decode call frees the blocks too, if Cancel came before it arrived

    @property
    def num_open(self) -> int:
        with self._cond:
            return len(self._calls)

    def stats(self) -> BackendStats:
        with self._cond:
            running = sum(1 for call in self._calls.values() if call is not None and call.is_decoding)
            return BackendStats(len(self._calls) - running, running, self._num_draft_tokens,
                                self._num_accepted_draft_tokens)

    def cluster_shape(self) -> gpb.ClusterShape:
        """The deployment as the controller sees it now: the prefill workers, decode workers and expert servers
        registered with it (ready or not: the members holding the deployment's slots, a down one until another
        takes its slot over; readiness is what ListMembers and each service's health tell), and the current
        placement's slots per expert server and version. WorkerError(UNAVAILABLE) when the controller does not
        answer within `shape_timeout_s`."""
        deadline = time.monotonic() + self.shape_timeout_s
        try:
            members = self._controller.ListMembers(cpb.ListMembersRequest(), timeout=self.shape_timeout_s).members
            placement = self._controller.GetPlacement(cpb.GetPlacementRequest(version=0),
                                                      timeout=max(deadline - time.monotonic(), 0.01))
        except grpc.RpcError as e:
            raise WorkerError(grpc.StatusCode.UNAVAILABLE, f"the cluster shape is unknown: controller "
                              f"{self.controller_address} answered {e.code().name}: {e.details()}") from None
        count = {role: sum(1 for m in members if m.role == role)
                 for role in (cpb.ROLE_PREFILL, cpb.ROLE_DECODE, cpb.ROLE_EXPERT)}
        return gpb.ClusterShape(num_prefill_workers=count[cpb.ROLE_PREFILL], num_decode_workers=count[cpb.ROLE_DECODE],
                                num_expert_servers=count[cpb.ROLE_EXPERT],
                                num_slots_per_server=placement.num_slots_per_server,
                                placement_version=placement.version)

    def close(self, grace_s: float = 0.0) -> None:
        """Stop admitting, give open requests up to `grace_s` seconds, cancel the rest and wait for them."""
        deadline = time.monotonic() + grace_s
        with self._cond:
            self._admitting = False
            while self._calls and self._cond.wait(max(deadline - time.monotonic(), 0)):
                pass
            open_ids = list(self._calls)
        for request_id in open_ids:
            self.cancel(request_id)
        with self._cond:
            self._cond.wait_for(lambda: not self._calls, timeout=self.rpc_timeout_s)
        for channel in [self._controller_channel, *self._channels.values()]:
            channel.close()

    # --- one request ------------------------------------------------------------------------------------------
    def _run(self, call: _Call, prompt_ids: list[int], sampling: pb.SamplingParams) -> None:
        stream, rid = call.stream, call.stream.request_id
        transfer_id = uuid.uuid4().int >> 65  # fits int64: unique across gateways without coordination
        try:
            decode = call.decode.Decode(pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt_ids, sampling=sampling,
                                                         kv_transfer_id=transfer_id, prefill_rank=call.prefill_rank))
            prefill = call.prefill.Prefill.future(pb.PrefillRequest(
                request_id=rid, prompt_token_ids=prompt_ids, sampling=sampling, kv_transfer_id=transfer_id,
                decode_rank=call.decode_rank, num_mtp_modules=call.mtp_modules))
            with call.lock:
                call.rpcs += [decode, prefill]
            if call.cancelled.is_set():  # cancel() ran before these calls existed
                decode.cancel()
                prefill.cancel()
            try:
                first = prefill.result()
            except grpc.RpcError as e:
                decode.cancel()  # the decode worker would wait for a KV cache that never comes
                raise self._error("prefill", e, call) from None
            with self._cond:
                call.is_decoding = True
            stream._deliver(StepOutput(rid, [first.first_token_id], "", False, None))
            self._relay(call, decode)
        except _Cancelled:
            stream._deliver(StepOutput(rid, [], "", True, "cancelled"))
        except WorkerError as e:
            stream._fail(e)
        except Exception as e:  # noqa: BLE001 - handed to the stream's reader, never left hanging
            log.exception("request %s failed in the gateway", rid)
            stream._fail(WorkerError(grpc.StatusCode.INTERNAL, f"gateway: {e!r}"))
        finally:
            with self._cond:
                del self._calls[rid]
                self._cond.notify_all()

    def _relay(self, call: _Call, decode) -> None:
        """The decode worker's messages onto the request's stream, until its finish reason."""
        stream, reason = call.stream, None
        try:
            for message in decode:
                stream.num_draft_tokens += message.num_draft_tokens
                stream.num_accepted_draft_tokens += message.num_accepted_draft_tokens
                with self._cond:
                    self._num_draft_tokens += message.num_draft_tokens
                    self._num_accepted_draft_tokens += message.num_accepted_draft_tokens
                reason = FINISH_REASONS.get(message.finish_reason)
                stream._deliver(StepOutput(stream.request_id, list(message.token_ids), "", reason is not None, reason))
                if reason is not None:
                    break
        except grpc.RpcError as e:
            raise self._error("decode", e, call) from None
        if reason is None:
            raise WorkerError(grpc.StatusCode.UNAVAILABLE, "the decode worker ended the stream without a finish reason")
        # the call's OK status follows at once; leaving before it would cancel the call, and the decode worker
        # would count a finished request as CANCELLED
        try:
            for _ in decode:
                pass
        except grpc.RpcError:
            pass  # the client has its last message already

    @staticmethod
    def _error(role: str, e: grpc.RpcError, call: _Call) -> Exception:
        if call.cancelled.is_set() and e.code() == grpc.StatusCode.CANCELLED:
            return _Cancelled()
        return WorkerError(e.code(), f"{role} worker: {e.details()}")

    # --- picking workers --------------------------------------------------------------------------------------
    def _pick(self, role: int, score) -> tuple[grpc.Channel, cpb.Member, pb.WorkerLoad]:
        """The member of `role` whose WorkerLoad scores highest, among those the controller lists as ready that
        answer GetLoad, with that load; WorkerError(UNAVAILABLE) saying why when there is none."""
        name = cpb.Role.Name(role).removeprefix("ROLE_").lower()
        try:
            members = self._controller.ListMembers(cpb.ListMembersRequest(role=role),
                                                   timeout=self.rpc_timeout_s).members
        except grpc.RpcError as e:
            raise WorkerError(grpc.StatusCode.UNAVAILABLE, f"controller: {e.details()}") from None
        ready = [m for m in members if m.is_ready]
        best, refused = None, []
        for member in ready:
            channel = self._channel(member.address)
            stub = pb_grpc.DecodeWorkerStub(channel) if role == cpb.ROLE_DECODE else pb_grpc.PrefillWorkerStub(channel)
            try:
                load = stub.GetLoad(pb.GetLoadRequest(), timeout=self.rpc_timeout_s)
            except grpc.RpcError as e:  # stopped serving since its last heartbeat (its engine failed, shutdown)
                refused.append(f"{member.address}: {e.code().name}: {e.details()}")
                continue
            if best is None or score(load) > best[0]:
                best = (score(load), channel, member, load)
        if best is None:
            if not members:
                why = "none is registered with the controller"
            elif not refused:
                why = f"{len(members)} registered, none ready"
            else:
                why = f"{len(members)} registered, {len(refused)} of them not serving: {'; '.join(refused)}"
            raise WorkerError(grpc.StatusCode.UNAVAILABLE, f"no {name} worker is ready ({why})")
        return best[1], best[2], best[3]

    def _channel(self, address: str) -> grpc.Channel:
        with self._cond:
            if address not in self._channels:
                self._channels[address] = grpc.insecure_channel(address)
            return self._channels[address]
