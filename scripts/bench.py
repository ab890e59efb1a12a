"""hsmkeys benchmark: the KeyStore and the server against peers measured in the same run.

Every figure is a ratio to a peer measured in this run on this machine, never an
absolute target (the machine is shared and swings +-30% between runs):

  encrypt_vs_raw             KeyStore.encrypt (32 B, no context) / raw python-pkcs11 AES-GCM on
                             the same token object (HSM random IV + encrypt, 33-byte AAD)
  decrypt_vs_raw             KeyStore.decrypt of one blob / raw python-pkcs11 AES-GCM decrypt of it
  encrypt_audited_vs_raw     KeyStore.encrypt with an audit log (chained line per call) / raw
  datakey_vs_raw             generate_data_key(AES_256) / raw (random 32 B + random IV + encrypt)
  sign_rsa2048_vs_raw        sign(RSASSA_PSS_SHA_256, RAW) / raw (SHA-256 here + CKM_RSA_PKCS_PSS)
  sign_p256_vs_raw           sign(ECDSA_SHA_256, RAW) / raw (SHA-256 here + CKM_ECDSA + DER)
  encrypt_with_policy_vs_without
                             KeyStore.encrypt as a caller authorised by a 20-statement key policy
                             with encryption-context conditions / the same encrypt with no caller
  encrypt_latency_10k_vs_10  median encrypt latency with --keys keys in the token / with 10,
                             each in FRESH processes (the handle index built as a real process does)
  server_cpu_per_request_vs_raw
                             worker CPU time / requests answered (the workers' own counters on
                             /metrics, read before and after each run), --workers 1, / the raw
                             python-pkcs11 encrypt time measured between the rounds  [--server]
  server_encrypt_vs_moto     hsmkeys serve Encrypt req/s (--workers W) / moto_server req/s   [--server]
  server_cpu_per_request_2w_vs_1w
                             worker CPU per request with --workers 2 / with --workers 1   [--server]
  server_cpu_per_request_noaudit_vs_raw
                             as server_cpu_per_request_vs_raw for a --workers 1 server without
                             the audit writer (serve --ephemeral --no-audit): no target, it
                             shows what the audit line costs   [--server --audit-off-too]
  server_cpu_per_request_2w_vs_1w_noaudit
                             as server_cpu_per_request_2w_vs_1w for servers without the audit
                             writer: no target, it shows how much of the two-worker excess the
                             audit writer makes   [--server --audit-off-too]
  server_2workers_vs_1       hsmkeys serve --workers 2 / --workers 1 req/s (no target: the load
                             generator shares the 2 cores)                                [--server]
  server_vs_library          server req/s (--workers W) / in-process KeyStore.encrypt ops/s  [--server]
  pg_vs_sqlite_encrypt       hsmkeys serve Encrypt req/s with a PostgreSQL catalog / with SQLite,
                             same token, same --workers, interleaved rounds   [--multihost]
  cross_instance_visibility_ms
                             p50/p99 ms from DisableKey returning on instance A to instance B
                             (same token and PostgreSQL catalog) refusing the key   [--multihost]
  envelope_kms_calls_per_1000_messages
                             KeyStore calls for 1,000 Encryption SDK messages with the data key
                             cache (the one absolute count; without the cache it is 1,000);
                             also envelope MiB/s for 64 MiB in process   [--envelope-only: just this]

Throughput comparisons interleave the two sides round by round in ONE process and
take medians; the server runs interleave the servers round by round.

Everything lives on a throwaway SoftHSM2 token (and SQLite catalog) in a temp dir,
removed at the end: the library figures use it at 10 keys, then it grows to --keys.
For the latency ratio a 10-key twin token (its own config, same temp dir) stands in
for "10 keys", so fresh processes can alternate twin / grown token and machine drift
during the run hits both sides alike. The servers make their own (``--ephemeral``)
and moto keeps state in memory. The parent process never loads the PKCS#11 module: each phase runs
in a freshly spawned process, which is also what "opened FRESH" needs.

    env -u SOFTHSM2_CONF .venv/bin/python scripts/bench.py [--keys N] [--server] [--json]

stdout: a table; with --json the LAST line is one JSON object. Progress goes to stderr.
Exit status: 0, or 1 when a phase failed (or, with --check, a target was missed).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import multiprocessing as mp
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar, cast

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:  # loadgen.py sits beside this file
    sys.path.insert(0, str(SCRIPTS))

import loadgen  # noqa: E402

T = TypeVar("T")

TOKEN_LABEL = "hsmkeys-bench"
SMALL_TOKEN_KEYS = 10  # the 10-key baseline: 8 AES + RSA_2048 + ECC_NIST_P256
PLAINTEXT = b"\x5a" * 32
SIGN_MESSAGE = b"hsmkeys bench message " * 8  # 176 bytes, RAW: hashed by the caller
REGION = "us-east-1"
LISTENING = re.compile(r"listening on (http://[0-9.]+:\d+)")
SERVER_START_TIMEOUT_S = 120.0
SERVER_STOP_TIMEOUT_S = 15.0

# Ratio name -> (comparison, threshold). ">=" ratios must reach it, "<=" stay under it.
TARGETS: dict[str, tuple[str, float]] = {
    "encrypt_vs_raw": (">=", 0.85),
    "decrypt_vs_raw": (">=", 0.85),
    "encrypt_audited_vs_raw": (">=", 0.7),
    "datakey_vs_raw": (">=", 0.85),
    "encrypt_latency_10k_vs_10": ("<=", 1.2),
    "sign_rsa2048_vs_raw": (">=", 0.9),
    "sign_p256_vs_raw": (">=", 0.9),
    "encrypt_with_policy_vs_without": (">=", 0.9),
    "envelope_kms_calls_per_1000_messages": ("<=", 10.0),
    "server_cpu_per_request_vs_raw": ("<=", 8.0),
    "server_encrypt_vs_moto": (">=", 18.0),
    "server_cpu_per_request_2w_vs_1w": ("<=", 1.1),
}
REQUIRED: dict[str, tuple[str, float]] = {"server_encrypt_vs_moto": (">=", 10.0)}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ============================================================ the throwaway token


@dataclass(frozen=True, slots=True)
class BenchToken:
    """Where a child process finds the bench token and catalog (picklable)."""

    conf: str
    module: str
    label: str
    pin: str
    catalog: str


@dataclass(frozen=True, slots=True)
class BenchKeys:
    """Key ids (UUID strings) made by the setup phase."""

    aes: list[str]
    rsa2048: str
    p256: str


def _enter_token(token: BenchToken) -> None:
    """First thing in every child: SoftHSM2 reads SOFTHSM2_CONF when the module is loaded."""
    os.environ["SOFTHSM2_CONF"] = token.conf
    assert "pkcs11" not in sys.modules, "the PKCS#11 module was loaded before SOFTHSM2_CONF was set"


def _open_keystore(token: BenchToken) -> Any:
    return _open_keystore_parts(token)[0]


def _open_keystore_parts(token: BenchToken) -> tuple[Any, Any, Any]:
    """(KeyStore, its Pkcs11Hsm, its SqliteCatalog), opened as a real process opens them."""
    from hsmkeys.catalog.sqlite import SqliteCatalog
    from hsmkeys.hsm.pkcs11 import Pkcs11Hsm
    from hsmkeys.keystore import KeyStore

    hsm = Pkcs11Hsm.open(module=token.module, token_label=token.label, pin=token.pin)
    catalog = SqliteCatalog(token.catalog)
    return KeyStore(hsm=hsm, catalog=catalog), hsm, catalog


def _raw_session(token: BenchToken) -> Any:
    """A second, plain python-pkcs11 session on the same token (same loaded module)."""
    import pkcs11
    from pkcs11.exceptions import UserAlreadyLoggedIn

    tok = pkcs11.lib(token.module).get_token(token_label=token.label)
    try:
        return tok.open(user_pin=token.pin)
    except UserAlreadyLoggedIn:  # login is per application: the KeyStore's session did it
        return tok.open()


def _label(key_id: str) -> str:
    return f"hsmkeys/{uuid.UUID(key_id)}/v1"


def _header_prefix(key_id: str) -> bytes:
    """The first 21 bytes of the blob header (format 1, UUID, version 1); + IV = the 33-byte AAD."""
    return b"\x01" + uuid.UUID(key_id).bytes + (1).to_bytes(4, "big")


def _call_and_send(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Child side of :func:`_in_fresh_process`: send (True, result) or (False, traceback text)."""
    try:
        conn.send((True, fn(*args)))
    except BaseException as exc:
        conn.send((False, "".join(traceback.format_exception(exc))))
    finally:
        conn.close()


