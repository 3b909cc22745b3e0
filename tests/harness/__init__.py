"""The one test harness: what every test tier builds on. No test module imports another.

* :mod:`harness.models` - tiny causal LMs and tokenizers built locally (fixed
  seeds, no network) and :func:`~harness.models.make_engine` on them (tier 1,
  the math).
* :mod:`harness.scoring` - seeded mixed pairs and the float32 agreement bound
  that engine tests compare scores with.
* :mod:`harness.fake_engine` - an Engine with character tokens and exact,
  predictable scores, for the batcher and server tiers (tier 2); run as a
  script, it serves itself through the real ``pairscore serve`` entry point.
* :mod:`harness.servers` - the real server in a thread (:class:`ServerThread`)
  or a child process, a stub gRPC server, free ports, metrics parsing (tier 3).
* :mod:`harness.storage` - compressed files and shard directories, output
  bytes read back independently of the code under test, moto's S3 server on
  127.0.0.1, and a CLI run killed with SIGKILL at a checkpoint (pipeline I/O).
* :mod:`harness.deploy` - the deploy/ tests' tools (kubectl, promtool,
  hadolint), built kustomize overlays, the parsed Dockerfile, PromQL queries.
* :mod:`harness.progress` - the pytest plugin that prints a progress line at
  least every minute (registered in ``tests/conftest.py``).

Fixtures live in ``tests/conftest.py``; the slow tier (the real SmolLM2
model) is marked ``slow``.
"""
