"""shmbroker-bench: the load-testing tool (Kafka's perf-test, the OpenMessaging Benchmark).

Modules:

* :mod:`shmbroker.perf.histogram` -- log-linear latency histogram (HdrHistogram-like) that child
  processes serialise and the parent merges;
* :mod:`shmbroker.perf.payloads` -- record sizes, payload buffers ("random" and "telemetry") and
  the 24-byte header (send time, producer id, sequence) each benchmark record carries;
* :mod:`shmbroker.perf.workload` -- the :class:`Workload` description, its validation and its
  TOML files (``bench/workloads/*.toml``);
* :mod:`shmbroker.perf.runner` -- starts producer and consumer processes and collects results;
* :mod:`shmbroker.perf.compare` -- ``shmbroker-bench compare``: the same workload against
  shmbroker, Redis Streams, NATS JetStream and a raw Unix-socket baseline, side by side;
* :mod:`shmbroker.perf.peers` -- those peers (one module each) and the runner that drives them;
* :mod:`shmbroker.perf.cli` -- the ``shmbroker-bench`` command.
"""
