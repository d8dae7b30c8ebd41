"""The peers ``shmbroker-bench compare`` runs the same workload against.

One module per peer (:mod:`.redis_streams`, :mod:`.nats_jetstream`, :mod:`.raw_socket`), each a
:class:`~shmbroker.perf.peers.base.Peer`; :mod:`.runner` drives any of them with one producer and
one consumer process.  Importing this package imports no peer's client library: a peer whose
server or client is missing is skipped (``Peer.missing`` says how to install it).
"""

from __future__ import annotations

from shmbroker.perf.peers.base import Peer
from shmbroker.perf.peers.nats_jetstream import NatsJetStream
from shmbroker.perf.peers.raw_socket import RawSocket
from shmbroker.perf.peers.redis_streams import RedisStreams

PEERS: dict[str, Peer] = {peer.name: peer for peer in (
    RedisStreams("redis", "Redis Streams"),
    NatsJetStream("nats", "NATS JetStream"),
    RawSocket("raw", "raw socket baseline"),
)}
