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

With ``--per-file`` (:func:`score_files`) every Parquet file of the input
is a shard scored into its own output directory, ``OUTPUT/<file name
without .parquet>/``, written under a temporary name and renamed into place
only when complete; a rerun after a failure skips the shards whose output
directory exists and scores the rest::

    python -m pairscore.ray /shared/pairs/ /shared/scored/ --per-file --target dns:///pairscore:50051 --actors 8
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pairscore.hf import ScoreColumns
from pairscore.inputs import RowFields
from pairscore.pipeline.columns import normalize_scores, request_options
from pairscore.pipeline.row_batches import score_batch

__all__ = ["EngineScorer", "FilesOutcome", "ServiceScorer", "main", "score_dataset", "score_files"]


class ServiceScorer(ScoreColumns):
    """A Ray Data callable class that scores each batch through a pairscore service.

    :class:`pairscore.hf.ScoreColumns` (the same arguments: ``prompt_field``,
    ``response_field``, ``tokenization``, ``scores``, the input forms
    ``messages_field`` / ``prompt_ids_field`` / ``response_ids_field``,
    ``truncation``, ``end_of_turn``, ``prefix``, and ``client_options`` for
    :class:`~pairscore.client.ScoringClient` such as ``timeout``, ``tls``,
    ``token``) that returns the whole batch with the score columns added,
    streams each batch over ``streams`` streams (2 by default) and opens
    its client at once (``self.client``). A malformed value gives its row
    ``invalid_row``.
    """

    def __init__(self, target: str, *, streams: int = 2, **options: Any) -> None:
        super().__init__(target, streams=streams, **options)
        self.client = self._get_client()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Return the batch with the score columns added."""
        return {**batch, **super().__call__(batch)}


class EngineScorer:
    """A Ray Data callable class that scores inside the actor with a
    :class:`pairscore_server.Scorer` (the engine a server runs, loaded in-process).

    ``model`` is what ``pairscore serve --model`` takes (a local directory,
    a .gguf file or a Hub id; ``None``: the embedded SmolLM2); ``device``
    ``"cuda"`` uses the GPU Ray gave the actor (``num_gpus=1`` in
    ``map_batches``, which :func:`score_dataset` asks for by default).
    ``messages_field`` (a column of conversations, lists of {role, content}, as
    the prompt), ``prompt_ids_field`` / ``response_ids_field`` (token ids) and
    ``truncation``, ``end_of_turn``, ``prefix``: as in ``pairscore score``
    (docs/pipeline.md, "Input forms"); a malformed value gives its row
    ``invalid_row``.
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
        messages_field: str | None = None,
        prompt_ids_field: str | None = None,
        response_ids_field: str | None = None,
        truncation: str = "none",
        end_of_turn: str = "included",
        prefix: str = "server",
    ) -> None:
        from pairscore_server import Scorer

        self.fields = RowFields(
            prompt_field=prompt_field,
            response_field=response_field,
            messages_field=messages_field,
            prompt_ids_field=prompt_ids_field,
            response_ids_field=response_ids_field,
        )
        self.scores = normalize_scores(scores)
        # an unknown value: ValueError naming the choices, before the model loads
        options = request_options(self.scores, "separate", truncation, end_of_turn, prefix)
        self.scorer = Scorer(model, device=device, dtype=dtype)
        self._score_pairs = functools.partial(self.scorer.score, options=options)
        self.prompt_field = prompt_field
        self.response_field = response_field

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Return the batch with the score columns added."""
        return {**batch, **score_batch(self._score_pairs, batch, self.fields, scores=self.scores)}


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
    messages_field: str | None = None,
    prompt_ids_field: str | None = None,
    response_ids_field: str | None = None,
    truncation: str = "none",
    end_of_turn: str = "included",
    prefix: str = "server",
) -> Any:
    """``dataset.map_batches`` with a pool of ``actors`` scorer actors (service or engine).

    ``gpus_per_actor`` (``None``: the default) is 0 for the service variant
    and 1 for the engine variant, 0 with ``device="cpu"``; with GPUs and
    ``device="auto"`` the engine runs on ``cuda``. ``messages_field``
    (conversations as the prompt), ``prompt_ids_field`` /
    ``response_ids_field`` (token ids), ``truncation``, ``end_of_turn`` and
    ``prefix``: as in ``pairscore score`` (docs/pipeline.md).
    """
    fields: dict[str, Any] = {
        "prompt_field": prompt_field,
        "response_field": response_field,
        "scores": normalize_scores(scores),
        "messages_field": messages_field,
        "prompt_ids_field": prompt_ids_field,
        "response_ids_field": response_ids_field,
        "truncation": truncation,
        "end_of_turn": end_of_turn,
        "prefix": prefix,
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


#: Prefix of the directory a shard is written to before it is renamed into place.
TEMP_PREFIX = "._pairscore_tmp-"


@dataclass
class FilesOutcome:
    """What :func:`score_files` did: output directories written now, and those already there."""

    scored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def shard_output(output_dir: str | os.PathLike[str], input_file: str | os.PathLike[str]) -> Path:
    """The output directory of one input file: ``OUTPUT/<its name without .parquet>``."""
    name = Path(input_file).name
    return Path(output_dir) / (name[: -len(".parquet")] if name.endswith(".parquet") else name)


def parquet_files(input_path: str | os.PathLike[str]) -> list[str]:
    """The Parquet files of a directory (recursively, sorted), or the one file given."""
    path = Path(input_path)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*.parquet") if p.is_file())
    return [str(path)]


def score_files(
    inputs: Iterable[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    read: Callable[[str], Any] | None = None,
    **score_options: Any,
) -> FilesOutcome:
    """Score each input Parquet file as one shard into ``output_dir/<name>/``, skipping finished ones.

    A shard is written with ``write_parquet`` into a temporary directory
    beside its output (``output_dir/._pairscore_tmp-<name>-<random>``) and
    renamed to ``output_dir/<name>`` once the write returned, so an output
    directory exists only for a shard that was completely written. A rerun
    (the same call after a crash, a failed actor, a lost node...) skips
    every shard whose output exists and removes the temporary directories
    that an interrupted write left. ``output_dir`` must be a file system
    every Ray node writes to and that can rename (local disk on one machine,
    NFS or another shared POSIX file system on a cluster; not an object
    store). The shards are scored one after another, each over the whole
    actor pool; ``score_options`` go to :func:`score_dataset`. Two files
    with the same name in different folders would share an output: refused.
    ``read`` (default ``ray.data.read_parquet``) turns a path into a dataset.
    """
    if read is None:
        import ray.data

        read = ray.data.read_parquet
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [str(f) for f in inputs]
    finals = [shard_output(out, f) for f in files]
    if len({f.name for f in finals}) != len(finals):
        raise ValueError("two input files have the same name: their outputs would collide")
    for leftover in out.glob(TEMP_PREFIX + "*"):  # an interrupted write: never a finished shard
        shutil.rmtree(leftover, ignore_errors=True)
    outcome = FilesOutcome()
    for file, final in zip(files, finals, strict=True):
        if final.exists():
            outcome.skipped.append(str(final))
            continue
        temp = out / f"{TEMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        try:
            score_dataset(read(file), **score_options).write_parquet(str(temp))
            os.rename(temp, final)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        outcome.scored.append(str(final))
    return outcome


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: read Parquet, score, write Parquet."""
    parser = argparse.ArgumentParser(
        prog="python -m pairscore.ray",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help="a Parquet file or directory (ray.data.read_parquet)")
    parser.add_argument("output", help="directory for write_parquet (with --per-file: one per input file)")
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
        "--per-file",
        action="store_true",
        help="score each Parquet file of INPUT as one shard into OUTPUT/<file name without .parquet>/, "
        "renamed into place when complete; a rerun skips the shards whose output exists",
    )
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
    options: dict[str, Any] = {
        "target": args.target,
        "engine_model": args.engine or None,
        "use_engine": args.engine is not None,
        "actors": args.actors,
        "batch_size": args.batch_size,
        "gpus_per_actor": args.gpus_per_actor,
        "device": args.device,
        "prompt_field": args.prompt_field,
        "response_field": args.response_field,
        "scores": scores,
    }
    if args.per_file:
        done = score_files(parquet_files(args.input), args.output, **options)
        print(
            f"scored {len(done.scored)} shards, skipped {len(done.skipped)} already done -> {args.output}",
            file=sys.stderr,
        )
        return 0
    score_dataset(ray.data.read_parquet(args.input), **options).write_parquet(args.output)
    print(f"scored -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
