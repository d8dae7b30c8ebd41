"""``shmbroker groups`` (list, describe, reset-offsets, delete), ``consume --group`` and the Admin
methods behind them (``kafka-consumer-groups`` of shmbroker), against a real broker.

The topic ``events`` has 2 partitions holding 12 and 7 records; record i of partition p has
value ``p-i`` and timestamp ``BASE_MS + 10 * i + 5 * p``.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from broker_helpers import RunningBroker, wait_for
from click.testing import Result
from integration.cli_helpers import cli, failed, ok

from shmbroker import Consumer, Producer, TopicPartition
from shmbroker.errors import (
    GroupIdNotFoundError,
    NonEmptyGroupError,
    NoOffsetForPartitionError,
    UnknownTopicOrPartitionError,
)

pytestmark = pytest.mark.integration

TP0, TP1 = TopicPartition("events", 0), TopicPartition("events", 1)
RECORDS = {0: 12, 1: 7}  # records per partition of "events"
BASE_MS = 1_700_000_000_000
WAIT_S = 10.0



def rows(text: str) -> list[list[str]]:
    """The non-blank lines of ``text``, split at whitespace."""
    return [line.split() for line in text.splitlines() if line.strip()]


def timestamp_ms(partition: int, offset: int) -> int:
    return BASE_MS + 10 * offset + 5 * partition


@pytest.fixture
def events(broker: RunningBroker) -> RunningBroker:
    """The broker, with topic ``events`` filled as the module docstring says."""
    with broker.admin() as admin:
        admin.create_topic("events", partitions=2)
    with Producer(broker.data_dir, linger_ms=1) as producer:
        for partition, count in RECORDS.items():
            for offset in range(count):
                producer.send("events", b"%d-%d" % (partition, offset), partition=partition,
                              timestamp_ms=timestamp_ms(partition, offset))
        producer.flush(WAIT_S)
    return broker


def commit(data_dir: Path, group_id: str, offsets: dict[TopicPartition, int]) -> None:
    """Commit as an assigned consumer (no membership: the group stays offsets-only)."""
    with Consumer(data_dir, group_id=group_id, enable_auto_commit=False) as consumer:
        consumer.commit(offsets)


def committed(broker: RunningBroker, group_id: str) -> dict[tuple[str, int], int]:
    with broker.admin() as admin:
        return admin.list_consumer_group_offsets(group_id)


@pytest.fixture
def live_member(events: RunningBroker) -> Iterator[Consumer]:
    """A member of group ``live`` (this process) that owns both partitions of ``events`` and
    has committed offset 5 of partition 0; closed after the test (if the test did not)."""
    consumer = Consumer(events.data_dir, group_id="live", enable_auto_commit=False,
                        auto_offset_reset="earliest", client_id="test-client")
    try:
        consumer.subscribe(["events"])

        def owns_both() -> bool:
            consumer.poll(10)
            return consumer.assignment() == {TP0, TP1}

        wait_for(owns_both, WAIT_S, message="the member to get both partitions")
        consumer.commit({TP0: 5})
        with events.admin() as admin:
            wait_for(lambda: admin.describe_consumer_group("live")["state"] == "Stable", WAIT_S,
                     message="group 'live' to be Stable")
        yield consumer
    finally:
        consumer.close()


# -- list and describe ---------------------------------------------------------------------------
def test_list_and_describe_a_live_member_and_an_offsets_only_group(
        events: RunningBroker, live_member: Consumer) -> None:
    data_dir = events.data_dir
    commit(data_dir, "batch", {TP0: 3, TP1: 7})
    with events.admin() as admin:
        (member,) = admin.describe_consumer_group("live")["members"]
        listed = admin.list_consumer_groups()
    epoch = listed[1]["group_epoch"]
    assert epoch >= 1
    assert listed == [
        {"group_id": "batch", "state": "Empty", "group_epoch": 0, "members": 0},
        {"group_id": "live", "state": "Stable", "group_epoch": epoch, "members": 1}]
    assert rows(ok(cli(data_dir, "groups", "list")).stdout) == [
        ["GROUP", "STATE", "MEMBERS", "EPOCH"], ["batch", "Empty", "0", "0"],
        ["live", "Stable", "1", str(epoch)]]

    # the live group: its member is this process, owning both partitions
    member_id = member["member_id"]
    assert (member["pid"], member["client_id"], member["state"]) == (
        os.getpid(), "test-client", "stable")
    assert member["assignment"] == [["events", 0], ["events", 1]]
    assert member["subscribed_topics"] == ["events"]
    out = ok(cli(data_dir, "groups", "describe", "live")).stdout
    assert out.splitlines()[0] == (f"Group: live\tState: Stable\tEpoch: {epoch}\t"
                                   "Assignor: range\tMembers: 1")
    assert rows(out)[1:] == [
        ["MEMBER-ID", "INSTANCE", "CLIENT-ID", "PID", "STATE", "PARTITIONS"],
        [member_id, "-", "test-client", str(os.getpid()), "stable", "events(0,1)"],
        ["TOPIC", "PARTITION", "COMMITTED", "LOG-END", "LAG", "MEMBER"],
        ["events", "0", "5", "12", "7", member_id],
        ["events", "1", "-", "7", "-", member_id]]
    described = orjson.loads(ok(cli(data_dir, "groups", "describe", "live", "--json")).stdout)
    assert described["state"] == "Stable" and described["members"][0]["pid"] == os.getpid()
    assert described["partitions"][0] == {
        "topic": "events", "partition": 0, "committed_offset": 5, "metadata": None,
        "log_end_offset": 12, "lag": 7, "member_id": member_id}

    # the offsets-only group: no members, exact lag
    out = ok(cli(data_dir, "groups", "describe", "batch")).stdout
    assert out.splitlines()[0] == "Group: batch\tState: Empty\tEpoch: 0\tAssignor: -\tMembers: 0"
    assert "Consumer group 'batch' has no active members." in out.splitlines()
    assert rows(out)[-3:] == [["TOPIC", "PARTITION", "COMMITTED", "LOG-END", "LAG", "MEMBER"],
                              ["events", "0", "3", "12", "9", "-"],
                              ["events", "1", "7", "7", "0", "-"]]

    # more records: the lag grows by exactly as many
    with Producer(data_dir, linger_ms=1) as producer:
        for _ in range(4):
            producer.send("events", b"late", partition=1)
        producer.flush(WAIT_S)
    assert rows(ok(cli(data_dir, "groups", "describe", "batch")).stdout)[-1] == [
        "events", "1", "7", "11", "4", "-"]


def test_describe_an_unknown_group_is_a_clear_error(broker: RunningBroker) -> None:
    assert ok(cli(broker.data_dir, "groups", "list")).stdout == "GROUP  STATE  MEMBERS  EPOCH\n"
    assert failed(cli(broker.data_dir, "groups", "describe", "nope")) == (
        "error: group 'nope' does not exist\n")
    assert failed(cli(broker.data_dir, "groups", "describe", "nope", "--json")) == (
        "error: group 'nope' does not exist\n")
    with broker.admin() as admin, pytest.raises(GroupIdNotFoundError, match="'nope'"):
        admin.describe_consumer_group("nope")


# -- reset-offsets -------------------------------------------------------------------------------
def _iso_utc(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat()


def _iso_local_naive(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000).isoformat()  # naive: local time


@pytest.fixture
def local_time_utc_plus_5_30() -> Iterator[None]:
    """Local time is UTC+5:30 (a POSIX TZ rule: no tz database needed), so that a naive
    date-time read as UTC would be 5.5 hours off."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "XST-5:30"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.usefixtures("local_time_utc_plus_5_30")
