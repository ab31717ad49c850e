"""Evidence kinds, verifiers and policies, without a cluster (synthetic quotes, test root)."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from dcap_factory import QuoteSpec, TestPki, build_collateral, build_quote
from nacl.public import PrivateKey
from synthetic_provider import MRENCLAVE, MRSIGNER, factory_clock

from csml.attestation.evidence import (
    Assessment,
    EvidenceUnavailable,
    assess,
    load_provider,
    provider_names,
)
from csml.attestation.evidence_gramine import GramineSgxProvider
from csml.attestation.evidence_tdx import TdxConfigfsProvider
from csml.attestation.policy import Policy, PolicyError
from csml.client.confidential import resolve_policy
from csml.client.errors import CsmlError
from csml.crypto import worker_key_report_data

APP = "opencv"
MRTD = hashlib.sha384(b"test td").hexdigest()


@pytest.fixture(scope="module")
def pki() -> TestPki:
    with factory_clock():
        return TestPki.create()


def _evidence(pki: TestPki, tee: str = "SGX", **spec: Any) -> tuple[bytes, bytes, dict[str, str]]:
    """(public key, quote binding it for APP, collateral) for a synthetic worker."""
    pk = bytes(PrivateKey.generate().public_key)
    shape = QuoteSpec(tee=tee, version=3 if tee == "SGX" else 4, **spec)
    with factory_clock():
        shape.report_data = spec.get("report_data", worker_key_report_data(pk, APP))
        quote = build_quote(shape, pki)
        collateral = build_collateral(pki, shape)
    return pk, quote, collateral


def _assess(pki: TestPki, policy: Policy, tee: str = "SGX", **spec: Any) -> Assessment:
    pk, quote, collateral = _evidence(pki, tee, **spec)
    return assess(
        kind="sgx-dcap" if tee == "SGX" else "tdx-dcap",
        evidence=quote,
        collateral=collateral,
        public_key=pk,
        app=APP,
        policy=policy,
        now=datetime.now(UTC),
    )


def _policy(pki: TestPki, **kw: Any) -> Policy:
    return Policy(root_ca_pem=pki.root_pem, **{"mrenclave": (MRENCLAVE,), **kw})


def _failed(a: Assessment) -> dict[str, Any]:
    return {c.name: c for c in a.failures}


def test_a_good_sgx_quote_passes_every_check(pki: TestPki) -> None:
    a = _assess(pki, _policy(pki, mrsigner=(MRSIGNER,), min_isv_svn=0, isv_prod_id=0))
    assert a.ok, [c.describe() for c in a.failures]
    names = [c.name for c in a.checks]
    for expected in (
        "evidence_kind",
        "collateral",
        "dcap.quote_signature",
        "dcap.pck_crl",
        "tee",
        "report_data",
        "tcb_status",
        "debug",
        "mrenclave",
        "mrsigner",
        "isv_svn",
        "isv_prod_id",
    ):
        assert expected in names
    assert a.measurements["mr_enclave"] == MRENCLAVE


def test_wrong_mrenclave_names_expected_and_actual(pki: TestPki) -> None:
    wanted = "ab" * 32
    check = _failed(_assess(pki, _policy(pki, mrenclave=(wanted,))))["mrenclave"]
    assert check.expected == wanted and check.actual == MRENCLAVE
    assert wanted in check.describe() and MRENCLAVE in check.describe()


def test_tcb_status_outside_the_policy_is_refused(pki: TestPki) -> None:
    a = _assess(pki, _policy(pki), pce_svn=11)
    check = _failed(a)["tcb_status"]
    assert (check.expected, check.actual) == ("UpToDate", "SWHardeningNeeded")
    assert "INTEL-SA-00001" in check.detail
    ok = _assess(pki, _policy(pki, tcb_statuses=("UpToDate", "SWHardeningNeeded")), pce_svn=11)
    assert ok.ok


def test_debug_enclaves_are_refused_unless_allowed(pki: TestPki) -> None:
    check = _failed(_assess(pki, _policy(pki), debug=True))["debug"]
    assert (check.expected, check.actual) == ("not debug", "debug")
    assert _assess(pki, _policy(pki, allow_debug=True), debug=True).ok


def test_evidence_for_another_key_or_app_is_refused(pki: TestPki) -> None:
    other = worker_key_report_data(bytes(PrivateKey.generate().public_key), APP)
    check = _failed(_assess(pki, _policy(pki), report_data=other))["report_data"]
    assert check.actual == other.hex() and check.expected != other.hex()


def test_min_isv_svn(pki: TestPki) -> None:
    check = _failed(_assess(pki, _policy(pki, min_isv_svn=2)))["isv_svn"]
    assert (check.expected, check.actual) == (">= 2", "0")


def test_a_policy_without_measurements_accepts_no_enclave(pki: TestPki) -> None:
    failed = _failed(_assess(pki, Policy(root_ca_pem=pki.root_pem)))
    assert set(failed) == {"measurements"}
    assert MRENCLAVE in (failed["measurements"].actual or "")


def test_the_pinned_intel_root_refuses_a_test_quote(pki: TestPki) -> None:
    a = _assess(pki, Policy(mrenclave=(MRENCLAVE,)))
    assert not a.ok and a.failures[-1].name == "dcap.root_ca"


def test_missing_collateral_is_refused(pki: TestPki) -> None:
    pk, quote, _ = _evidence(pki)
    a = assess(
        kind="sgx-dcap",
        evidence=quote,
        collateral=None,
        public_key=pk,
        app=APP,
        policy=_policy(pki),
        now=datetime.now(UTC),
    )
    assert [c.name for c in a.failures] == ["collateral"]


def test_tdx_measurements(pki: TestPki) -> None:
    assert _assess(
        pki,
        Policy(root_ca_pem=pki.root_pem, evidence=("tdx-dcap",), mrtd=(MRTD,), rtmr0=("00" * 48,)),
        tee="TDX",
    ).ok
    bad = _assess(
        pki, Policy(root_ca_pem=pki.root_pem, mrtd=(MRTD,), rtmr1=("11" * 48,)), tee="TDX"
    )
    assert set(_failed(bad)) == {"rtmr1"}
    none = _assess(pki, Policy(root_ca_pem=pki.root_pem), tee="TDX")
    assert set(_failed(none)) == {"measurements"}


def test_kinds_the_policy_does_not_accept(pki: TestPki) -> None:
    a = _assess(pki, _policy(pki, evidence=("tdx-dcap",)))
    check = _failed(a)["evidence_kind"]
    assert (check.expected, check.actual) == ("one of: tdx-dcap", "sgx-dcap")
    unknown = assess(
        kind="sev-snp",
        evidence=b"",
        collateral=None,
        public_key=bytes(32),
        app=APP,
        policy=Policy(evidence=("sev-snp",)),
        now=datetime.now(UTC),
    )
    assert "no verifier" in unknown.failures[0].detail


def test_none_is_refused_unless_the_client_allows_it() -> None:
    def run(policy: Policy) -> Assessment:
        return assess(
            kind="none",
            evidence=b"",
            collateral=None,
            public_key=bytes(32),
            app=APP,
            policy=policy,
            now=datetime.now(UTC),
        )

    refused = run(Policy())
    assert refused.insecure and not refused.ok
    assert "--insecure-allow-unattested" in refused.failures[0].detail
    accepted = run(Policy().unattested(True))
    assert accepted.ok and accepted.insecure


# -- policy files -----------------------------------------------------------------------


def test_policy_file(tmp_path: Path, pki: TestPki) -> None:
    (tmp_path / "root.pem").write_bytes(pki.root_pem)
    (tmp_path / "col.json").write_text(json.dumps({"a": "b"}))
    path = tmp_path / "p.toml"
    path.write_text(
        f'app = "opencv"\nevidence = "sgx-dcap"\nmrenclave = "{MRENCLAVE.upper()}"\n'
        'min_isv_svn = 2\ntcb_statuses = ["UpToDate", "SWHardeningNeeded"]\n'
        'allow_debug = true\nroot_ca = "root.pem"\ncollateral = "col.json"\n'
    )
    p = Policy.load(path)
    assert p.evidence == ("sgx-dcap",) and p.mrenclave == (MRENCLAVE,)
    assert p.min_isv_svn == 2 and p.allow_debug and p.root_ca_pem == pki.root_pem
    assert p.collateral == {"a": "b"} and p.app == "opencv" and p.source == str(path)
    assert Policy().tcb_statuses == ("UpToDate",) and not Policy().allow_debug


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mrenclve = 'aa'", "unknown key 'mrenclve'"),
        ("mrenclave = 'abcd'", "is not 32 bytes of hex"),
        ("evidence = ['none']", "--insecure-allow-unattested"),
        ("tcb_statuses = ['uptodate']", "is not a TCB status"),
        ("root_ca = 'missing.pem'", "cannot read"),
        ("allow_debug = 'yes'", "true or false"),
        ("min_isv_svn = -1", "0..65535"),
        ("not toml at all", "not valid TOML"),
    ],
)
def test_policy_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text + "\n")
    with pytest.raises(PolicyError, match=message):
        Policy.load(path)


def test_a_policy_for_another_app_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('app = "echo"\n')
    with pytest.raises(CsmlError, match="is for app 'echo', not 'opencv'"):
        resolve_policy("opencv", path)


# -- providers ------------------------------------------------------------------------


def test_providers_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSML_ATTESTATION_PROVIDERS", "fake=synthetic_provider:SyntheticSgxProvider")
    assert {"none", "sgx-dcap", "tdx-dcap", "fake"} <= set(provider_names())
    monkeypatch.setenv("CSML_TEST_PKI", "/nonexistent")
    with pytest.raises(FileNotFoundError):
        load_provider("fake")  # it was found and constructed
    with pytest.raises(LookupError, match="no attestation provider 'nope'; known: fake, none"):
        load_provider("nope")
    monkeypatch.setenv("CSML_ATTESTATION_PROVIDERS", "bad=no_such_module:x")
    with pytest.raises(LookupError, match="cannot load"):
        load_provider("bad")
    assert load_provider("none").produce(bytes(64)) == b""


def test_gramine_provider(tmp_path: Path) -> None:
    with pytest.raises(EvidenceUnavailable, match="Gramine"):
        GramineSgxProvider(tmp_path / "missing").produce(bytes(64))
    (tmp_path / "quote").write_bytes(b"QUOTE")
    (tmp_path / "attestation_type").write_text("dcap\n")
    rd = bytes(range(64))
    assert GramineSgxProvider(tmp_path).produce(rd) == b"QUOTE"
    assert (tmp_path / "user_report_data").read_bytes() == rd
    (tmp_path / "attestation_type").write_text("epid\n")
    with pytest.raises(EvidenceUnavailable, match="not 'dcap'"):
        GramineSgxProvider(tmp_path).produce(rd)


class _FakeTsm(TdxConfigfsProvider):
    """configfs-tsm as the kernel shows it: a new entry comes with its attribute files."""

    provider = "tdx_guest"

    def _new_entry(self) -> Path:
        entry = self.root / "entry"
        entry.mkdir()
        (entry / "provider").write_text(self.provider + "\n")
        (entry / "generation").write_text("1\n")
        (entry / "outblob").write_bytes(b"TDQUOTE")
        return entry

    def _remove_entry(self, entry: Path) -> None:
        self.seen = (entry / "inblob").read_bytes() if (entry / "inblob").exists() else b""
        shutil.rmtree(entry)


def test_tdx_configfs_provider(tmp_path: Path) -> None:
    with pytest.raises(EvidenceUnavailable, match="configfs-tsm"):
        TdxConfigfsProvider(tmp_path / "missing").produce(bytes(64))
    fake = _FakeTsm(tmp_path)
    assert fake.produce(bytes(range(64))) == b"TDQUOTE"
    assert fake.seen == bytes(range(64)) and not (tmp_path / "entry").exists()
    fake.provider = "sev_guest"
    with pytest.raises(EvidenceUnavailable, match="not a TDX guest"):
        fake.produce(bytes(64))
