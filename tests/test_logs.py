"""Structured logs: JSON lines with the message's fields, and secrets masked in every line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import subprocess
import sys
import threading
import time

import pytest

from relay.logs import (
    JSONFormatter,
    SecretFilter,
    TextFormatter,
    configure_logging,
    info_line,
    reconfigure_logging,
)


@pytest.fixture
def captured() -> io.StringIO:
    stream = io.StringIO()
    yield stream
    logging.getLogger().handlers.clear()


def _log_to(stream: io.StringIO, fmt: str, secrets: tuple[str, ...]) -> logging.Logger:
    configure_logging("info", fmt, secrets)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    return logging.getLogger("relay.test")


def test_json_lines_carry_the_event_fields(captured):
    log = _log_to(captured, "json", ())
    log.info("%s queued", "ABC123", extra={"queue_id": "ABC123", "size": 2048, "user": None})
    entry = json.loads(captured.getvalue())
    assert entry["message"] == "ABC123 queued"
    assert entry["level"] == "info" and entry["logger"] == "relay.test"
    assert entry["queue_id"] == "ABC123" and entry["size"] == 2048
    assert "user" not in entry  # None fields are left out
    assert entry["time"].endswith("Z")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secrets_are_masked_however_they_get_in(captured, fmt):
    log = _log_to(captured, fmt, ("s3cr3t-api-key", "xy"))
    log.warning("auth failed for key %s", "s3cr3t-api-key")
    log.error("literal s3cr3t-api-key in the text")
    output = captured.getvalue()
    assert "s3cr3t-api-key" not in output
    assert output.count("********") == 2
    assert "xy" not in SecretFilter(("xy",)).secrets  # too short to mask without mangling logs


def test_exceptions_are_one_json_line(captured):
    log = _log_to(captured, "json", ())
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    [line] = captured.getvalue().splitlines()
    assert "ValueError: boom" in json.loads(line)["exception"]
    assert isinstance(JSONFormatter(), logging.Formatter)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_control_characters_from_clients_are_escaped(captured, fmt):
    log = _log_to(captured, fmt, ())
    log.warning("client said %s", "evil\r\nFAKE LINE\x00\x1b[31m\x85")
    output = captured.getvalue()
    assert output.count("\n") == 1  # one event, one line
    message = json.loads(output)["message"] if fmt == "json" else output
    assert "evil\\x0d\\x0aFAKE LINE\\x00\\x1b[31m\\x85" in message
    assert "\r" not in output and "\x1b" not in output and "\x00" not in output


def test_a_reload_masks_the_new_secrets_and_takes_the_new_format(captured):
    log = _log_to(captured, "text", ("old-api-key-1111",))
    reconfigure_logging("debug", "json", ("old-api-key-1111", "new-api-key-2222"))
    log.debug("upstream said: bad key new-api-key-2222 (was old-api-key-1111)")
    [line] = captured.getvalue().splitlines()
    entry = json.loads(line)  # the new format
    assert entry["level"] == "debug"  # the new level
    assert entry["message"] == "upstream said: bad key ******** (was ********)"


def test_a_reload_leaves_logging_it_did_not_install_alone():
    """Inside another program's logging (pytest's capture here) there is nothing to change."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    reconfigure_logging("debug", "json", ("new-api-key-2222",))
    assert root.handlers == before and root.level == level