def test_reset_offsets_every_spec_dry_run_then_execute(events: RunningBroker) -> None:
    data_dir = events.data_dir
    assert _iso_local_naive(BASE_MS) == "2023-11-15T03:43:20"  # 22:13:20 UTC
    commit(data_dir, "g", {TP0: 4, TP1: 2})
    # (options of the dry run, options of the execution, new offsets of partitions 0 and 1);
    # each step moves every partition, so a dry run that committed would show
    at_45_ms = timestamp_ms(0, 0) + 45  # partition 0: first at or after is offset 5; 1: offset 4
    steps = [
        (["--to-earliest"], ["--to-earliest"], (0, 0)),
        (["--to-latest"], ["--to-latest"], (12, 7)),
        (["--to-offset", "3"], ["--to-offset", "3"], (3, 3)),
        (["--to-datetime", _iso_local_naive(at_45_ms)], ["--to-datetime", _iso_utc(at_45_ms)],
         (5, 4)),
        (["--shift-by", "2"], ["--shift-by", "2"], (7, 6)),
        (["--shift-by", "-1"], ["--shift-by", "-1"], (6, 5)),
        (["--to-datetime", _iso_utc(BASE_MS + 10**6)], ["--to-datetime", "2100-01-01T00:00"],
         (12, 7)),  # no record that late: the log end
    ]
    current = (4, 2)
    for dry_options, execute_options, new in steps:
        for options, execute in ((dry_options, False), (execute_options, True)):
            result = ok(cli(data_dir, "groups", "reset-offsets", "g", "--topic", "events",
                            *options, *(["--execute"] if execute else [])))
            assert rows(result.stdout) == [
                ["TOPIC", "PARTITION", "CURRENT", "NEW"],
                ["events", "0", str(current[0]), str(new[0])],
                ["events", "1", str(current[1]), str(new[1])]], options
            if execute:
                assert result.stderr == ("Committed the new offsets of 2 partition(s) for "
                                         "group 'g'.\n")
            else:
                assert "Dry run: nothing was changed" in result.stderr
                assert committed(events, "g") == {("events", 0): current[0],
                                                  ("events", 1): current[1]}, options
        assert committed(events, "g") == {("events", 0): new[0], ("events", 1): new[1]}
        assert rows(ok(cli(data_dir, "groups", "describe", "g")).stdout)[-2:] == [
            ["events", "0", str(new[0]), "12", str(12 - new[0]), "-"],
            ["events", "1", str(new[1]), "7", str(7 - new[1]), "-"]]
        current = new

    # --partition: only that one
    result = ok(cli(data_dir, "groups", "reset-offsets", "g", "--topic", "events",
                    "--partition", "1", "--to-earliest", "--execute"))
    assert rows(result.stdout) == [["TOPIC", "PARTITION", "CURRENT", "NEW"],
                                   ["events", "1", "7", "0"]]
    assert committed(events, "g") == {("events", 0): 12, ("events", 1): 0}