def _in_fresh_process(fn: Callable[..., T], *args: Any, timeout: float) -> T:
    """Run ``fn(*args)`` in a newly spawned interpreter (no PKCS#11 state inherited).

    Raises RuntimeError with the child's traceback if it raised, died, or overran
    ``timeout`` seconds (then it is killed: a phase never outlives the bench).
    """
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_call_and_send, args=(child_end, fn, args), name=fn.__name__)
    proc.start()
    child_end.close()  # so that the child's exit shows here as EOF
    try:
        if not parent_end.poll(timeout):
            proc.kill()
            raise RuntimeError(f"{fn.__name__} did not finish within {timeout:.0f} s")
        try:
            ok, value = parent_end.recv()
        except EOFError:
            proc.join(5)
            raise RuntimeError(f"{fn.__name__} died (exit status {proc.exitcode})") from None
        if not ok:
            raise RuntimeError(f"{fn.__name__} failed in its process:\n{value}")
        return cast(T, value)
    finally:
        parent_end.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


# ============================================================ timing helpers


def _rate(op: Callable[[], object], n: int) -> float:
    gc.collect()
    start = time.perf_counter()
    for _ in range(n):
        op()
    return n / (time.perf_counter() - start)


def _ops_for(op: Callable[[], object], seconds: float) -> int:
    """Warm ``op`` up and return how many calls take about ``seconds``."""
    n, elapsed = 8, 0.0
    while elapsed < 0.05:
        start = time.perf_counter()
        for _ in range(n):
            op()
        elapsed = time.perf_counter() - start
        n *= 2
    return max(20, int(n / 2 / elapsed * seconds))


@dataclass(frozen=True, slots=True)
class Comparison:
    ops_per_s: float  # KeyStore, median of rounds
    raw_ops_per_s: float  # raw python-pkcs11, median of rounds
    ratio: float  # ops_per_s / raw_ops_per_s
    ratio_spread: tuple[float, float]  # min / max of the per-round ratios
    rounds: int
    ops_per_round: int

    @property
    def us(self) -> float:
        return 1e6 / self.ops_per_s

    @property
    def raw_us(self) -> float:
        return 1e6 / self.raw_ops_per_s


def _compare(
    keystore_op: Callable[[], object], raw_op: Callable[[], object], rounds: int, seconds: float
) -> Comparison:
    """Rounds alternate which side goes first; medians of ops/s per side."""
    n_ks = _ops_for(keystore_op, seconds)
    n_raw = _ops_for(raw_op, seconds)
    ks_rates: list[float] = []
    raw_rates: list[float] = []
    for i in range(rounds):
        if i % 2 == 0:
            raw_rates.append(_rate(raw_op, n_raw))
            ks_rates.append(_rate(keystore_op, n_ks))
        else:
            ks_rates.append(_rate(keystore_op, n_ks))
            raw_rates.append(_rate(raw_op, n_raw))
    per_round = [k / r for k, r in zip(ks_rates, raw_rates, strict=True)]
    ks, raw = statistics.median(ks_rates), statistics.median(raw_rates)
    return Comparison(ks, raw, ks / raw, (min(per_round), max(per_round)), rounds, n_ks)


# ============================================================ child phases


def phase_setup(token: BenchToken) -> tuple[BenchKeys, dict[str, float]]:
    """Create the 10-key token through the KeyStore: 8 AES, one RSA_2048, one P-256."""
    _enter_token(token)
    store = _open_keystore(token)
    try:
        timings: dict[str, float] = {}
        aes: list[str] = []
        start = time.perf_counter()
        for _ in range(SMALL_TOKEN_KEYS - 2):
            aes.append(store.create_key().key_metadata.key_id)
        timings["create_aes_ms"] = (time.perf_counter() - start) * 1000 / len(aes)
        start = time.perf_counter()
        rsa = store.create_key(key_spec="RSA_2048", key_usage="SIGN_VERIFY").key_metadata.key_id
        timings["create_rsa2048_ms"] = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        p256 = store.create_key(key_spec="ECC_NIST_P256", key_usage="SIGN_VERIFY").key_metadata.key_id
        timings["create_p256_ms"] = (time.perf_counter() - start) * 1000
        return BenchKeys(aes, rsa, p256), timings
    finally:
        store.close()


def phase_library(token: BenchToken, keys: BenchKeys, rounds: int, seconds: float) -> dict[str, Any]:
    """KeyStore vs raw python-pkcs11 on the same objects, in one process."""
    _enter_token(token)
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from pkcs11 import MGF, Attribute, Mechanism, ObjectClass
    from pkcs11.mechanisms import GCMParams

    from hsmkeys.audit import AuditLog
    from hsmkeys.keystore import KeyStore

    store, hsm, catalog = _open_keystore_parts(token)
    # The same HSM session and catalog, with the audit log a configured server writes.
    audited = KeyStore(hsm=hsm, catalog=catalog)
    audit_dir = Path(tempfile.mkdtemp(prefix="hsmkeys-bench-audit-"))
    audited._audit = AuditLog(audit_dir / "audit.log", mac=audited.audit_mac, checkpoints=catalog)
    session = _raw_session(token)
    try:
        key_id = keys.aes[0]
        aes_key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=_label(key_id))
        prefix = _header_prefix(key_id)

        def raw_encrypt_blob(data: bytes) -> bytes:
            iv = session.generate_random(96)  # bits
            aad: bytes = prefix + iv  # == the KeyStore's 33-byte header: same AAD length and content
            body: bytes = aes_key.encrypt(
                data, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad, 128)
            )
            return aad + body

        def raw_data_key() -> bytes:
            return raw_encrypt_blob(session.generate_random(256))

        blob = raw_encrypt_blob(PLAINTEXT)

        def raw_decrypt_blob() -> bytes:
            # What Decrypt must do at least: header checks, then GCM with the header as AAD.
            if blob[0] != 1 or len(blob) < 49:
                raise ValueError("bad blob")
            body: bytes = aes_key.decrypt(
                blob[33:], mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(blob[21:33], blob[:33], 128)
            )
            return body

        rsa_key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=_label(keys.rsa2048))
        ec_key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=_label(keys.p256))
        assert rsa_key[Attribute.SENSITIVE] and not rsa_key[Attribute.EXTRACTABLE]

        def raw_sign_rsa() -> bytes:
            digest = hashlib.sha256(SIGN_MESSAGE).digest()
            return bytes(
                rsa_key.sign(
                    digest,
                    mechanism=Mechanism.RSA_PKCS_PSS,
                    mechanism_param=(Mechanism.SHA256, MGF.SHA256, 32),
                )
            )

        def raw_sign_ec() -> bytes:
            raw = ec_key.sign(hashlib.sha256(SIGN_MESSAGE).digest(), mechanism=Mechanism.ECDSA)
            half = len(raw) // 2
            return encode_dss_signature(
                int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
            )

        # The raw baselines must do the same work: the KeyStore accepts what they produce.
        assert store.decrypt(ciphertext_blob=raw_encrypt_blob(PLAINTEXT)).plaintext == PLAINTEXT
        for kid, alg, sig in (
            (keys.rsa2048, "RSASSA_PSS_SHA_256", raw_sign_rsa()),
            (keys.p256, "ECDSA_SHA_256", raw_sign_ec()),
        ):
            store.verify(key_id=kid, message=SIGN_MESSAGE, signature=sig, signing_algorithm=alg)

        assert raw_decrypt_blob() == PLAINTEXT == store.decrypt(ciphertext_blob=blob).plaintext

        results: dict[str, Comparison] = {}
        log("library: encrypt")
        results["encrypt"] = _compare(
            lambda: store.encrypt(key_id=key_id, plaintext=PLAINTEXT),
            lambda: raw_encrypt_blob(PLAINTEXT),
            rounds,
            seconds,
        )
        log("library: decrypt")
        results["decrypt"] = _compare(
            lambda: store.decrypt(ciphertext_blob=blob), raw_decrypt_blob, rounds, seconds
        )
        log("library: encrypt with the audit log")
        results["encrypt_audited"] = _compare(
            lambda: audited.encrypt(key_id=key_id, plaintext=PLAINTEXT),
            lambda: raw_encrypt_blob(PLAINTEXT),
            rounds,
            seconds,
        )
        log("library: generate_data_key")
        results["datakey"] = _compare(
            lambda: store.generate_data_key(key_id=key_id, key_spec="AES_256"),
            raw_data_key,
            rounds,
            seconds,
        )
        log("library: sign RSA_2048 PSS")
        results["sign_rsa2048"] = _compare(
            lambda: store.sign(
                key_id=keys.rsa2048,
                message=SIGN_MESSAGE,
                signing_algorithm="RSASSA_PSS_SHA_256",
                message_type="RAW",
            ),
            raw_sign_rsa,
            rounds,
            seconds * 2,  # ~600/s: longer rounds for as many operations
        )
        log("library: sign ECC_NIST_P256")
        results["sign_p256"] = _compare(
            lambda: store.sign(
                key_id=keys.p256,
                message=SIGN_MESSAGE,
                signing_algorithm="ECDSA_SHA_256",
                message_type="RAW",
            ),
            raw_sign_ec,
            rounds,
            seconds,
        )
        log("library: encrypt with a 20-statement key policy")
        results["encrypt_with_policy"] = _compare_policy(store, rounds, seconds)
        return {name: asdict(c) for name, c in results.items()}
    finally:
        session.close()
        if audited._audit is not None:
            audited._audit.close()
        store.close()  # closes the shared HSM session and catalog
        shutil.rmtree(audit_dir, ignore_errors=True)


