"""Score a Ray Dataset with ``map_batches``: through the service, or in-process on GPU actors.

A thin wrapper: the scorers live in :mod:`pairscore.ray` (importable and
tested), which this script runs::

    pip install 'pairscore[ray]'
    python examples/ray_scoring.py pairs.parquet scored/ --target dns:///pairscore:50051 --actors 4
    python examples/ray_scoring.py pairs.parquet scored/ --engine HuggingFaceTB/SmolLM2-135M --actors 2

In your own pipeline, use the module directly::

    from pairscore.ray import score_dataset
    scored = score_dataset(ray.data.read_parquet("pairs/"), target="dns:///pairscore:50051", actors=4)

:class:`~pairscore.ray.ServiceScorer` actors need no GPU (the service has
them); :class:`~pairscore.ray.EngineScorer` actors ask for one GPU each by
default. Both add the columns of ``pairscore score`` and give a row with a
missing prompt or response (None, NaN) error ``invalid_row``.
"""

from __future__ import annotations

import sys

from pairscore.ray import EngineScorer, ServiceScorer, main, score_dataset

__all__ = ["EngineScorer", "ServiceScorer", "main", "score_dataset"]

if __name__ == "__main__":
    sys.exit(main())
