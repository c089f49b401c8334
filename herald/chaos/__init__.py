"""``herald chaos``: the whole pipeline under load and faults, the end state checked.

One module per part: ``run`` (the stack and the run), ``load`` (users and records, each
with what it must become), ``peers`` (the loopback providers and their outages), ``faults``
(the schedule from the seed and how each fault is injected), ``watch`` (RSS, lag and
counters while it runs), ``check`` (the invariants) and ``report``.
"""