def phase_audit(token: BenchToken, lines: int) -> dict[str, float]:
    """The audit writer alone: lines/s appended (chained, checkpoints MAC'd in the HSM)."""
    _enter_token(token)
    from hsmkeys.audit import AuditEvent, AuditLog

    store = _open_keystore(token)
    folder = Path(tempfile.mkdtemp(prefix="hsmkeys-bench-audit-"))
    audit = AuditLog(folder / "audit.log", mac=store.audit_mac, checkpoints=store._catalog)
    try:
        arn = store.create_key().key_metadata.arn
        event = AuditEvent(
            time=datetime.now(UTC), request_id="bench", principal="arn:aws:iam::111122223333:user/admin",
            operation="Encrypt", key_arns=(arn,), key_version=1, decision="allow key-policy:Admin",
            source="127.0.0.1",
        )
        for _ in range(200):
            audit.record(event)
        start = time.perf_counter()
        for _ in range(lines):
            audit.record(event)
        elapsed = time.perf_counter() - start
        return {"lines": lines, "lines_per_s": lines / elapsed, "us_per_line": elapsed / lines * 1e6}
    finally:
        audit.close()
        store.close()
        shutil.rmtree(folder, ignore_errors=True)


def _twenty_statement_policy(account: str, app: str) -> str:
    """A key policy as teams write them: admin, 18 other roles, and the app with context conditions."""
    statements: list[dict[str, Any]] = [
        {"Sid": "Admin", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
         "Action": "kms:*", "Resource": "*"},
    ]
    for i in range(18):
        statements.append({
            "Sid": f"Team{i}", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{account}:role/team-{i}"},
            "Action": ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey*"], "Resource": "*",
            "Condition": {"StringEquals": {"kms:EncryptionContext:team": f"team-{i}"}},
        })
    statements.append({
        "Sid": "App", "Effect": "Allow", "Principal": {"AWS": app},
        "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*",
        "Condition": {"StringEquals": {"kms:EncryptionContext:tenant": "acme"},
                      "StringLike": {"kms:EncryptionContext:purpose": "billing-*"}},
    })
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


def _compare_policy(store: Any, rounds: int, seconds: float) -> Comparison:
    """Encrypt as an authorised caller (the server's path) vs with no caller, same key and context."""
    from hsmkeys.authz.model import Principal
    from hsmkeys.operations import ENCRYPT

    app = f"arn:aws:iam::{store.account_id}:role/app"
    key_id = store.create_key(policy=_twenty_statement_policy(store.account_id, app)).key_metadata.arn
    context = {"tenant": "acme", "purpose": "billing-eu"}
    caller = Principal(app)
    args = {"key_id": key_id, "plaintext": PLAINTEXT, "encryption_context": context}
    store.invoke(ENCRYPT, args, principal=caller)  # allowed, or the comparison means nothing
    return _compare(
        lambda: store.invoke(ENCRYPT, args, principal=caller),
        lambda: store.invoke(ENCRYPT, args),
        rounds,
        seconds,
    )


