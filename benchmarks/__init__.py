"""webchat's benchmark (issue #5): ``python -m benchmarks`` from a checkout.

It starts the server itself (``twistd webchat`` pinned to one CPU, rate limit
off), drives it from a compiled load generator pinned to another, and runs
the same scenarios against naive baselines in the same invocation, so every
number comes with webchat's ratio to something run on the same machine:

* ``fanout``: 1000 receivers, 1 or 10 senders, an offered-rate ramp; the
  highest deliveries/s with p99 <= 100 ms and no loss.
* ``connect``: 15,000 connections, 50 handshakes in flight; conn/s,
  handshake latency, server RSS per idle connection.
* ``echo``: one-way latency between two clients at 10 msg/s.
* ``calibrate``: the fan-out ramp against a trivial C server, to show how much
  the load generator itself can absorb.
* ``cluster`` (issue #6, not part of ``all``): two nodes + Redis against one
  node at the same offered rates; local vs remote latency, Redis's own
  PUBLISH rate.

Not part of the installed server: the wheel ships ``webchat`` only, and this
folder runs from a checkout (``make bench``, ``make bench-quick``, ``make soak``).

Modules: ``cli`` (options, the run), ``scenarios``, ``cluster``, ``loadgen``
(+ the C source ``loadgen.c``), ``servers``, ``processes``, ``baselines``,
``report``; ``soak`` and ``flood`` are runs of their own; ``helpers`` holds
what they and the tests share (free ports, twistd, /proc readings).
"""
