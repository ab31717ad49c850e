"""Fixtures for confidential jobs: a test root PKI, policies, and workers that use them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import cast

import pytest

HERE = Path(__file__).resolve().parent
for folder in (HERE.parents[1] / "unit" / "attestation", HERE):  # dcap_factory, synthetic_provider
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from synthetic_provider import MRENCLAVE, make_test_pki  # noqa: E402


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test root PKI valid now: folder (keys for the worker), root.pem, collateral.json."""
    return cast(dict[str, Path], make_test_pki(tmp_path_factory.mktemp("pki")))


def write_policy(path: Path, root: Path | None, **values: object) -> Path:
    """A policy TOML; `root` (the test root) is referenced by an absolute path."""
    lines = []
    if root is not None:
        lines.append(f'root_ca = "{root}"')
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, list):
            items = ", ".join(f'"{v}"' for v in value)
            lines.append(f"{key} = [{items}]")
        else:
            lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def sgx_policy(test_pki: dict[str, Path], tmp_path: Path) -> Path:
    """Trusts the test root and the synthetic enclave's MRENCLAVE; defaults otherwise."""
    return write_policy(
        tmp_path / "policy.toml", test_pki["root"], evidence=["sgx-dcap"], mrenclave=MRENCLAVE
    )
