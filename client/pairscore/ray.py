"""Score a Ray Data ``Dataset`` with ``map_batches``: through the service, or in-process on GPU actors.

When a pipeline outgrows one machine, Ray Data spreads it over a cluster.
Two callable classes plug pairscore into ``Dataset.map_batches``:

* :class:`ServiceScorer` calls a pairscore service (one client per actor;
  with ``dns:///pairscore.NAMESPACE.svc.cluster.local:50051``, the headless
  Service of deploy/kubernetes, round_robin spreads each actor's streams over
  every replica). No torch and **no GPU** on the Ray workers: the GPUs are
  the service's, so its actors ask for ``num_gpus=0``.
* :class:`EngineScorer` loads the scoring engine itself in each actor
  (``pip install 'pairscore[server]'`` on the workers) and runs it on the
  actor's GPU: no service at all, one model copy per GPU. Its actors ask
  for **one GPU each** by default (``num_gpus=1``; Ray then sets
  ``CUDA_VISIBLE_DEVICES`` and the engine runs on ``cuda``), unless
  ``device="cpu"``.

Both add the columns of ``pairscore score`` (:mod:`pairscore.pipeline.columns`)
and follow its null rule: a row whose prompt or response is missing (None,
or NaN from pandas) gets error ``invalid_row`` and nulls, never the text
"None" or "nan". Importing this module does not import Ray::

    pip install 'pairscore[ray]'
    python -m pairscore.ray pairs.parquet scored/ --target dns:///pairscore:50051 --actors 4
    python -m pairscore.ray pairs.parquet scored/ --engine HuggingFaceTB/SmolLM2-135M --actors 2
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from typing import Any

from pairscore.pipeline.columns import normalize_scores, score_rows

__all__ = ["EngineScorer", "ServiceScorer", "main", "score_dataset"]


class ServiceScorer:
    """A Ray Data callable class that scores each batch through a pairscore service.

    ``client_options`` go to :class:`~pairscore.client.ScoringClient`
    (``timeout``, ``tls``, ``token``...); each batch is streamed with
    ``score_iter`` over ``streams`` streams. ``scores``: extra score groups
    (``"unconditional"``, ``"greedy"``; docs/scores.md) whose columns to add.
    """

    def __init__(
        self,
        target: str,
        *,
        prompt_field: str = "prompt",
        response_field: str = "response",
        streams: int = 2,
        tokenization: str = "separate",
        scores: str | Sequence[str] = (),
        **client_options: Any,
    ) -> None:
        from pairscore.client import ScoringClient

        self.scores = normalize_scores(scores)  # an unknown name fails before a channel is opened
        self.client = ScoringClient(target, wait_for_ready=True, **client_options)
        self.prompt_field = prompt_field
        self.response_field = response_field
        self.streams = streams
        self.tokenization = tokenization

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Return the batch with the score columns added."""
        return {
            **batch,
            **score_rows(
                lambda pairs: self.client.score_iter(
                    pairs,
                    streams=self.streams,
                    tokenization=self.tokenization,
                    unconditional="unconditional" in self.scores,
                    greedy="greedy" in self.scores,
                ),
                batch[self.prompt_field],
                batch[self.response_field],
                prompt_field=self.prompt_field,
                response_field=self.response_field,
                scores=self.scores,
            ),
        }


class EngineScorer:
    """A Ray Data callable class that runs the scoring engine inside the actor.

    ``model`` is what ``pairscore serve --model`` takes (a local directory,
    a .gguf file or a Hub id; ``None``: the embedded SmolLM2); ``device``
    ``"cuda"`` uses the GPU Ray gave the actor (``num_gpus=1`` in
    ``map_batches``, which :func:`score_dataset` asks for by default).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        prompt_field: str = "prompt",
        response_field: str = "response",
        scores: str | Sequence[str] = (),
    ) -> None:
        from pairscore.types import ScoreOptions
        from pairscore_server.engine import ModelSpec, score_pairs
        from pairscore_server.engine.loading import load_engine

        self.engine = load_engine(ModelSpec(model=model, device=device, dtype=dtype))
        self.scores = normalize_scores(scores)
        options = ScoreOptions(unconditional="unconditional" in self.scores, greedy="greedy" in self.scores)
        self._score_pairs = functools.partial(score_pairs, self.engine, options=options)
        self.prompt_field = prompt_field
        self.response_field = response_field

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Return the batch with the score columns added."""
        return {
            **batch,
            **score_rows(
                self._score_pairs,
                batch[self.prompt_field],
                batch[self.response_field],
                prompt_field=self.prompt_field,
                response_field=self.response_field,
                scores=self.scores,
            ),
        }