def test_reset_offsets_of_a_group_that_does_not_exist_creates_it(events: RunningBroker) -> None:
    data_dir = events.data_dir
    result = ok(cli(data_dir, "groups", "reset-offsets", "fresh", "--topic", "events",
                    "--to-offset", "6"))
    assert rows(result.stdout)[1:] == [["events", "0", "-", "6"], ["events", "1", "-", "6"]]
    assert failed(cli(data_dir, "groups", "describe", "fresh")) == (
        "error: group 'fresh' does not exist\n")  # the dry run created nothing
    ok(cli(data_dir, "groups", "reset-offsets", "fresh", "--topic", "events", "--to-offset",
           "6", "--execute"))
    assert committed(events, "fresh") == {("events", 0): 6, ("events", 1): 6}
    assert ["fresh", "Empty", "0", "0"] in rows(ok(cli(data_dir, "groups", "list")).stdout)
    # --shift-by moves committed offsets: there must be one
    with events.admin() as admin, pytest.raises(NoOffsetForPartitionError, match="events/1"):
        admin.reset_consumer_group_offsets("other", "events", shift_by=1)
    assert "no committed offset" in failed(cli(
        data_dir, "groups", "reset-offsets", "other", "--topic", "events", "--shift-by", "1"))


def test_reset_offsets_refused_while_a_member_is_live(events: RunningBroker,
                                                      live_member: Consumer) -> None:
    data_dir = events.data_dir
    for extra in ([], ["--execute"]):
        error = failed(cli(data_dir, "groups", "reset-offsets", "live", "--topic", "events",
                           "--to-earliest", *extra))
        assert error.startswith("error: group 'live' is Stable with 1 member(s): ")
        assert f"pid {os.getpid()}" in error and "stop its consumers first" in error
    with events.admin() as admin:
        with pytest.raises(NonEmptyGroupError, match="Stable with 1 member"):
            admin.reset_consumer_group_offsets("live", "events", to_latest=True)
        with pytest.raises(NonEmptyGroupError, match="Stable with 1 member"):
            admin.reset_consumer_group_offsets("live", "events", to_latest=True, execute=True)
    assert committed(events, "live") == {("events", 0): 5}

    live_member.close()  # leaves the group: the reset is allowed now
    ok(cli(data_dir, "groups", "reset-offsets", "live", "--topic", "events", "--to-latest",
           "--execute"))
    assert committed(events, "live") == {("events", 0): 12, ("events", 1): 7}


