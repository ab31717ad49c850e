"""The user's saved identity: a small TOML file readable only by its owner."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_config_dir

DEFAULT_URL = "http://127.0.0.1:8600"


def config_path() -> Path:
    override = os.environ.get("CSML_CONFIG")
    return Path(override) if override else Path(user_config_dir("csml")) / "config.toml"


@dataclass
class UserConfig:
    url: str = DEFAULT_URL
    id: str | None = None
    token: str | None = None

    @classmethod
    def load(cls, path: Path | None = None) -> UserConfig:
        path = path or config_path()
        if not path.exists():
            return cls()
        data = tomllib.loads(path.read_text())
        return cls(url=data.get("url", DEFAULT_URL), id=data.get("id"), token=data.get("token"))

    def save(self, path: Path | None = None) -> Path:
        path = path or config_path()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lines = [f'url = "{_esc(self.url)}"']
        if self.id:
            lines.append(f'id = "{_esc(self.id)}"')
        if self.token:
            lines.append(f'token = "{_esc(self.token)}"')
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        return path


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
