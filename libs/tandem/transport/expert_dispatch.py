"""Running one MoE layer's routed experts on the expert servers: the attention worker's side.

Wire protocol, per (attention rank, expert server) exchange, on the plane's expert group:

  request, attention -> server, four messages in this order:
    REQUEST_HEADER  int64 [9]: kind=EXPERT_REQUEST, layer, R num_rows, P num_pairs, request_seq,
                               D hidden, x dtype code, weights dtype code, placement version
    REQUEST_ROWS    [R, D] x.dtype     the distinct token rows this server needs
    REQUEST_PAIRS   int64 [2, P]       per (token, expert) pair: row index into REQUEST_ROWS, local slot
    REQUEST_WEIGHTS [P] weights.dtype  per pair: the router weight
  reply, server -> attention, two messages:
    RESULT_HEADER   int64 [9]: kind=EXPERT_RESULT (or EXPERT_ERROR), layer, R, P, request_seq (echoed)
    RESULT_ROWS     [R, D] x.dtype     per row: sum over its pairs of weight * expert(row); zeros on error
  shutdown, attention -> server: REQUEST_HEADER with kind=SHUTDOWN, nothing else, no reply; the server
    stops listening to that sender.

The local slots of a request are those of the placement version in its header: while the placement changes,
an expert server holds the experts of the old and the new version side by side, and attention workers switch
version between two engine steps, so every request names slots the server has (an unknown version is
answered with EXPERT_ERROR).

Each message part has its own tag and gloo matches receives to sends per (peer, tag) in order, so a server
answers each sender's requests in the order sent and replies come back in request order; the echoed
layer and request_seq catch a crossed reply. Because the reply has a known size, the attention worker posts
its receives together with its sends: all involved servers are sent to before any reply is awaited.

Errors: every wait is bounded by the call's timeout; a dead server (connection closed) fails at once, a
silent one after timeout_s, both as TransportError naming the server's rank and the layer. After a timeout,
gloo has closed this process's expert-group connections (see DataPlane): the worker must rejoin.

Timing: with an `ExchangeTime` attached (`time_exchanges`), each exchange adds the time its caller spent in
`dispatch` (grouping tokens by server, posting) and in `InFlight.wait` (waiting for the replies, combining
them): the attention worker's time blocked on the expert servers, not the time it computes while a
dispatched layer is in flight.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
from torch import nn

from tandem.moe.placement import LayerPlacement
from tandem.transport.group import DataPlane
from tandem.transport.wire import (Deadline, Kind, Tag, TransportError, dtype_code, empty_header, make_header,
                                   post_recv, post_send, wait)


@dataclass(slots=True)
class ExchangeTime:
    """Seconds spent in expert exchanges and how many ended, since start. Written by the thread that runs the
    model (one per plane, see RemoteExperts), read by metrics scrapes: plain numbers, no lock."""

    seconds: float = 0.0
    count: int = 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.count += 1


def time_exchanges(model: nn.Module, timer: ExchangeTime | None = None) -> ExchangeTime:
    """Attach one ExchangeTime to every RemoteExperts in `model` (a new one unless given); returns it."""
    timer = ExchangeTime() if timer is None else timer
    for module in model.modules():
        if isinstance(module, RemoteExperts):
            module.exchange_time = timer
    return timer


@dataclass(slots=True)
class _Exchange:
    """One server's share of one dispatch: the posted sends and receives, and where its rows go back."""

    rank: int
    seq: int
    rows: torch.Tensor  # [R] token index of each row sent
    sends: list
    reply_header: torch.Tensor
    result: torch.Tensor  # [R, D]
    recvs: list


class InFlight:
    """A dispatched layer whose results are still on the wire; `wait()` combines them into [T, D].

    Always wait an InFlight, even when its result is no longer wanted (see `wait`)."""

    def __init__(self, out: torch.Tensor, layer: int, exchanges: list[_Exchange], deadline: Deadline,
                 error: TransportError | None = None, timer: ExchangeTime | None = None,
                 dispatch_s: float = 0.0):
        self._out = out
        self._layer = layer
        self._exchanges = exchanges
        self._deadline = deadline
        self._error = error  # a failure while posting, raised once the posted exchanges are drained
        self._timer = timer
        self._dispatch_s = dispatch_s  # time `dispatch` took, added to the timer with the wait's

    def wait(self) -> torch.Tensor:
        """Combine every server's reply; raises the first TransportError only after every exchange has ended,
        because a receive abandoned while posted stalls its connection for the next call."""
        started = time.perf_counter()
        errors = [] if self._error is None else [self._error]
        for ex in self._exchanges:
            try:
                self._finish(ex)
            except TransportError as e:
                errors.append(e)
        self._exchanges = []
        if self._timer is not None:
            self._timer.add(self._dispatch_s + time.perf_counter() - started)
            self._timer = None  # a second wait adds nothing
        if errors:
            raise errors[0]
        return self._out

    def _finish(self, ex: _Exchange) -> None:
        what = f"expert server rank {ex.rank}, MoE layer {self._layer}"
        for work in ex.sends:
            wait(work, self._deadline.remaining(), f"sending to {what}")
        wait(ex.recvs[0], self._deadline.remaining(), f"waiting for {what}")
        wait(ex.recvs[1], self._deadline.remaining(), f"waiting for {what}")
        kind, layer, num_rows, _, seq = ex.reply_header[:5].tolist()
        if kind == Kind.EXPERT_ERROR:
            raise TransportError(f"{what} could not run request {ex.seq} (see the server's log)")
        if (kind, layer, num_rows, seq) != (Kind.EXPERT_RESULT, self._layer, ex.rows.numel(), ex.seq):
            raise TransportError(f"{what}: reply (kind {kind}, layer {layer}, {num_rows} rows, seq {seq}) "
                                 f"does not answer request {ex.seq} of {ex.rows.numel()} rows")
        self._out.index_add_(0, ex.rows, ex.result)