class _Writes(io.StringIO):
    """A stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_info_lines_on_a_loop_go_out_together_once_the_turn_ends():
    stream = _Writes()
    log = _log_to(stream, "text", ())

    async def three_lines() -> tuple[str, str]:
        for n in range(3):
            log.info("line %d", n)
        during = stream.getvalue()
        await asyncio.sleep(0)  # the turn ends
        return during, stream.getvalue()

    try:
        during, after = asyncio.run(three_lines())
    finally:
        logging.getLogger().handlers.clear()
    assert during == ""
    assert [line.split(": ", 1)[1] for line in after.splitlines()] == \
        ["line 0", "line 1", "line 2"]
    assert stream.writes == 1


def test_a_warning_and_another_threads_lines_go_out_at_once_and_in_order():
    stream = _Writes()
    log = _log_to(stream, "text", ())

    async def mixed() -> list[str]:
        seen = []
        log.info("gathered 1")
        log.warning("a warning")  # written at once, after what was gathered
        seen.append(stream.getvalue())
        log.info("gathered 2")
        thread = threading.Thread(target=log.info, args=("from a thread",))
        thread.start()
        thread.join()  # the loop has not turned: the thread wrote, after the gathered line
        seen.append(stream.getvalue())
        return seen

    try:
        first, second = asyncio.run(mixed())
    finally:
        logging.getLogger().handlers.clear()
    messages = [line.split(": ", 1)[1] for line in second.splitlines()]
    assert first.count("\n") == 2
    assert messages == ["gathered 1", "a warning", "gathered 2", "from a thread"]


_GATHER_THEN = """
import asyncio, logging, os, sys
from relay.logs import configure_logging
configure_logging("info", "text")
log = logging.getLogger("relay.t")
loop = asyncio.new_event_loop()
def turn():
    log.info("gathered line")
    if sys.argv[1] == "fork":
        pid = os.fork()
        if pid == 0:
            logging.shutdown()  # as an exiting worker would
            os._exit(0)
        os.waitpid(pid, 0)
    loop.stop()  # before the turn that would write it
loop.call_soon(turn)
loop.run_forever()
if sys.argv[1] == "os._exit":  # as a worker of the supervisor ends
    logging.shutdown()
    os._exit(0)
