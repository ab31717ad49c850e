"""The base64 memo (`csml.store.base64_memo`): a batch item's inline input leaves in its
claim as the text it came in, and a completion's inline output on the result stream as
the text it came in, without the file being read and encoded again; each put is taken
once, the memo is bounded, and an identity's erasure empties it."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from unittest.mock import patch

from csml.coordinator.inline_outputs import Budget, outputs_of
from csml.store import jobs as store
from csml.store.base64_memo import Base64Memo
from csml.store.blobs import BlobStore
from tests.unit.inproc import HttpWorker, InProcessCoordinator
from tests.unit.test_batch_submit import echo_item, post
from tests.unit.test_worker_protocol import claim, complete_batch


def _key(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


def test_each_put_is_taken_once_and_equal_bytes_share_one_text() -> None:
    memo = Base64Memo()
    a, b = b"first", b"second"
    memo.put(*_key(a), base64.b64encode(a).decode())
    memo.put(*_key(a), base64.b64encode(a).decode())  # a second file of the same bytes
    memo.put(*_key(b), base64.b64encode(b).decode())
    assert len(memo) == 2
    assert memo.take(*_key(a)) == base64.b64encode(a).decode()
    assert memo.take(*_key(a)) == base64.b64encode(a).decode()
    assert memo.take(*_key(a)) is None  # both puts taken
    assert memo.take(hashlib.sha256(b).hexdigest(), len(b) + 1) is None  # another size
    assert memo.take(*_key(b)) == base64.b64encode(b).decode()
    assert len(memo) == 0 and memo.take(*_key(b)) is None


def test_the_memo_is_bounded_and_drops_the_oldest_first() -> None:
    memo = Base64Memo(max_chars=24)
    texts = {bytes([i]) * 6: base64.b64encode(bytes([i]) * 6).decode() for i in range(4)}
    for data, text in texts.items():  # 8 characters each: the fourth pushes the first out
        memo.put(*_key(data), text)
    got = [memo.take(*_key(data)) for data in texts]
    assert got == [None, *list(texts.values())[1:]]
    memo.put("x" * 64, 100, "A" * 100)  # larger than the whole memo: not kept
    assert len(memo) == 0
    memo.put(*_key(b"k"), "aw==")
    memo.clear()
    assert memo.take(*_key(b"k")) is None


def test_inputs_and_outputs_leave_as_the_text_they_came_in_without_reading_them(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    c = coordinator.core
    memo = c.blobs.base64
    memo.clear()
    first, second = b"the first photo", b"the second photo"
    body = {"items": [echo_item({}, data=first), echo_item({}, data=second)]}
    r = post(coordinator, user, body)
    assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
    assert len(memo) == 2
    read = Path.read_bytes
    reads: list[Path] = []

    def counted(path: Path) -> bytes:
        reads.append(path)
        return read(path)

    loads = patch.object(type(c.queue), "file_content", side_effect=AssertionError("a read"))
    with patch.object(Path, "read_bytes", counted), loads:
        taken = claim(echo_worker, 2).jobs
    assert reads == []  # from the memo, not the files nor the database
    assert sorted(base64.b64decode(t.inline_inputs["data"]) for t in taken) == [first, second]
    assert len(memo) == 0

    outputs = {t.id: b"out of " + base64.b64decode(t.inline_inputs["data"]) for t in taken}
    done = [
        {
            "job_id": t.id,
            "lease_id": t.lease_id,
            "state": "succeeded",
            "result": {},
            "inline_outputs": [
                {"name": "data", "content": base64.b64encode(outputs[t.id]).decode()}
            ],
        }
        for t in taken
    ]
    assert all(r.status == 204 for r in complete_batch(echo_worker, *done).results)
    assert len(memo) == 2
    with c.queue.read() as conn:
        rows = {t.id: store.by_id(conn, t.id) for t in taken}
    with patch.object(BlobStore, "path", side_effect=AssertionError("a file read")):
        for job_id, row in rows.items():
            assert row is not None
            got = outputs_of(c.blobs, row, 1 << 16, Budget())
            assert got == {"data": base64.b64encode(outputs[job_id]).decode()}
    assert len(memo) == 0
    for job_id, row in rows.items():  # a second reader reads the stored bytes, as before
        assert row is not None
        got = outputs_of(c.blobs, row, 1 << 16, Budget(), c.queue.file_content)
        assert got == {"data": base64.b64encode(outputs[job_id]).decode()}


def test_an_identitys_erasure_empties_the_memo(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    memo = coordinator.core.blobs.base64
    r = post(coordinator, user, {"items": [echo_item({}, data=b"to be erased")]})
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    assert len(memo) >= 1
    user.delete_identity()
    assert len(memo) == 0