def score_dataset(
    dataset: Any,
    *,
    target: str | None = None,
    engine_model: str | None = None,
    use_engine: bool = False,
    actors: int = 1,
    batch_size: int = 256,
    gpus_per_actor: float | None = None,
    device: str = "auto",
    prompt_field: str = "prompt",
    response_field: str = "response",
    streams: int = 2,
    client_options: dict[str, Any] | None = None,
    scores: str | Sequence[str] = (),
) -> Any:
    """``dataset.map_batches`` with a pool of ``actors`` scorer actors (service or engine).

    ``gpus_per_actor`` (``None``: the default) is 0 for the service variant
    and 1 for the engine variant, 0 with ``device="cpu"``; with GPUs and
    ``device="auto"`` the engine runs on ``cuda``.
    """
    fields: dict[str, Any] = {
        "prompt_field": prompt_field,
        "response_field": response_field,
        "scores": normalize_scores(scores),
    }
    if use_engine:
        gpus = (0.0 if device == "cpu" else 1.0) if gpus_per_actor is None else gpus_per_actor
        if gpus and device == "auto":
            device = "cuda"
        return dataset.map_batches(
            EngineScorer,
            fn_constructor_args=(engine_model,),
            fn_constructor_kwargs={"device": device, **fields},
            batch_size=batch_size,
            concurrency=actors,
            num_gpus=gpus,
        )
    if target is None:
        raise ValueError("give a target, or use_engine=True")
    return dataset.map_batches(
        ServiceScorer,
        fn_constructor_args=(target,),
        fn_constructor_kwargs={**fields, "streams": streams, **(client_options or {})},
        batch_size=batch_size,
        concurrency=actors,
        num_gpus=gpus_per_actor or 0,
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: read Parquet, score, write Parquet."""
    parser = argparse.ArgumentParser(
        prog="python -m pairscore.ray",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help="a Parquet file or directory (ray.data.read_parquet)")
    parser.add_argument("output", help="directory for write_parquet")
    parser.add_argument("--target", help="pairscore service to call")
    parser.add_argument("--engine", metavar="MODEL", nargs="?", const="", help="run the engine in the actors")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="GPUs per actor (default: 1 with --engine, 0 with --target)",
    )
    parser.add_argument("--device", default="auto", help="engine device: auto, cuda or cpu (default: auto)")
    parser.add_argument(
        "--batch-size", type=int, default=256, help="rows per map_batches call (default: 256)"
    )
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--response-field", default="response")
    parser.add_argument(
        "--scores",
        default="conditional",
        help="score groups, comma-separated: conditional (always), unconditional, greedy (docs/scores.md)",
    )
    args = parser.parse_args(argv)
    try:
        scores = normalize_scores(args.scores)
    except ValueError as exc:
        parser.error(str(exc))
    if (args.target is None) == (args.engine is None):
        parser.error("give exactly one of --target and --engine")

    import ray

    ray.init()
    dataset = ray.data.read_parquet(args.input)
    scored = score_dataset(
        dataset,
        target=args.target,
        engine_model=args.engine or None,
        use_engine=args.engine is not None,
        actors=args.actors,
        batch_size=args.batch_size,
        gpus_per_actor=args.gpus_per_actor,
        device=args.device,
        prompt_field=args.prompt_field,
        response_field=args.response_field,
        scores=scores,
    )
    scored.write_parquet(args.output)
    print(f"scored -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