def test_reset_offsets_clamps_into_the_log(broker: RunningBroker) -> None:
    data_dir = broker.data_dir
    with broker.admin() as admin:
        admin.create_topic("retained", partitions=1, config={
            "segment_bytes": 4096, "retention_bytes": 4096})
    with Producer(data_dir, linger_ms=0) as producer:
        for index in range(200):  # ~40 kB in 4 kB segments: retention moves the log start
            producer.send("retained", b"%03d" % index + b"y" * 200, partition=0)
        producer.flush(WAIT_S)

    def log_start() -> int:
        with broker.admin() as admin:
            return int(admin.describe_topic("retained")["partitions"][0]["log_start_offset"])

    start = wait_for(log_start, WAIT_S, message="retention to move the log start")
    assert 0 < start < 200

    def reset(*options: str) -> list[str]:
        result = ok(cli(data_dir, "groups", "reset-offsets", "g", "--topic", "retained",
                        *options, "--execute"))
        return rows(result.stdout)[1]

    assert reset("--to-offset", "0") == ["retained", "0", "-", str(start)]
    assert reset("--to-offset", "1000000") == ["retained", "0", str(start), "200"]
    assert reset("--to-offset", str(start + 3)) == ["retained", "0", "200", str(start + 3)]
    assert reset("--shift-by", "5") == ["retained", "0", str(start + 3), str(start + 8)]
    assert reset("--shift-by", "-1000000") == ["retained", "0", str(start + 8), str(start)]
    assert reset("--shift-by", "1000000") == ["retained", "0", str(start), "200"]
    assert reset("--to-earliest") == ["retained", "0", "200", str(start)]
    with broker.admin() as admin:
        plan = admin.reset_consumer_group_offsets("g", "retained", to_offset=10**9)
        assert plan == {TopicPartition("retained", 0): (start, 200)}
        plan = admin.reset_consumer_group_offsets("g", "retained", shift_by=-(10**9))
        assert plan == {TopicPartition("retained", 0): (start, start)}


def test_reset_offsets_usage_errors(events: RunningBroker) -> None:
    data_dir = events.data_dir
    commit(data_dir, "g", {TP0: 4})

    def reset(*options: str) -> Result:
        return cli(data_dir, "groups", "reset-offsets", "g", *options)

    two = failed(reset("--topic", "events", "--to-earliest", "--to-offset", "3"), code=2)
    assert "give exactly one of" in two and "(got --to-earliest, --to-offset)" in two
    assert "(got none)" in failed(reset("--topic", "events", "--execute"), code=2)
    bad = failed(reset("--topic", "events", "--to-datetime", "yesterday"), code=2)
    assert "Invalid value for '--to-datetime': 'yesterday' is not an ISO 8601 date-time" in bad
    assert "before 1970" in failed(reset("--topic", "events", "--to-datetime", "1969-12-31T23:00"
                                         "+00:00"), code=2)
    assert "--to-offset" in failed(reset("--topic", "events", "--to-offset", "-1"), code=2)
    assert "--shift-by" in failed(reset("--topic", "events", "--shift-by", "two"), code=2)
    assert "Missing option '--topic'" in failed(reset("--to-earliest"), code=2)
    assert failed(reset("--topic", "nope", "--to-earliest")) == (
        "error: topic 'nope' does not exist\n")
    assert failed(reset("--topic", "events", "--partition", "2", "--to-earliest")) == (
        "error: topic 'events' has 2 partition(s); partition 2 does not exist\n")
    assert committed(events, "g") == {("events", 0): 4}  # none of them changed anything

    with events.admin() as admin:
        for specs in ({}, {"to_earliest": True, "shift_by": 1}):
            with pytest.raises(ValueError, match="exactly one of"):
                admin.reset_consumer_group_offsets("g", "events", **specs)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="to_offset must be >= 0"):
            admin.reset_consumer_group_offsets("g", "events", to_offset=-1)
        with pytest.raises(UnknownTopicOrPartitionError, match="topic 'nope' does not exist"):
            admin.reset_consumer_group_offsets("g", "nope", to_earliest=True)
        with pytest.raises(UnknownTopicOrPartitionError, match="partition 5 does not exist"):
            admin.reset_consumer_group_offsets("g", "events", to_earliest=True, partitions=[5])


