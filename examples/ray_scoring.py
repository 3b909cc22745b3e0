"""Score a Ray Dataset with ``map_batches``: through the service, or in-process on GPU actors.

When a pipeline outgrows one machine, Ray Data spreads it over a cluster.
Two callable classes plug pairscore into ``Dataset.map_batches``:

* :class:`ServiceScorer` calls a pairscore service (one client per actor;
  with ``dns:///pairscore.NAMESPACE.svc.cluster.local:50051`` (the headless
  Service of deploy/kubernetes) round_robin spreads each actor's
  streams over every replica). No torch on the Ray workers.
* :class:`EngineScorer` loads the scoring engine itself in each actor
  (``pip install 'pairscore[server]'`` on the workers) and runs it on the
  actor's GPU: no service at all, one model copy per GPU.

Both add the columns of ``pairscore score``::

    pip install 'pairscore[ray]'
    python examples/ray_scoring.py pairs.parquet scored/ --target dns:///pairscore:50051 --actors 4
    python examples/ray_scoring.py pairs.parquet scored/ --engine HuggingFaceTB/SmolLM2-135M --actors 2
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pairscore.pipeline.columns import score_table
from pairscore.types import Pair


def _pairs(batch: dict[str, Any], prompt_field: str, response_field: str) -> list[Pair]:
    prompts = list(batch[prompt_field])
    responses = list(batch[response_field])
    return [Pair(prompt=str(p), response=str(r)) for p, r in zip(prompts, responses, strict=True)]


class ServiceScorer:
    """A Ray Data callable class that scores each batch through a pairscore service."""

    def __init__(
        self,
        target: str,
        *,
        prompt_field: str = "prompt",
        response_field: str = "response",
        streams: int = 2,
        **client_options: Any,
    ) -> None:
        from pairscore.client import ScoringClient

        self.client = ScoringClient(target, wait_for_ready=True, **client_options)
        self.prompt_field = prompt_field
        self.response_field = response_field
        self.streams = streams

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Return the batch with the score columns added."""
        pairs = _pairs(batch, self.prompt_field, self.response_field)
        outcomes = list(self.client.score_iter(pairs, streams=self.streams))
        return {**batch, **score_table(outcomes)}


class EngineScorer:
    """A Ray Data callable class that runs the scoring engine inside the actor.

    ``model`` is what ``pairscore serve --model`` takes (a local directory,
    a .gguf file or a Hub id; ``None``: the embedded SmolLM2); ``device``
    ``"cuda"`` uses the GPU Ray gave the actor (ask for it with
    ``num_gpus=1`` in ``map_batches``).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        prompt_field: str = "prompt",
        response_field: str = "response",
    ) -> None:
        from pairscore_server.engine.loading import ModelSpec, load_engine

        self.engine = load_engine(ModelSpec(model=model, device=device, dtype=dtype))
        self.prompt_field = prompt_field
        self.response_field = response_field

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Return the batch with the score columns added."""
        pairs = _pairs(batch, self.prompt_field, self.response_field)
        outcomes = self.engine.score_pairs(pairs)
        return {**batch, **score_table(outcomes)}


def score_dataset(
    dataset: Any,
    *,
    target: str | None = None,
    engine_model: str | None = None,
    use_engine: bool = False,
    actors: int = 1,
    batch_size: int = 256,
    gpus_per_actor: float = 0,
    device: str = "auto",
    prompt_field: str = "prompt",
    response_field: str = "response",
) -> Any:
    """``dataset.map_batches`` with a pool of ``actors`` scorer actors (service or engine)."""
    fields = {"prompt_field": prompt_field, "response_field": response_field}
    if use_engine:
        return dataset.map_batches(
            EngineScorer,
            fn_constructor_args=(engine_model,),
            fn_constructor_kwargs={"device": device, **fields},
            batch_size=batch_size,
            concurrency=actors,
            num_gpus=gpus_per_actor,
        )
    if target is None:
        raise ValueError("give a target, or use_engine=True")
    return dataset.map_batches(
        ServiceScorer,
        fn_constructor_args=(target,),
        fn_constructor_kwargs=fields,
        batch_size=batch_size,
        concurrency=actors,
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of the example."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="a Parquet file or directory (ray.data.read_parquet)")
    parser.add_argument("output", help="directory for write_parquet")
    parser.add_argument("--target", help="pairscore service to call")
    parser.add_argument("--engine", metavar="MODEL", nargs="?", const="", help="run the engine in the actors")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--gpus-per-actor", type=float, default=0)
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--response-field", default="response")
    args = parser.parse_args(argv)
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
        gpus_per_actor=args.gpus_per_actor,
        device="cuda" if args.gpus_per_actor else "auto",
        prompt_field=args.prompt_field,
        response_field=args.response_field,
    )
    scored.write_parquet(args.output)
    print(f"scored -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
