"""A `csml` command run as a real process on a terminal (a pty), with every process
it starts recorded while it runs, so a test can check that none outlives it.

Processes are psutil handles (pid plus start time), so a reused pid is not
mistaken for a survivor. What the command prints (stdout and stderr, both on the
terminal) is kept, without colour codes, in `output`.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path
from types import TracebackType

import httpx
import psutil

from tests.cluster import free_port, wait_for

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


class WatchedCommand:
    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        master, terminal = pty.openpty()
        # 50 rows x 200 columns, so Rich does not wrap lines mid-word.
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self._master = master
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "csml", *args],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=terminal,
            start_new_session=True,  # its own process group, like a terminal's foreground job
        )
        os.close(terminal)
        self.seen: dict[int, psutil.Process] = {}
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # EIO: every holder of the terminal has closed it
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    @property
    def output(self) -> str:
        return ANSI.sub("", b"".join(self._chunks).decode(errors="replace"))

    def record(self) -> None:
        """Add the command's current descendants to `seen`."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            self.seen.setdefault(child.pid, child)

    def wait(self, timeout: float) -> int:
        """Wait for the command to exit, recording descendants meanwhile."""
        deadline = timeout
        while True:
            self.record()
            try:
                return self.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                deadline -= 0.2
                if deadline <= 0:
                    raise

    def signal_group(self, sig: int) -> None:
        """What a terminal's Ctrl-C does: `sig` to the foreground process group."""
        os.killpg(self.proc.pid, sig)

    def survivors(self, grace: float = 10.0) -> list[psutil.Process]:
        """Recorded processes still running (zombies do not count) after up to `grace` s."""
        _gone, alive = psutil.wait_procs(list(self.seen.values()), timeout=grace)
        return [p for p in alive if _running(p)]

    def describe(self, procs: list[psutil.Process]) -> str:
        return "; ".join(f"{p.pid} {' '.join(_cmdline(p))}" for p in procs)

    def __enter__(self) -> WatchedCommand:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Kill whatever this command left running (only processes it started)."""
        if self.proc.poll() is None:
            self.record()
            self.proc.kill()
            self.proc.wait()
        for p in self.seen.values():
            if _running(p):
                p.kill()
        self._reader.join(timeout=5)
        os.close(self._master)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return ["?"]


def environ_of(pid: int) -> bytes:
    """A process's environment as the kernel shows it (NUL-separated), b"" if gone."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def alarming_lines(output: str) -> list[str]:
    """Lines a person should not see on a clean run: JSON log lines, tracebacks,
    "coordinator unreachable" warnings."""
    found = []
    for line in output.splitlines():
        text = line.strip()
        if "Traceback" in text or "unreachable" in text.lower():
            found.append(text)
        elif text.startswith("{"):
            try:
                entry = json.loads(text)
            except ValueError:
                continue
            if isinstance(entry, dict) and "level" in entry:
                found.append(text)
    return found


SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
UP_LABEL = "csml up (local workers)"


def start_up(root: Path, apps: list[str], env: dict[str, str]) -> tuple[WatchedCommand, str]:
    """`csml up` for `apps` on a terminal, its data in `root`; returns once every app
    has a live worker (so its workers and their zygotes are recorded)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["up", "--port", str(port), *(a for app in apps for a in ("--app", app))]
    up = WatchedCommand(args, env, root)

    def joined() -> bool:
        up.record()
        if up.proc.poll() is not None:
            raise AssertionError(f"csml up exited early:\n{up.output}")
        try:
            listed = httpx.get(f"{url}/v1/apps", timeout=5).json()
        except (httpx.TransportError, ValueError):
            return False
        live = {a["name"] for a in listed if a.get("workers", 0) >= 1}
        return set(apps) <= live

    try:
        wait_for(joined, timeout=180, interval=0.3)
    except BaseException:
        up.__exit__(None, None, None)
        raise
    up.record()
    return up, url


def up_env(root: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "CSML_DATA_DIR": str(root / "data"),
        "CSML_CONFIG": str(root / "user-config.toml"),
        **extra,
    }


def up_join_token_state(env: dict[str, str]) -> str:
    """The state column of `csml join-token list` for the token `csml up` made."""
    listed = subprocess.run(
        [sys.executable, "-m", "csml", "join-token", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    lines = [line for line in listed.splitlines() if line.rstrip().endswith(UP_LABEL)]
    assert len(lines) == 1, listed
    # ID  DATE TIME  active|revoked DATE TIME  APPS  LABEL
    rest = lines[0].removesuffix(UP_LABEL).split(None, 3)[3]
    return " ".join(rest.split()[:3]) if rest.startswith("revoked") else rest.split()[0]
