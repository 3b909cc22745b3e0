"""The one failure table (errors.FAILURES): what the servicer and ScoreStream make of each failure."""

from __future__ import annotations

import inspect

import grpc
import pytest

from pairscore.convert import ConversionError
from pairscore_server import errors, service, servicer
from pairscore_server.errors import FAILURES, Failure, QueueFullError, failure_for


def _instance(kind: type[Exception]) -> Exception:
    if issubclass(kind, QueueFullError):
        return kind("the queue is full", retry_after_s=0.25)
    return kind("what went wrong")


@pytest.mark.parametrize("row", FAILURES, ids=lambda f: f.exception.__name__)
def test_the_servicer_ends_an_rpc_with_the_tables_status(row: Failure) -> None:
    exc = _instance(row.exception)
    code, message, trailers = servicer._status_for(exc)
    assert code is grpc.StatusCode[row.status]
    assert message == row.message(exc)
    assert message.endswith(str(exc)), "the caller reads the cause"
    if isinstance(exc, QueueFullError):
        assert trailers == ((servicer.RETRY_PUSHBACK_KEY, "250"),)
    else:
        assert trailers == ()


@pytest.mark.parametrize("row", FAILURES, ids=lambda f: f.exception.__name__)
def test_score_stream_answers_with_the_tables_item_error(row: Failure) -> None:
    exc = _instance(row.exception)
    item = service._as_item_error(exc)
    if row.item_code is None:
        assert item is None, "this failure ends the stream"
    else:
        assert item is not None and item.code is row.item_code
        assert item.message == row.message(exc)


def test_every_failure_type_of_the_server_has_a_row_and_subclasses_follow_their_base() -> None:
    kinds = [
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, Exception) and obj.__module__ == errors.__name__
    ]
    assert kinds, "errors.py defines the server's failure types"
    for kind in kinds:
        assert failure_for(_instance(kind)) is not None, f"{kind.__name__} has no row"
    assert failure_for(errors.WorkerUnavailableError("stuck")).status == "UNAVAILABLE"
    assert failure_for(ConversionError("bad enum")).message(ConversionError("bad enum")) == (
        "invalid request: bad enum"
    )


def test_an_unexpected_exception_is_internal_and_names_only_its_type() -> None:
    assert failure_for(KeyError("secret")) is None
    code, message, _ = servicer._status_for(KeyError("secret"))
    assert code is grpc.StatusCode.INTERNAL
    assert message == "internal server error (KeyError)"
    assert service._as_item_error(KeyError("secret")) is None


def test_the_docs_table_is_the_servers_table() -> None:
    """docs/api.md's copy of FAILURES: one row per failure, with its status and item code."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "(`" in line]
    assert len(rows) == len(FAILURES)
    for row, failure in zip(rows, FAILURES, strict=True):
        assert f"(`{failure.exception.__name__}`)" in row
        status = row.split("|")[2]
        assert f"`{failure.status}`" in status
        item = row.split("|")[3]
        if failure.item_code is None:
            assert "stream ends" in item
        else:
            assert f"`ITEM_ERROR_CODE_{failure.item_code.name}`" in item
