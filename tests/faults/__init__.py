"""The fault-injection and bad-input suite (issue 7): real processes, private servers.

Every scenario starts its own server (the embedded engine's binary, append-only file
with ``appendfsync always``) and runs producers, maintenance processes and services
of both fronts (``Microservice`` and ``AsyncMicroservice``) as separate OS processes
(:mod:`faults.procs`). Producers record what they published, handlers what they
completed and on which front (:mod:`faults.ledger`); at the end each scenario checks
that nothing is missing and that duplicates stay within what its kills can explain.

Scale: ``RELAYBUS_FAULTS_SCALE`` (``ci``, the default, or ``full``, or a factor)::

    RELAYBUS_FAULTS_SCALE=full .venv/bin/python -m pytest -m faults
"""
