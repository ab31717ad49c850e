"""Hosts as Linux network namespaces on one switch (a bridge in a namespace of its own).

Each host namespace gets `lo` and an `eth0` with an address in 198.18.0.0/24
(RFC 2544 benchmarking space); its veth peer is a port of bridge `br0` in the
switch namespace. Names carry this process's id, so concurrent runs never meet,
and namespaces left by a run that died are removed by the next one. Needs root
and iproute2 (`ip`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "csmlmh"
SUBNET = "198.18.0"
PREFIX_LEN = 24


class NetnsUnavailable(RuntimeError):
    """This machine cannot make network namespaces (not root, no iproute2, no privilege)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def check_available() -> None:
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (CI runs the tests as root)")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("iproute2 is not installed: apt-get install iproute2")


def _namespaces() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_stale() -> None:
    """Delete namespaces of earlier runs whose process is gone."""
    for name in _namespaces():
        m = re.fullmatch(rf"{PREFIX}(\d+)-\w+", name)
        if m is None:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # that run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        ip("netns", "del", name, check=False)


@dataclass
class Host:
    name: str  # short: coord, wa, wb, client
    netns: str
    address: str
    port: str  # its port on the switch

    def cmd(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def link(self, up: bool) -> None:
        """Plug in or pull this host's cable (its eth0 goes down: no route, no carrier)."""
        ip("-n", self.netns, "link", "set", "eth0", "up" if up else "down")


@dataclass
class Network:
    tag: str
    switch: str
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def add_host(self, name: str, octet: int) -> Host:
        host = Host(name, f"{self.tag}-{name}", f"{SUBNET}.{octet}", f"p-{name}"[:15])
        ip("netns", "add", host.netns)
        self.hosts[name] = host
        ip("-n", host.netns, "link", "set", "lo", "up")
        ip(
            "-n", self.switch, "link", "add", host.port, "type", "veth",
            "peer", "name", "eth0", "netns", host.netns,
        )  # fmt: skip
        ip("-n", self.switch, "link", "set", host.port, "master", "br0")
        ip("-n", self.switch, "link", "set", host.port, "up")
        ip("-n", host.netns, "addr", "add", f"{host.address}/{PREFIX_LEN}", "dev", "eth0")
        host.link(up=True)
        return host

    def start(
        self, host: Host, argv: Sequence[str], env: dict[str, str], log: Path
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside `host` (`ip netns exec` execs it: the pid is the program's)."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                host.cmd(argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=env.get("PWD"),
            )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)

    def destroy(self) -> None:
        """Stop every process, then delete every namespace (their links go with them)."""
        self.stop_all()
        for name in [*(h.netns for h in self.hosts.values()), self.switch]:
            ip("netns", "del", name, check=False)


@contextlib.contextmanager
def network(hosts: dict[str, int]) -> Iterator[Network]:
    """A switch and one namespace per host (`name -> last octet`); all removed on exit."""
    check_available()
    remove_stale()
    tag = f"{PREFIX}{os.getpid()}"
    net = Network(tag, f"{tag}-sw")
    try:
        try:
            ip("netns", "add", net.switch)
        except RuntimeError as exc:
            raise NetnsUnavailable(f"cannot create a network namespace: {exc}") from None
        ip("-n", net.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", net.switch, "link", "set", "br0", "up")
        for name, octet in hosts.items():
            net.add_host(name, octet)
        yield net
    finally:
        net.destroy()