class RemoteExperts(nn.Module):
    """The expert servers as the `experts` callable of one MoE layer; same signature as LocalExperts.

    Physical slot p lives on expert server p // slots_per_server as its local slot p % slots_per_server.
    Calls must be issued from one thread at a time per plane (the plane's expert_lock enforces it); several
    may be in flight at once via `dispatch`, e.g. two micro-batches in ping-pong.
    """

    def __init__(self, plane: DataPlane, layer: int, placement: LayerPlacement, slots_per_server: int,
                 timeout_s: float, version: int = 0):
        super().__init__()
        if plane.roles is None:
            raise ValueError("RemoteExperts needs a DataPlane joined with roles (to find the expert servers)")
        self.plane = plane
        self.layer = layer
        self.slots_per_server = slots_per_server
        self.timeout_s = timeout_s
        self.register_buffer("log2phy", placement.log2phy, persistent=False)
        self.register_buffer("logcnt", placement.logcnt, persistent=False)
        self.set_placement(placement, version)
        self._seq = itertools.count(1)
        self.exchange_time: ExchangeTime | None = None  # see `time_exchanges`

    def set_placement(self, placement: LayerPlacement, version: int) -> None:
        """Route with placement `version` from the next call on (never while a dispatch is in flight)."""
        num_physical = int(placement.log2phy.max()) + 1
        if -(-num_physical // self.slots_per_server) > self.plane.roles.num_expert_servers:
            raise ValueError(f"MoE layer {self.layer}: {num_physical} physical slots need more than the "
                             f"{self.plane.roles.num_expert_servers} expert servers of {self.slots_per_server} slots")
        self.log2phy = placement.log2phy.to(self.log2phy.device)
        self.logcnt = placement.logcnt.to(self.logcnt.device)
        self.version = version

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], expert_ids [T, K] logical, weights [T, K] -> [T, D] weighted sum of the experts' outputs."""
        return self.dispatch(x, expert_ids, weights).wait()

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> InFlight:
        """Send every involved server its share; returns at once with the replies' receives posted."""
        # T tokens, K active experts, D hidden; per server: P (token, expert) pairs over R distinct rows
        started = time.perf_counter()
        slots = LayerPlacement(self.log2phy, self.logcnt).to_physical(expert_ids)
        server_of = slots // self.slots_per_server
        deadline = Deadline(self.timeout_s)
        exchanges, error = [], None
        with self.plane.expert_lock:
            for server in torch.unique(server_of).tolist():
                token, k = (server_of == server).nonzero(as_tuple=True)  # row-major: tokens ascending
                rows, row_of_pair = torch.unique_consecutive(token, return_inverse=True)
                pairs = torch.stack([row_of_pair, slots[token, k] % self.slots_per_server])
                try:
                    exchanges.append(self._post(server, x[rows].contiguous(), pairs,
                                                weights[token, k].contiguous(), rows))
                except TransportError as e:  # keep posting: the other servers' shares must still complete
                    error = error or e
        return InFlight(torch.zeros_like(x), self.layer, exchanges, deadline, error, self.exchange_time,
                        time.perf_counter() - started)

    def _post(self, server: int, x_rows: torch.Tensor, pairs: torch.Tensor, pair_weights: torch.Tensor,
              rows: torch.Tensor) -> _Exchange:
        rank = self.plane.roles.expert_rank(server)
        group, device = self.plane.expert_group, self.plane.device
        what = f"sending to expert server rank {rank}, MoE layer {self.layer}"
        seq = next(self._seq)
        num_rows, hidden = x_rows.shape
        header = make_header(Kind.EXPERT_REQUEST, self.layer, num_rows, pairs.shape[1], seq, hidden,
                             dtype_code(x_rows.dtype), dtype_code(pair_weights.dtype), self.version, device=device)
        sends = [post_send(t, rank, group, tag, what) for t, tag in
                 ((header, Tag.REQUEST_HEADER), (x_rows, Tag.REQUEST_ROWS), (pairs, Tag.REQUEST_PAIRS),
                  (pair_weights, Tag.REQUEST_WEIGHTS))]
        reply_header = empty_header(device)
        result = torch.empty_like(x_rows)
        recvs = [post_recv(reply_header, rank, group, Tag.RESULT_HEADER, what),
                 post_recv(result, rank, group, Tag.RESULT_ROWS, what)]
        return _Exchange(rank, seq, rows, sends, reply_header, result, recvs)