"""


@pytest.mark.parametrize("then", ["exit", "fork", "os._exit"])
def test_gathered_lines_are_written_at_exit_and_once_across_a_fork(then):
    result = subprocess.run([sys.executable, "-c", _GATHER_THEN, then], capture_output=True,
                            text=True, timeout=30, check=True)
    assert result.stderr.count("gathered line") == 1, result.stderr


def _count_records(monkeypatch: pytest.MonkeyPatch) -> list[logging.LogRecord]:
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counting(*args: object, **kwargs: object) -> logging.LogRecord:
        made.append(factory(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(logging, "_logRecordFactory", counting)
    return made


def _without_time(line: str, fmt: str) -> object:
    if fmt == "json":
        entry = json.loads(line)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry.pop("time"))
        return entry
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", line)
    return line.split(" ", 2)[2]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_info_line_writes_what_logger_info_writes_without_a_record(fmt, monkeypatch):
    stream = io.StringIO()
    log = _log_to(stream, fmt, ("s3cr3t-api-key",))
    made = _count_records(monkeypatch)
    args = ("Q1", "evil\r\nFAKE LINE\x1b[31m", "s3cr3t-api-key")
    fields = {"queue_id": "Q1", "size": 2048, "user": None, "sender": "a\r\nb", "_hidden": 1}
    records_made = []

    async def both_ways() -> None:
        info_line(log, "%s from <%s> with key %s", *args, fields=fields)
        records_made.append(len(made))
        log.info("%s from <%s> with key %s", *args, extra=dict(fields))
        records_made.append(len(made))
        await asyncio.sleep(0)

    try:
        asyncio.run(both_ways())
    finally:
        logging.getLogger().handlers.clear()
    assert records_made == [0, 1]  # info_line made its line itself
    fast, slow = stream.getvalue().splitlines()
    assert _without_time(fast, fmt) == _without_time(slow, fmt)
    assert "s3cr3t-api-key" not in fast and "\r" not in fast and "\x1b" not in fast


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _add_handler(log: logging.Logger, handler: logging.Handler) -> None:
    logging.getLogger().addHandler(handler)


def _drop_all(log: logging.Logger, handler: logging.Handler) -> None:
    log.addFilter(lambda record: False)


def _filter_the_handler(log: logging.Logger, handler: logging.Handler) -> None:
    ours = logging.getLogger().handlers[0]
    ours.addFilter(lambda record: "drop me" not in record.getMessage())


def _raise_the_handlers_level(log: logging.Logger, handler: logging.Handler) -> None:
    logging.getLogger().handlers[0].setLevel(logging.WARNING)


def _change_the_formatter(log: logging.Logger, handler: logging.Handler) -> None:
    logging.getLogger().handlers[0].setFormatter(logging.Formatter("just %(message)s"))


def _stop_propagating(log: logging.Logger, handler: logging.Handler) -> None:
    log.propagate = False
    log.addHandler(handler)


def _stop_propagating_to_nothing(log: logging.Logger, handler: logging.Handler) -> None:
    log.propagate = False  # and no handler: logging's last resort, which takes warnings only


@pytest.mark.parametrize(("change", "written", "collected"), [
    (_add_handler, 1, ["drop me 1"]),  # the other handler gets its record too
    (_drop_all, 0, []),  # the logger's own filter is obeyed
    (_filter_the_handler, 0, []),  # a filter added to the relay's handler is obeyed
    (_raise_the_handlers_level, 0, []),
    (_change_the_formatter, 1, []),  # written as that formatter has it
    (_stop_propagating, 0, ["drop me 1"]),  # the logger's own handler, not the root's
    (_stop_propagating_to_nothing, 0, []),
])
def test_info_line_is_logger_info_whenever_more_than_the_relays_handler_is_involved(
        change, written, collected, monkeypatch):
    stream = io.StringIO()
    log = _log_to(stream, "text", ())
    other = _Collect()
    change(log, other)
    made = _count_records(monkeypatch)

    async def one_line() -> None:
        info_line(log, "drop me %d", 1, fields={})
        await asyncio.sleep(0)

    try:
        asyncio.run(one_line())
    finally:
        logging.getLogger().handlers.clear()
        log.filters.clear()
        log.handlers.clear()
        log.propagate = True
    assert len(made) == 1  # logging's own way
    assert stream.getvalue().count("drop me 1") == written
    if change is _change_the_formatter:
        assert stream.getvalue() == "just drop me 1\n"
    assert other.messages == collected


def test_info_line_outside_an_event_loop_is_written_at_once(monkeypatch):
    stream = _Writes()
    log = _log_to(stream, "text", ())
    try:
        info_line(log, "no loop %s", "here", fields={"queue_id": "Q"})
    finally:
        logging.getLogger().handlers.clear()
    assert stream.writes == 1 and stream.getvalue().endswith("INFO relay.test: no loop here\n")


@pytest.mark.parametrize("created", [
    0.0, 0.9995, 1_000_000_000.5, 1_764_968_400.123, 1_764_968_400.999_999, 1_764_968_401.0,
    4_102_444_799.001,
])
def test_the_time_is_loggings_default_to_the_millisecond(created):
    """The relay's cached stamps against logging.Formatter's own, across second boundaries."""
    record = logging.LogRecord("relay.t", logging.INFO, "", 0, "m", None, None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    assert TextFormatter().formatTime(record) == logging.Formatter().formatTime(record)
    assert json.loads(JSONFormatter().format(record))["time"] == \
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(record.msecs):03d}Z"


def test_info_line_with_one_mapping_of_arguments_is_logger_info(monkeypatch):
    stream = io.StringIO()
    log = _log_to(stream, "text", ())
    made = _count_records(monkeypatch)

    async def one_line() -> None:
        info_line(log, "%(id)s queued", {"id": "Q7"}, fields={})
        await asyncio.sleep(0)

    try:
        asyncio.run(one_line())
    finally:
        logging.getLogger().handlers.clear()
    assert len(made) == 1 and stream.getvalue().endswith(": Q7 queued\n")


class _Broken(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")


def test_a_failed_write_of_info_line_lines_is_reported(capsys):
    """logging reports a handler's failed write (handleError); lines gathered by info_line()
    have no record of their own, and their failure is reported all the same."""
    log = _log_to(_Broken(), "text", ())

    async def one_line() -> None:
        info_line(log, "lost %s", "line", fields={})
        await asyncio.sleep(0)  # the turn ends: the write fails

    try:
        asyncio.run(one_line())
    finally:
        logging.getLogger().handlers.clear()
    assert "--- Logging error ---" in capsys.readouterr().err