# -- delete --------------------------------------------------------------------------------------
def test_delete_refused_while_members_then_deletes_durably(events: RunningBroker,
                                                          live_member: Consumer) -> None:
    data_dir = events.data_dir
    commit(data_dir, "batch", {TP1: 3})
    assert "has 1 member(s)" in failed(cli(data_dir, "groups", "delete", "live"))
    with events.admin() as admin, pytest.raises(NonEmptyGroupError):
        admin.delete_consumer_group("live")
    assert committed(events, "live") == {("events", 0): 5}

    live_member.close()
    assert ok(cli(data_dir, "groups", "delete", "live")).stdout == (
        "Deleted consumer group live.\n")
    assert failed(cli(data_dir, "groups", "describe", "live")) == (
        "error: group 'live' does not exist\n")
    assert failed(cli(data_dir, "groups", "delete", "live")) == (
        "error: group 'live' does not exist\n")
    with events.admin() as admin:
        admin.delete_consumer_group("batch")  # an offsets-only group
        assert admin.list_consumer_groups() == []
        with pytest.raises(GroupIdNotFoundError):
            admin.delete_consumer_group("batch")
    # the deletion is durable: a supervisor killed at once and restarted does not bring them back
    events.kill()
    events.start()
    assert committed(events, "live") == committed(events, "batch") == {}
    assert rows(ok(cli(data_dir, "groups", "list")).stdout) == [
        ["GROUP", "STATE", "MEMBERS", "EPOCH"]]


# -- consume --group -----------------------------------------------------------------------------
def test_consume_with_group_reads_and_commits(events: RunningBroker) -> None:
    data_dir = events.data_dir
    # (--timeout-ms: a consumer that does not get the records fails the test, not hangs it)
    result = ok(cli(data_dir, "consume", "events", "--group", "cg", "--from-beginning",
                    "--max-messages", "10", "--print-offset", "--timeout-ms", "10000"))
    assert result.stderr == "Processed a total of 10 message(s).\n"
    first = {tuple(line.split("\t")) for line in result.stdout.splitlines()}
    assert len(first) == 10
    offsets = committed(events, "cg")  # what was printed, committed when it left the group
    assert sum(offsets.values()) == 10
    assert first == {(f"{p}:{o}", f"{p}-{o}") for p in (0, 1)
                     for o in range(offsets.get(("events", p), 0))}

    # a second run resumes at the committed offsets (not at the end: it has offsets)
    result = ok(cli(data_dir, "consume", "events", "--group", "cg", "--max-messages", "9",
                    "--print-offset", "--timeout-ms", "10000"))
    second = {tuple(line.split("\t")) for line in result.stdout.splitlines()}
    assert first.isdisjoint(second)
    assert first | second == {(f"{p}:{o}", f"{p}-{o}") for p in (0, 1) for o in range(RECORDS[p])}
    assert rows(ok(cli(data_dir, "groups", "describe", "cg")).stdout)[-2:] == [
        ["events", "0", "12", "12", "0", "-"], ["events", "1", "7", "7", "0", "-"]]

    assert "--group excludes --partition" in failed(cli(
        data_dir, "consume", "events", "--group", "cg", "--partition", "0"), code=2)
    assert failed(cli(data_dir, "consume", "nope", "--group", "cg", "--timeout-ms", "10")) == (
        "error: unknown topic 'nope'\n")


def test_consume_with_group_is_a_member_while_it_runs(events: RunningBroker) -> None:
    """While ``consume --group`` runs, the group has it as a member (a real process)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "shmbroker.cli", "consume", "events", "--group", "cg",
         "--from-beginning", "--max-messages", str(sum(RECORDS.values()) + 1),
         "--timeout-ms", "10000", "--data-dir", str(events.data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def member_owns_both() -> dict[str, Any] | None:
            with events.admin() as admin:
                try:
                    group = admin.describe_consumer_group("cg")
                except GroupIdNotFoundError:
                    return None
            members = group["members"]
            if len(members) == 1 and len(members[0]["assignment"]) == 2:
                return members[0]
            return None

        member = wait_for(member_owns_both, WAIT_S, message="consume --group to join")
        assert member["pid"] == process.pid
        assert member["client_id"] == "shmbroker-console-consumer"
        with Producer(events.data_dir, linger_ms=0) as producer:
            producer.send("events", b"last", partition=0).result(WAIT_S)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    lines = stdout.splitlines()
    assert len(lines) == sum(RECORDS.values()) + 1 and b"last" in lines
    assert committed(events, "cg") == {("events", 0): 13, ("events", 1): 7}
    with events.admin() as admin:
        assert admin.describe_consumer_group("cg")["members"] == []
