"""A submission's files over a keep-alive link (`csml.client.sdk`: built in memory, as
httpx would send them): the coordinator keeps the same bytes, names and types, the
link is reused, and what is not for a link (a file object, bytes holding the boundary)
still goes through httpx."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from csml.client import sdk
from csml.client.errors import CsmlError
from tests.cluster import Cluster


def _input(job: sdk.Job) -> tuple[int, str, str]:
    info = job.data.inputs["data"]
    return info.size, info.sha256, info.media_type


def test_files_go_over_a_link_and_arrive_as_through_httpx(cluster: Cluster, tmp_path: Path) -> None:
    client = cluster.new_user()
    assert not client._idle_links
    photo = tmp_path / "photo.png"
    data = bytes(range(256)) * 1500  # over the 256 KiB kept in the database: a file
    photo.write_bytes(data)
    small = b"small \r\n--bytes"
    by_link = [
        client.submit("echo", "echo", files={"data": photo}),
        client.submit("echo", "echo", files={"data": small}),
    ]
    assert len(client._idle_links) == 1  # both went over one link, kept for the next
    assert _input(by_link[0]) == (len(data), hashlib.sha256(data).hexdigest(), "image/png")
    assert _input(by_link[1]) == (
        len(small),
        hashlib.sha256(small).hexdigest(),
        "application/octet-stream",
    )
    held = b"x--" + client._boundary.encode() + b"y"
    through_httpx = [
        client.submit("echo", "echo", files={"data": io.BytesIO(data)}),
        client.submit("echo", "echo", files={"data": held}),
    ]
    assert _input(through_httpx[0])[:2] == _input(by_link[0])[:2]
    assert _input(through_httpx[1])[:2] == (len(held), hashlib.sha256(held).hexdigest())
    for job in by_link + through_httpx:
        assert job.wait(timeout=60).state.value == "succeeded", job.data.error
    client.close()


def test_a_download_goes_over_a_link_and_refusals_keep_their_kind(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = cluster.new_user()
    data = bytes(range(256)) * 1500
    job = client.submit("echo", "echo", files={"data": data}).wait(timeout=60)
    assert job.state.value == "succeeded", job.data.error
    links = len(client._idle_links)
    assert links == 1  # the submission's
    for name in job.data.outputs:
        saved = job.download(name, tmp_path / name)
        assert saved.read_bytes() == b"".join(job.iter_output(name))
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == job.data.outputs[name].sha256
    assert len(client._idle_links) == links  # borrowed, read to the end, given back
    other = cluster.new_user()
    try:
        list(other._stream(f"/v1/jobs/{job.id}/outputs/data"))
    except CsmlError as exc:
        assert exc.status == 404
    else:
        raise AssertionError("another identity read the output")
    assert len(other._idle_links) == 1  # the refusal's link is kept
    client.close()
    other.close()
