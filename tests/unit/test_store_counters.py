"""The store's statement counters by kind, as the coordinator's /metrics exposes them:
the kinds sum to the total, and a submit is counted under the tables it really writes."""

from __future__ import annotations

import re

from csml.apps.echo import app as echo_app
from csml.store.db import statement_kind
from tests.unit.inproc import InProcessCoordinator

_LINE = re.compile(r'^csml_store_statements_by_kind_total\{kind="([^"]+)"\} (\S+)$')


def _by_kind(coordinator: InProcessCoordinator) -> tuple[dict[str, float], float]:
    text = coordinator.http.get("/metrics").text
    kinds = {m[1]: float(m[2]) for line in text.splitlines() if (m := _LINE.match(line))}
    total = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("csml_store_statements_total ")
    )
    return kinds, total


def test_statement_kinds_are_verb_and_first_table() -> None:
    assert statement_kind("BEGIN") == "BEGIN"
    assert statement_kind("BEGIN IMMEDIATE") == "BEGIN IMMEDIATE"
    assert statement_kind("INSERT INTO jobs (id) VALUES (?)") == "INSERT jobs"
    assert statement_kind("UPDATE apps SET served_rank=? WHERE apps.name = ?") == "UPDATE apps"
    assert statement_kind('DELETE FROM "rate_windows" WHERE 1') == "DELETE rate_windows"
    nested = "SELECT (SELECT coalesce(sum(f.size), ?) FROM (SELECT DISTINCT x FROM job_files"
    assert statement_kind(nested) == "SELECT job_files"
    # A job load: its files subquery comes first in the text, the table it reads is jobs.
    load = "SELECT jobs.seq, (SELECT json_group_array(x) FROM job_files WHERE a) AS f FROM jobs"
    assert statement_kind(load) == "SELECT jobs"
    update = "UPDATE jobs SET s=? WHERE jobs.seq IN (SELECT jobs.seq FROM jobs WHERE x)"
    assert statement_kind(update) == "UPDATE jobs"


def test_metrics_count_statements_by_kind_and_they_sum_to_the_total(
    coordinator: InProcessCoordinator,
) -> None:
    coordinator.worker(echo_app)
    user = coordinator.new_user()
    before, total0 = _by_kind(coordinator)
    user.submit("echo", "echo", params={"message": "hi"})
    after, total1 = _by_kind(coordinator)
    delta = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    assert delta.get("INSERT jobs") == 1.0, delta  # exactly one job row written
    # Every statement has a kind (the scrapes' own included); a background sweep may
    # send one between the two counters' reads, hence the small slack.
    assert abs(sum(after.values()) - total1) <= 2 and abs(sum(before.values()) - total0) <= 2