def phase_latency(token: BenchToken, keys: BenchKeys, ops: int) -> dict[str, float]:
    """A FRESH process: open, first calls, then the per-call latency median (KeyStore and raw)."""
    _enter_token(token)
    from pkcs11 import Mechanism, ObjectClass
    from pkcs11.mechanisms import GCMParams

    from hsmkeys.models import KeyVersionRef

    start = time.perf_counter()
    store, hsm, catalog = _open_keystore_parts(token)
    opened = time.perf_counter()
    try:
        key_id, other_id = keys.aes[0], keys.aes[1]
        store.encrypt(key_id=key_id, plaintext=PLAINTEXT)
        first = time.perf_counter()
        store.encrypt(key_id=other_id, plaintext=PLAINTEXT)
        second_key = time.perf_counter()
        for _ in range(min(ops // 10, 2000)):  # warm
            store.encrypt(key_id=key_id, plaintext=PLAINTEXT)
        samples: list[int] = []
        clock = time.perf_counter_ns
        gc.collect()
        for _ in range(ops):
            t0 = clock()
            store.encrypt(key_id=key_id, plaintext=PLAINTEXT)
            samples.append(clock() - t0)

        # Where the time goes: the two layers under KeyStore.encrypt, through their public methods.
        key_uuid = uuid.UUID(key_id)
        ref = KeyVersionRef(key_uuid, 1)
        aad = _header_prefix(key_id) + bytes(12)
        catalog_samples: list[int] = []
        hsm_samples: list[int] = []
        for _ in range(max(ops // 4, 100)):
            t0 = clock()
            catalog.get_key(key_uuid)
            t1 = clock()
            iv = hsm.random(12)
            hsm.encrypt_aes_gcm(ref, iv, aad, PLAINTEXT)
            t2 = clock()
            catalog_samples.append(t1 - t0)
            hsm_samples.append(t2 - t1)

        # Control: the raw per-call cost on the same object, to tell token size from machine drift.
        session = _raw_session(token)
        try:
            found_at = time.perf_counter()
            aes_key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=_label(key_id))
            search_s = time.perf_counter() - found_at
            prefix = _header_prefix(key_id)
            raw_samples: list[int] = []
            for i in range(ops + min(ops // 10, 2000)):
                t0 = clock()
                iv = session.generate_random(96)
                aes_key.encrypt(
                    PLAINTEXT,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(iv, prefix + iv, 128),
                )
                if i >= min(ops // 10, 2000):
                    raw_samples.append(clock() - t0)
        finally:
            session.close()
        return {
            "open_ms": (opened - start) * 1000,
            "first_call_us": (first - opened) * 1e6,
            "second_key_first_call_us": (second_key - first) * 1e6,
            "median_us": statistics.median(samples) / 1000,
            "p99_us": sorted(samples)[int(0.99 * (len(samples) - 1))] / 1000,
            "raw_median_us": statistics.median(raw_samples) / 1000,
            "catalog_get_key_us": statistics.median(catalog_samples) / 1000,
            "hsm_random_encrypt_us": statistics.median(hsm_samples) / 1000,
            "raw_label_search_ms": search_s * 1000,
        }
    finally:
        store.close()


def phase_grow(token: BenchToken, count: int) -> dict[str, float]:
    """Add ``count`` AES keys: token objects exactly as Pkcs11Hsm.create_key makes them + catalog rows.

    Not through KeyStore.create_key: its duplicate check is one C_FindObjects per create,
    whose cost grows with the token (115-390 ms at 10,000 objects), which would make a
    10,000-key token take far longer to build than the ~78 s of the key generation itself.
    """
    _enter_token(token)
    from datetime import UTC, datetime

    import pkcs11
    from pkcs11 import Attribute, KeyType, MechanismFlag

    from hsmkeys.catalog.base import KeyRecord, VersionRecord
    from hsmkeys.catalog.sqlite import SqliteCatalog
    from hsmkeys.keystore import default_key_policy
    from hsmkeys.models import KeySpec, KeyState, KeyUsage, Origin

    session = pkcs11.lib(token.module).get_token(token_label=token.label).open(
        rw=True, user_pin=token.pin
    )
    catalog = SqliteCatalog(token.catalog)
    policy = default_key_policy("111122223333")
    template = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.MODIFIABLE: False,
    }
    start = time.perf_counter()
    batch: list[tuple[KeyRecord, VersionRecord]] = []

    def flush() -> None:
        with catalog.transaction():
            for key, version in batch:
                catalog.insert_key(key, version)
        batch.clear()

    try:
        for i in range(count):
            key_uuid = uuid.uuid4()
            now = datetime.now(UTC)
            key = KeyRecord(
                key_uuid=key_uuid,
                spec=KeySpec.SYMMETRIC_DEFAULT,
                usage=KeyUsage.ENCRYPT_DECRYPT,
                origin=Origin.AWS_KMS,
                state=KeyState.ENABLED,
                description="bench filler",
                created_at=now,
                current_version=1,
                policy=policy,
            )
            version = VersionRecord(key_uuid, 1, now)
            session.generate_key(
                KeyType.AES,
                256,
                id=version.ref.object_id,
                label=version.ref.label,
                store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template=dict(template),
            )
            batch.append((key, version))
            if len(batch) >= 500:
                flush()
            if (i + 1) % 1000 == 0:
                rate = (i + 1) / (time.perf_counter() - start)
                log(f"grow: {i + 1}/{count} keys ({rate:.0f}/s, ~{(count - i - 1) / rate:.0f} s left)")
        if batch:
            flush()
        total = catalog.count_keys()
    finally:
        catalog.close()
        session.close()
    seconds = time.perf_counter() - start
    return {"created": count, "seconds": seconds, "ms_per_key": seconds * 1000 / max(count, 1), "catalog_keys": total}


ENVELOPE_MIB = 64
ENVELOPE_MESSAGES = 1000


def phase_envelope(token: BenchToken) -> dict[str, float]:
    """Encryption SDK messages in process (hsmkeys.envelope over the KeyStore): MiB/s for a
    64 MiB message (median of 3), and KeyStore calls per 1,000 1-KiB messages with the data
    key cache (caching_materials_manager defaults) and without."""
    _enter_token(token)
    import io
    from collections import Counter

    from hsmkeys.envelope import (
        KeyStoreMasterKeyProvider,
        caching_materials_manager,
        decrypt_stream,
        encrypt_stream,
    )

    store = _open_keystore(token)
    calls: Counter[str] = Counter()

    class CountingStore:  # counts every KeyStore method the provider calls
        def __getattr__(self, name: str) -> Any:
            value = getattr(store, name)
            if not callable(value):
                return value

            def counted(*args: Any, **kwargs: Any) -> Any:
                calls[name] += 1
                return value(*args, **kwargs)

            return counted

    try:
        arn = store.create_key(description="bench envelope").key_metadata.arn
        provider = KeyStoreMasterKeyProvider(CountingStore(), key_ids=[arn])
        context = {"bench": "envelope"}
        data = os.urandom(ENVELOPE_MIB << 20)
        enc_s: list[float] = []
        dec_s: list[float] = []
        for _ in range(3):
            sealed = io.BytesIO()
            start = time.perf_counter()
            encrypt_stream(io.BytesIO(data), sealed, provider, context, source_length=len(data))
            enc_s.append(time.perf_counter() - start)
            opened = io.BytesIO()
            start = time.perf_counter()
            decrypt_stream(io.BytesIO(sealed.getvalue()), opened, provider)
            dec_s.append(time.perf_counter() - start)
            assert opened.getvalue() == data
        message = os.urandom(1024)
        per_1000: dict[str, float] = {}
        for name, keys in (("cached", caching_materials_manager(provider)), ("uncached", provider)):
            calls.clear()
            start = time.perf_counter()
            for _ in range(ENVELOPE_MESSAGES):
                encrypt_stream(io.BytesIO(message), io.BytesIO(), keys, context, source_length=len(message))
            per_1000[f"{name}_messages_per_s"] = ENVELOPE_MESSAGES / (time.perf_counter() - start)
            per_1000[f"{name}_calls"] = sum(calls.values()) * 1000 / ENVELOPE_MESSAGES
        return {
            "mb_per_s": ENVELOPE_MIB / statistics.median(enc_s),
            "decrypt_mb_per_s": ENVELOPE_MIB / statistics.median(dec_s),
            **per_1000,
        }
    finally:
        store.close()


# ============================================================ servers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server subprocess: started, awaited until ready, stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self._argv = argv
        self._env = env
        self._proc: subprocess.Popen[str] | None = None
        self._tail: list[str] = []
        self._url_found = threading.Event()
        self.url: str | None = None

    def start(self, fixed_url: str | None = None) -> str:
        """Start and wait until ready: the ``listening on`` line, or (fixed_url) a TCP answer."""
        self._proc = subprocess.Popen(
            self._argv,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,  # its own process group: stop() reaches its workers
        )
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        if fixed_url is not None:
            host, port = fixed_url.removeprefix("http://").split(":")
            while time.monotonic() < deadline and self._proc.poll() is None:
                with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 0.5):
                    self.url = fixed_url
                    break
                time.sleep(0.1)
        else:
            while time.monotonic() < deadline and self._proc.poll() is None:
                if self._url_found.wait(0.1):
                    break
        if self.url is None:
            self.stop()
            raise RuntimeError(f"{self.name} did not become ready; last output:\n" + "\n".join(self._tail[-20:]))
        return self.url

    def _drain(self) -> None:
        """Read the server's output (it must never block on a full pipe); keep a tail."""
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._tail.append(line.rstrip())
            del self._tail[:-50]
            if self.url is None:
                match = LISTENING.search(line)
                if match:
                    self.url = match.group(1)
                    self._url_found.set()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def stop(self) -> int | None:
        """SIGTERM the process (and its group), wait, then SIGKILL. Returns the exit status."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for {SERVER_STOP_TIMEOUT_S:.0f} s: killing")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Workers left behind in the group (the leader is gone): they must not outlive the bench.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode


@dataclass(slots=True)
class Endpoint:
    name: str
    server: ServerProcess
    url: str
    key_id: str
    requests: int
    runs: list[loadgen.LoadResult] = field(default_factory=list)

    def median_rps(self) -> float:
        return statistics.median(r.req_per_s for r in self.runs)


def _create_key_with_boto3(url: str, access_key: str, secret_key: str) -> str:
    """CreateKey, then prove Encrypt/Decrypt answer correctly before measuring."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "kms",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(retries={"max_attempts": 1}),
    )
    key_id = str(client.create_key(Description="bench")["KeyMetadata"]["KeyId"])
    blob = client.encrypt(KeyId=key_id, Plaintext=PLAINTEXT)["CiphertextBlob"]
    assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == PLAINTEXT
    return key_id


_CPU_LINE = re.compile(rb"^process_cpu_seconds_total (\S+)$", re.M)
_REQUESTS_LINE = re.compile(rb"^hsmkeys_requests_total\{[^}]*\} (\d+)$", re.M)


def _worker_counters(url: str, workers: int) -> dict[str, tuple[float, int]]:
    """Each worker's own (CPU seconds, requests answered) from its /metrics page.

    A new connection per scrape lands on whichever worker accepts it: scrape until every
    worker has answered (RuntimeError if one never does). Scrapes are not counted as
    requests by the server.
    """
    import http.client

    host, port = url.removeprefix("http://").split(":")
    seen: dict[str, tuple[float, int]] = {}
    for attempt in range(400):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            body = response.read()
            worker = response.getheader(loadgen.WORKER_HEADER) or "?"
        finally:
            conn.close()
        if worker not in seen:
            cpu = _CPU_LINE.search(body)
            if cpu is None:
                raise RuntimeError(f"{url}/metrics has no process_cpu_seconds_total")
            seen[worker] = (float(cpu.group(1)), sum(int(n) for n in _REQUESTS_LINE.findall(body)))
            if len(seen) == workers:
                return seen
        if attempt > 20:
            time.sleep(0.01)
    raise RuntimeError(f"only {len(seen)} of {workers} workers answered /metrics")


def _cpu_per_request_us(before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]]) -> float:
    """Worker CPU time over requests answered between two scrapes, all workers summed (µs)."""
    if set(before) != set(after):
        raise RuntimeError(f"the workers changed during the run: {sorted(before)} -> {sorted(after)}")
    cpu = sum(after[w][0] - before[w][0] for w in after)
    answered = sum(after[w][1] - before[w][1] for w in after)
    if answered <= 0:
        raise RuntimeError("no request was answered between the scrapes")
    return cpu / answered * 1e6


def phase_raw_encrypt(token: BenchToken, ops: int) -> float:
    """µs per raw python-pkcs11 AES-GCM encrypt (HSM random IV + encrypt, 33-byte AAD) on a
    token object: the server figures' yardstick, measured between their rounds."""
    _enter_token(token)
    import pkcs11
    from pkcs11 import KeyType, Mechanism
    from pkcs11.exceptions import UserAlreadyLoggedIn
    from pkcs11.mechanisms import GCMParams

    tok = pkcs11.lib(token.module).get_token(token_label=token.label)
    try:
        session = tok.open(rw=True, user_pin=token.pin)
    except UserAlreadyLoggedIn:
        session = tok.open(rw=True)
    try:
        label = f"bench-raw-{uuid.uuid4()}"
        key = session.generate_key(KeyType.AES, 256, label=label, store=True)
        try:
            prefix = b"\x01" + bytes(20)

            def raw() -> bytes:
                iv = session.generate_random(96)
                body: bytes = key.encrypt(
                    PLAINTEXT, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, prefix + iv, 128)
                )
                return body

            for _ in range(500):
                raw()
            times = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(ops // 5):
                    raw()
                times.append((time.perf_counter() - start) / (ops // 5) * 1e6)
            return statistics.median(times)
        finally:
            with contextlib.suppress(pkcs11.PKCS11Error):
                key.destroy()
    finally:
        session.close()


def phase_servers(args: argparse.Namespace, token: BenchToken) -> dict[str, Any]:
    """hsmkeys serve --workers 1 and 2, and moto_server, under the same load, round-robin."""
    access_key = "AKIA" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
    secret_key = secrets.token_urlsafe(30)
    base_env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    base_env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    hsmkeys_cli = str(Path(sys.executable).parent / "hsmkeys")
    if not Path(hsmkeys_cli).exists():
        hsmkeys_cli = shutil.which("hsmkeys") or hsmkeys_cli
    endpoints: list[Endpoint] = []
    servers: list[ServerProcess] = []
    workers_of: dict[str, int] = {}  # hsmkeys endpoints: their --workers
    try:
        variants = [(f"hsmkeys-w{w}", w, []) for w in sorted({1, 2, args.workers})]
        if args.audit_off_too:
            variants += [("hsmkeys-w1-noaudit", 1, ["--no-audit"]), ("hsmkeys-w2-noaudit", 2, ["--no-audit"])]
        for name, workers, extra in variants:
            workers_of[name] = workers
            server = ServerProcess(
                name,
                [hsmkeys_cli, "serve", "--ephemeral", "--host", "127.0.0.1", "--port", "0",
                 "--workers", str(workers), *extra],
                base_env,
            )  # fmt: skip
            servers.append(server)
            log(f"starting hsmkeys serve --ephemeral --workers {workers} {' '.join(extra)}".rstrip())
            url = server.start()
            key_id = _create_key_with_boto3(url, access_key, secret_key)
            endpoints.append(Endpoint(server.name, server, url, key_id, args.requests))
        port = _free_port()
        moto = ServerProcess(
            "moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], base_env
        )
        servers.append(moto)
        log("starting moto_server")
        url = moto.start(fixed_url=f"http://127.0.0.1:{port}")
        key_id = _create_key_with_boto3(url, access_key, secret_key)
        endpoints.append(Endpoint("moto", moto, url, key_id, args.moto_requests))

        raw_us: list[float] = []
        cpu_us: dict[str, list[float]] = {e.name: [] for e in endpoints if e.name != "moto"}
        for round_no in range(args.server_rounds):
            raw_us.append(_in_fresh_process(phase_raw_encrypt, token, 20_000, timeout=300))
            log(f"server round {round_no + 1}/{args.server_rounds}: raw encrypt {raw_us[-1]:.1f} µs")
            order = endpoints[round_no % len(endpoints) :] + endpoints[: round_no % len(endpoints)]
            for endpoint in order:
                workers = workers_of.get(endpoint.name, 0)
                before = _worker_counters(endpoint.url, workers) if workers else {}
                spec = loadgen.LoadSpec(
                    endpoint=endpoint.url,
                    access_key_id=access_key,
                    secret_access_key=secret_key,
                    region=REGION,
                    target="Encrypt",
                    payload=loadgen.encrypt_payload(endpoint.key_id, PLAINTEXT),
                    clients=args.clients,
                    requests_per_client=max(1, endpoint.requests // args.clients),
                    warmup_per_client=args.warmup,
                    max_seconds=args.max_run_seconds,
                )
                result = loadgen.run_load(spec)
                if workers:
                    cpu_us[endpoint.name].append(_cpu_per_request_us(before, _worker_counters(endpoint.url, workers)))
                if result.errors:
                    raise RuntimeError(f"{endpoint.name}: {result.errors} failed requests; first: {result.first_error}")
                endpoint.runs.append(result)
                if result.truncated:
                    log(f"{endpoint.name}: run stopped at --max-run-seconds after {result.requests} requests")
                cpu_note = f", worker CPU {cpu_us[endpoint.name][-1]:.0f} µs/request" if workers else ""
                log(
                    f"server round {round_no + 1}/{args.server_rounds} {endpoint.name}: "
                    f"{result.req_per_s:,.0f} req/s, p50 {result.p50_ms:.2f} ms, "
                    f"workers {sorted(result.workers.values())}{cpu_note}"
                )
    finally:
        for server in servers:
            status = server.stop()
            log(f"stopped {server.name} (exit {status})")
    by_name = {e.name: e for e in endpoints}
    figures: dict[str, Any] = {
        name: {
            "req_per_s": e.median_rps(),
            "runs_req_per_s": [r.req_per_s for r in e.runs],
            "p50_ms": statistics.median(r.p50_ms for r in e.runs),
            "p99_ms": statistics.median(r.p99_ms for r in e.runs),
            "requests_per_run": e.runs[0].requests if e.runs else 0,
            "answers_per_worker_last_run": sorted(e.runs[-1].workers.values()) if e.runs else [],
            "client_cpu_cores": statistics.median(r.client_cpu_cores for r in e.runs) if e.runs else 0.0,
            "truncated_runs": sum(r.truncated for r in e.runs),
        }
        for name, e in by_name.items()
    }
    for name, runs in cpu_us.items():
        figures[name]["cpu_us_per_request"] = statistics.median(runs)
        figures[name]["runs_cpu_us_per_request"] = runs
    figures["raw_encrypt_us"] = statistics.median(raw_us)
    figures["runs_raw_encrypt_us"] = raw_us
    return figures


def _write_server_config(folder: Path, token: BenchToken, catalog: str, access_key: str, secret_key: str) -> Path:
    """A config for ``hsmkeys serve``: the bench token, ``catalog``, one kms:* principal."""
    folder.mkdir(parents=True, exist_ok=True)
    pin, secret = folder / "pin", folder / "secret"
    for path, value in ((pin, token.pin), (secret, secret_key)):
        path.write_text(value + "\n")
        path.chmod(0o600)
    config = {
        "hsm": {"module": token.module, "token_label": token.label, "pin_file": str(pin), "softhsm2_conf": token.conf},
        "catalog": catalog,
        "principals": [{
            "arn": "arn:aws:iam::111122223333:user/bench", "access_key_id": access_key,
            "secret_access_key_file": str(secret),
            "policy": {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]},
        }],
    }  # fmt: skip
    path = folder / "hsmkeys.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _visibility_ms(url_a: str, url_b: str, access_key: str, secret_key: str, rounds: int) -> list[float]:
    """Per round: B encrypts (the key is cached there as Enabled), A disables it, then B is
    polled with a pre-signed Encrypt until it refuses; ms from A's answer to B's refusal."""
    import http.client
    from urllib.parse import urlsplit

    import boto3
    from botocore.config import Config

    a = boto3.client(
        "kms", endpoint_url=url_a, region_name=REGION, aws_access_key_id=access_key,
        aws_secret_access_key=secret_key, config=Config(retries={"max_attempts": 1}),
    )  # fmt: skip
    key_id = str(a.create_key(Description="visibility")["KeyMetadata"]["KeyId"])
    spec = loadgen.LoadSpec(url_b, access_key, secret_key, REGION, "Encrypt", loadgen.encrypt_payload(key_id, PLAINTEXT))
    body = json.dumps(spec.payload).encode()
    headers = loadgen.signed_headers(spec, body)
    parts = urlsplit(url_b)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)

    def b_encrypts() -> bool:
        conn.request("POST", "/", body=body, headers=headers)
        response = conn.getresponse()
        answer = response.read()
        if response.status != 200 and b"DisabledException" not in answer:
            raise RuntimeError(f"B answered {response.status}: {answer[:200]!r}")
        return response.status == 200

    samples: list[float] = []
    try:
        for _ in range(rounds):
            a.enable_key(KeyId=key_id)
            deadline = time.monotonic() + 5
            while not b_encrypts():  # B sees the key enabled again (and caches it)
                if time.monotonic() > deadline:
                    raise RuntimeError("B never saw the key enabled")
            a.disable_key(KeyId=key_id)
            committed = time.perf_counter()
            while b_encrypts():
                if time.perf_counter() - committed > 5:
                    raise RuntimeError("B never refused the disabled key")
            samples.append((time.perf_counter() - committed) * 1000)
    finally:
        conn.close()
    return samples


def phase_multihost(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One token; ``hsmkeys serve`` with a SQLite and with a PostgreSQL catalog (same
    --workers) under the same load, round-robin; then two PostgreSQL instances for the
    cross-instance visibility. PostgreSQL is a throwaway server (tests/pgserver.py)."""
    tests_dir = str(SCRIPTS.parent / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    from pgserver import running_server

    access_key = "AKIA" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
    secret_key = secrets.token_urlsafe(30)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOFTHSM2_CONF", "AWS_", "HSMKEYS_"))}
    hsmkeys_cli = [sys.executable, "-m", "hsmkeys"]
    token = _make_token(tmp / "multihost", TOKEN_LABEL + "-mh")
    servers: list[ServerProcess] = []
    with running_server() as pg:
        dsn = pg.dsn(pg.create_database())
        try:

            def serve(name: str, catalog: str, workers: int) -> str:
                config = _write_server_config(tmp / "multihost" / name, token, catalog, access_key, secret_key)
                server = ServerProcess(
                    name,
                    [*hsmkeys_cli, "--config", str(config), "serve", "--no-audit", "--host", "127.0.0.1",
                     "--port", "0", "--workers", str(workers)],
                    env,
                )  # fmt: skip
                servers.append(server)
                log(f"starting hsmkeys serve ({name}, --workers {workers})")
                return server.start()

            endpoints = []
            for name, catalog in (("sqlite", str(tmp / "multihost" / "catalog.sqlite3")), ("postgresql", dsn)):
                url = serve(name, catalog, args.workers)
                key_id = _create_key_with_boto3(url, access_key, secret_key)
                endpoints.append(Endpoint(name, servers[-1], url, key_id, args.requests))
            for round_no in range(args.server_rounds):
                order = endpoints[round_no % 2 :] + endpoints[: round_no % 2]
                for endpoint in order:
                    spec = loadgen.LoadSpec(
                        endpoint=endpoint.url, access_key_id=access_key, secret_access_key=secret_key,
                        region=REGION, target="Encrypt", payload=loadgen.encrypt_payload(endpoint.key_id, PLAINTEXT),
                        clients=args.clients, requests_per_client=max(1, endpoint.requests // args.clients),
                        warmup_per_client=args.warmup, max_seconds=args.max_run_seconds,
                    )  # fmt: skip
                    result = loadgen.run_load(spec)
                    if result.errors:
                        raise RuntimeError(f"{endpoint.name}: {result.errors} failed requests; first: {result.first_error}")
                    endpoint.runs.append(result)
                    log(
                        f"multihost round {round_no + 1}/{args.server_rounds} {endpoint.name}: "
                        f"{result.req_per_s:,.0f} req/s, p50 {result.p50_ms:.2f} ms"
                    )
            url_b = serve("postgresql-b", dsn, 1)
            samples = _visibility_ms(endpoints[1].url, url_b, access_key, secret_key, args.visibility_rounds)
        finally:
            for server in servers:
                log(f"stopped {server.name} (exit {server.stop()})")
    quantiles = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        **{
            e.name: {
                "req_per_s": e.median_rps(),
                "runs_req_per_s": [r.req_per_s for r in e.runs],
                "p50_ms": statistics.median(r.p50_ms for r in e.runs),
                "p99_ms": statistics.median(r.p99_ms for r in e.runs),
            }
            for e in endpoints
        },
        "visibility": {"p50_ms": statistics.median(samples), "p99_ms": quantiles[98], "rounds": len(samples)},
    }


# ============================================================ orchestration and report


def _target_entry(name: str, value: float | None) -> dict[str, Any]:
    op, threshold = TARGETS[name]
    met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    entry: dict[str, Any] = {"value": value, "target": f"{op} {threshold:g}", "met": met}
    if name in REQUIRED:
        rop, rthreshold = REQUIRED[name]
        entry["required"] = f"{rop} {rthreshold:g}"
        entry["required_met"] = None if value is None else value >= rthreshold
    return entry


def _softhsm_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["softhsm2-util", "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    return "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="hsmkeys benchmark: ratios against peers measured in the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--keys", type=int, default=10_000, help="keys in the token for the latency ratio (<= 10 skips it)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per library comparison")
    p.add_argument("--round-seconds", type=float, default=0.4, help="target length of one round per side")
    p.add_argument("--latency-ops", type=int, default=20_000, help="timed encrypt calls per latency process")
    p.add_argument("--latency-procs", type=int, default=3, help="fresh processes per token size")
    p.add_argument("--server", action="store_true", help="also benchmark hsmkeys serve and moto_server")
    p.add_argument("--workers", type=int, default=2, help="hsmkeys workers for server_encrypt_vs_moto / _vs_library")
    p.add_argument("--clients", type=int, default=6, help="load generator processes (one keep-alive connection each)")
    p.add_argument("--requests", type=int, default=12_000, help="measured requests per hsmkeys run")
    p.add_argument("--moto-requests", type=int, default=1_500, help="measured requests per moto run")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured requests per client before each run")
    p.add_argument(
        "--max-run-seconds", type=float, default=20.0, help="a load run stops early (marked truncated) after this"
    )
    p.add_argument("--server-rounds", type=int, default=3, help="rounds over the servers (medians)")
    p.add_argument(
        "--audit-off-too",
        action="store_true",
        help="also one- and two-worker servers without the audit writer (what the audit line costs)",
    )
    p.add_argument("--server-only", action="store_true", help="only the server comparisons (implies --server)")
    p.add_argument("--envelope-only", action="store_true", help="only the envelope (Encryption SDK) phase")
    p.add_argument(
        "--multihost", action="store_true", help="also PostgreSQL vs SQLite catalog and cross-instance visibility"
    )
    p.add_argument("--multihost-only", action="store_true", help="only the --multihost phase")
    p.add_argument("--visibility-rounds", type=int, default=200, help="disable/refuse rounds for the visibility")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--check", action="store_true", help="exit 1 if a measured target is missed")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (token, catalog)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.latency_procs < 1 or args.server_rounds < 1 or args.clients < 1:
        p.error("--rounds, --latency-procs, --server-rounds and --clients must be at least 1")
    if args.server_only:
        args.server = True
    if args.multihost_only:
        args.multihost = True
    if args.workers < 1:
        p.error("--workers must be at least 1")
    return args


def _median_of(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _token_phases(
    args: argparse.Namespace,
    token: BenchToken,
    small_token: BenchToken,
    figures: dict[str, Any],
    ratios: dict[str, float | None],
) -> None:
    """Setup, the library comparisons (10 keys), growth to --keys, then latency in fresh
    processes alternating between the grown token and a 10-key twin, so that machine
    drift during the run hits both sides of the ratio alike."""
    keys, create_timings = _in_fresh_process(phase_setup, token, timeout=300)
    figures["create"] = create_timings
    errors: list[str] = []

    def guarded(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            log(f"{name} FAILED:\n{traceback.format_exc()}")

    latency: dict[str, list[dict[str, float]]] = {}

    def library() -> None:
        lib = _in_fresh_process(phase_library, token, keys, args.rounds, args.round_seconds, timeout=1800)
        figures["library"] = lib
        for name in ("encrypt", "decrypt", "encrypt_audited", "datakey", "sign_rsa2048", "sign_p256"):
            ratios[f"{name}_vs_raw"] = lib[name]["ratio"]
        ratios["encrypt_with_policy_vs_without"] = lib["encrypt_with_policy"]["ratio"]

    guarded("library", library)

    def grow_and_measure() -> None:
        sides: list[tuple[int, BenchToken, BenchKeys]] = []
        if args.keys > SMALL_TOKEN_KEYS:
            small_keys, _ = _in_fresh_process(phase_setup, small_token, timeout=300)
            sides.append((SMALL_TOKEN_KEYS, small_token, small_keys))
            count = args.keys - SMALL_TOKEN_KEYS
            log(f"grow: adding {count} AES keys (~{count * 0.009:.0f} s)")
            figures["grow"] = _in_fresh_process(phase_grow, token, count, timeout=120 + count * 0.1)
        sides.append((max(args.keys, SMALL_TOKEN_KEYS), token, keys))
        for i in range(args.latency_procs):
            for size, tok, tok_keys in sides:
                log(f"latency with {size} keys: fresh process {i + 1}/{args.latency_procs}")
                result = _in_fresh_process(phase_latency, tok, tok_keys, args.latency_ops, timeout=600)
                latency.setdefault(str(size), []).append(result)

    guarded("latency", grow_and_measure)
    if latency:
        figures["latency"] = {
            size: {
                key: _median_of(runs, key) for key in runs[0]
            } | {"processes": len(runs)}
            for size, runs in latency.items()
        }
        small, big = latency.get(str(SMALL_TOKEN_KEYS)), latency.get(str(args.keys))
        if small and big and args.keys > SMALL_TOKEN_KEYS:
            ratios["encrypt_latency_10k_vs_10"] = _median_of(big, "median_us") / _median_of(small, "median_us")
            figures["latency"]["raw_control_ratio"] = _median_of(big, "raw_median_us") / _median_of(
                small, "raw_median_us"
            )

    if errors:
        raise RuntimeError("; ".join(errors))


def _make_token(directory: Path, label: str) -> BenchToken:
    """A fresh SoftHSM2 config + token + catalog path under ``directory`` (children load it)."""
    from hsmkeys.hsm import softhsm

    conf = softhsm.write_conf(directory)
    token = BenchToken(
        conf=str(conf),
        module=str(softhsm.find_module()),
        label=label,
        pin=secrets.token_hex(8),
        catalog=str(directory / "catalog.sqlite3"),
    )
    softhsm.init_token(conf, token.label, token.pin, secrets.token_hex(8))
    return token


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    report: dict[str, Any] = {
        "bench": "hsmkeys",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "softhsm2": _softhsm_version(),
        },
        "params": {
            k: v
            for k, v in vars(args).items()
            if k not in ("json", "check", "keep")
        },
        "errors": [],
    }
    figures: dict[str, Any] = {}
    ratios: dict[str, float | None] = dict.fromkeys(
        (
            "encrypt_vs_raw",
            "decrypt_vs_raw",
            "encrypt_audited_vs_raw",
            "datakey_vs_raw",
            "encrypt_latency_10k_vs_10",
            "sign_rsa2048_vs_raw",
            "sign_p256_vs_raw",
            "encrypt_with_policy_vs_without",
        ),
        None,
    )
    tmp = Path(tempfile.mkdtemp(prefix="hsmkeys-bench-"))
    try:
        token = _make_token(tmp / "main", TOKEN_LABEL)
        small_token = _make_token(tmp / "baseline10", TOKEN_LABEL + "-10")
        log(f"tokens in {tmp}")

        def guarded(name: str, fn: Callable[[], None]) -> None:
            try:
                fn()
            except Exception as exc:
                report["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
                log(f"{name} FAILED:\n{traceback.format_exc()}")

        only_other = args.server_only or args.multihost_only
        if not only_other and not args.envelope_only:
            guarded("library phases", lambda: _token_phases(args, token, small_token, figures, ratios))
        if not only_other:

            def envelope() -> None:
                figures["envelope"] = _in_fresh_process(phase_envelope, token, timeout=600)
                ratios["envelope_kms_calls_per_1000_messages"] = figures["envelope"]["cached_calls"]

            ratios["envelope_kms_calls_per_1000_messages"] = None
            guarded("envelope", envelope)

            def audit_writer() -> None:
                figures["audit"] = _in_fresh_process(phase_audit, token, 20_000, timeout=600)
                report["audit_lines_per_s"] = figures["audit"]["lines_per_s"]

            if not args.envelope_only:
                guarded("audit", audit_writer)
        if args.server:

            def servers() -> None:
                srv = phase_servers(args, token)
                figures["server"] = srv
                main_name = f"hsmkeys-w{args.workers}"
                ratios["server_encrypt_vs_moto"] = srv[main_name]["req_per_s"] / srv["moto"]["req_per_s"]
                w1, w2 = srv["hsmkeys-w1"], srv["hsmkeys-w2"]
                ratios["server_cpu_per_request_vs_raw"] = w1["cpu_us_per_request"] / srv["raw_encrypt_us"]
                ratios["server_cpu_per_request_2w_vs_1w"] = w2["cpu_us_per_request"] / w1["cpu_us_per_request"]
                ratios["server_2workers_vs_1"] = w2["req_per_s"] / w1["req_per_s"]
                if "hsmkeys-w1-noaudit" in srv:
                    w1_plain = srv["hsmkeys-w1-noaudit"]["cpu_us_per_request"]
                    ratios["server_cpu_per_request_noaudit_vs_raw"] = w1_plain / srv["raw_encrypt_us"]
                    ratios["server_cpu_per_request_2w_vs_1w_noaudit"] = (
                        srv["hsmkeys-w2-noaudit"]["cpu_us_per_request"] / w1_plain
                    )
                if "library" in figures:
                    ratios["server_vs_library"] = (
                        srv[main_name]["req_per_s"] / figures["library"]["encrypt"]["ops_per_s"]
                    )

            for name in (
                "server_cpu_per_request_vs_raw",
                "server_encrypt_vs_moto",
                "server_cpu_per_request_2w_vs_1w",
                "server_2workers_vs_1",
                "server_vs_library",
                *(
                    ["server_cpu_per_request_noaudit_vs_raw", "server_cpu_per_request_2w_vs_1w_noaudit"]
                    if args.audit_off_too
                    else []
                ),
            ):
                ratios[name] = None
            guarded("server", servers)
        if args.multihost:

            def multihost() -> None:
                mh = phase_multihost(args, tmp)
                figures["multihost"] = mh
                ratios["pg_vs_sqlite_encrypt"] = mh["postgresql"]["req_per_s"] / mh["sqlite"]["req_per_s"]
                report["cross_instance_visibility_ms"] = mh["visibility"]

            ratios["pg_vs_sqlite_encrypt"] = None
            guarded("multihost", multihost)
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report.update(ratios)
    report["targets"] = {name: _target_entry(name, ratios[name]) for name in TARGETS if name in ratios}
    report["figures"] = figures
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_table(report: dict[str, Any]) -> str:
    lines: list[str] = []
    params = report["params"]
    lines.append(
        f"hsmkeys bench: {report['machine']['cpus']} cpus, python {report['machine']['python']}, "
        f"softhsm2 {report['machine']['softhsm2']}, keys={params['keys']}, rounds={params['rounds']}, "
        f"{report['seconds']} s"
    )
    lines.append("")
    lines.append(f"{'ratio':<28}{'value':>8}  {'target':<10}{'met':<5}")
    extras = (
        "server_cpu_per_request_noaudit_vs_raw",
        "server_cpu_per_request_2w_vs_1w_noaudit",
        "server_2workers_vs_1",
        "server_vs_library",
        "pg_vs_sqlite_encrypt",
    )
    names = [n for n in (*TARGETS, *extras) if n in report]
    for name in names:
        value = report[name]
        entry = report["targets"].get(name)
        target = entry["target"] if entry else "-"
        met = "-" if not entry or entry["met"] is None else ("yes" if entry["met"] else "NO")
        extra = ""
        if entry and "required" in entry and entry["required_met"] is not None:
            extra = f"  (required {entry['required']}: {'yes' if entry['required_met'] else 'NO'})"
        lines.append(f"{name:<28}{_fmt(value):>8}  {target:<10}{met:<5}{extra}")

    figures = report["figures"]
    lines.append("")
    lines.append(f"{'figure':<44}{'ops/s':>10}{'µs/op':>10}   {'spread of per-round ratios'}")
    for name, label in (
        ("encrypt", "encrypt 32 B"),
        ("decrypt", "decrypt 32 B"),
        ("encrypt_audited", "encrypt 32 B, audit log on"),
        ("datakey", "generate_data_key AES_256"),
        ("sign_rsa2048", "sign RSA_2048 PSS SHA-256"),
        ("sign_p256", "sign ECC_NIST_P256 ECDSA SHA-256"),
    ):
        c = figures.get("library", {}).get(name)
        if c is None:
            continue
        lo, hi = c["ratio_spread"]
        lines.append(f"  KeyStore {label:<33}{c['ops_per_s']:>10,.0f}{1e6 / c['ops_per_s']:>10.1f}   {lo:.2f}-{hi:.2f}")
        lines.append(f"  raw      {label:<33}{c['raw_ops_per_s']:>10,.0f}{1e6 / c['raw_ops_per_s']:>10.1f}")
    for size, lat in figures.get("latency", {}).items():
        if not isinstance(lat, dict):
            continue
        lines.append(
            f"  latency, {size} keys in the token ({lat['processes']} fresh processes, medians): "
            f"KeyStore {lat['median_us']:.1f} µs (p99 {lat['p99_us']:.1f}), raw {lat['raw_median_us']:.1f} µs; "
            f"open {lat['open_ms']:.0f} ms, first call {lat['first_call_us'] / 1000:.1f} ms, "
            f"first call on a 2nd key {lat['second_key_first_call_us']:.0f} µs, "
            f"raw label search {lat['raw_label_search_ms']:.1f} ms; inside: catalog.get_key "
            f"{lat['catalog_get_key_us']:.1f} µs, hsm.random+encrypt_aes_gcm {lat['hsm_random_encrypt_us']:.1f} µs"
        )
    if "raw_control_ratio" in figures.get("latency", {}):
        lines.append(f"  raw encrypt latency ratio (control, same sizes): {figures['latency']['raw_control_ratio']:.2f}")
    if "grow" in figures:
        g = figures["grow"]
        lines.append(f"  token grown by {g['created']} AES keys in {g['seconds']:.0f} s ({g['ms_per_key']:.1f} ms/key)")
    if "envelope" in figures:
        e = figures["envelope"]
        lines.append(
            f"  envelope (Encryption SDK in process, {ENVELOPE_MIB} MiB message): encrypt {e['mb_per_s']:.0f} MiB/s, "
            f"decrypt {e['decrypt_mb_per_s']:.0f} MiB/s; KeyStore calls per 1,000 1-KiB messages: "
            f"{e['cached_calls']:.0f} cached ({e['cached_messages_per_s']:.0f} msg/s), "
            f"{e['uncached_calls']:.0f} uncached ({e['uncached_messages_per_s']:.0f} msg/s)"
        )
    if "create" in figures:
        c = figures["create"]
        lines.append(
            f"  KeyStore.create_key: AES {c['create_aes_ms']:.1f} ms, RSA_2048 {c['create_rsa2048_ms']:.0f} ms, "
            f"P-256 {c['create_p256_ms']:.1f} ms"
        )
    for name, s in figures.get("server", {}).items():
        if not isinstance(s, dict):
            continue
        runs = ", ".join(f"{x:,.0f}" for x in s["runs_req_per_s"])
        workers = f", answers per worker {s['answers_per_worker_last_run']}" if s["answers_per_worker_last_run"] else ""
        if s["truncated_runs"]:
            workers += f", {s['truncated_runs']} run(s) cut at --max-run-seconds"
        if "cpu_us_per_request" in s:
            workers += f"; worker CPU {s['cpu_us_per_request']:.0f} µs/request"
        lines.append(
            f"  server {name:<12} Encrypt {s['req_per_s']:>8,.0f} req/s (runs {runs}; p50 {s['p50_ms']:.2f} ms, "
            f"p99 {s['p99_ms']:.2f} ms{workers}; load generator used {s['client_cpu_cores']:.2f} cores)"
        )
    if "server" in figures:
        lines.append(f"  raw python-pkcs11 encrypt between server rounds: {figures['server']['raw_encrypt_us']:.1f} µs")
        lines.append(
            f"  load: {params['clients']} client processes x 1 keep-alive connection, "
            f"{params['requests']} (moto {params['moto_requests']}) requests per run, "
            f"server_encrypt_vs_moto and server_vs_library use --workers {params['workers']}"
        )
    if "multihost" in figures:
        mh = figures["multihost"]
        for name in ("sqlite", "postgresql"):
            runs = ", ".join(f"{x:,.0f}" for x in mh[name]["runs_req_per_s"])
            lines.append(
                f"  server, {name} catalog, --workers {params['workers']}: Encrypt {mh[name]['req_per_s']:,.0f} req/s "
                f"(runs {runs}; p50 {mh[name]['p50_ms']:.2f} ms, p99 {mh[name]['p99_ms']:.2f} ms)"
            )
        vis = mh["visibility"]
        lines.append(
            f"  cross-instance visibility (DisableKey answered on A -> B refuses), {vis['rounds']} rounds: "
            f"p50 {vis['p50_ms']:.2f} ms, p99 {vis['p99_ms']:.2f} ms"
        )
    for error in report["errors"]:
        lines.append(f"ERROR {error}")
    return "\n".join(lines)


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every finally: servers stopped, temp dir removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    if os.environ.get("SOFTHSM2_CONF"):
        log("ignoring SOFTHSM2_CONF from the environment: the bench makes its own token")
        os.environ.pop("SOFTHSM2_CONF")
    report = run(args)
    print(render_table(report))
    if args.json:
        print(json.dumps(report, sort_keys=False, default=str))
    if report["errors"]:
        return 1
    if args.check and any(
        entry["met"] is False for entry in report["targets"].values()
    ):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
