"""Where one hot-path call spends its time: per-stage µs for the KeyStore and the server.

Library (in a fresh process, on a throwaway SoftHSM2 token made as scripts/bench.py makes
it): for each scenario the KeyStore call and the raw python-pkcs11 call on the SAME token
object are timed in interleaved rounds (perf_counter, no profiler attached; medians and
the min-max spread of the rounds), then each is run in a loop under py-spy (sampling,
``--nonblocking``, a separate process, so the timed code is not instrumented). Every
sample's stack is put in one stage by the rules in ``LIBRARY_STAGES`` (first rule that
matches any frame wins); a stage's µs per call is its share of the samples times the
median µs per call.

    encrypt            KeyStore.encrypt, trusted in-process caller (bench.py encrypt_vs_raw)
    encrypt_policy     KeyStore.invoke(ENCRYPT) as a caller allowed by a 20-statement key
                       policy with encryption-context conditions (the server's path)
    encrypt_audited    KeyStore.encrypt with an audit log (a chained line per call)
    datakey            generate_data_key(AES_256)
    decrypt            decrypt of one blob
    sign_p256          sign(ECDSA_SHA_256, RAW)

Server (``--server``): ``hsmkeys serve --ephemeral --workers 1`` (audit log on, as
bench.py's server phase) under scripts/loadgen.py's Encrypt load. Rounds alternate an
unprofiled run (worker CPU per request from its own /metrics counters, as bench.py
reads them) and a run with py-spy attached (stage shares); µs per request per stage =
share x the unprofiled CPU per request. py-spy without ``--idle`` records only samples
of a thread that is running, which is what CPU time counts.

    env -u SOFTHSM2_CONF .venv/bin/python scripts/profile_hotpath.py [--server] [--json]

Needs py-spy (``.venv/bin/pip install py-spy``; a local tool, not a dependency).
stdout: the tables (with --json the last line is one JSON object); progress on stderr.
"""

from __future__ import annotations

import argparse
import collections
import json
import linecache
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import bench  # noqa: E402
import loadgen  # noqa: E402

THIS_FILE = str(Path(__file__).resolve())
SAMPLE_RATE = 1000  # py-spy samples per second


def log(message: str) -> None:
    print(f"[profile {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _py_spy() -> str:
    candidate = Path(sys.executable).parent / "py-spy"
    found = str(candidate) if candidate.exists() else shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy (local tool, not a dependency)")
    return found


# ============================================================ stacks and stage rules

Frame = tuple[str, str, int]  # (function, file, line)


def _parse_raw(path: Path) -> list[tuple[list[Frame], int]]:
    """py-spy ``--format raw``: ``func (file:line);...;func (file:line) count``, root first."""
    stacks: list[tuple[list[Frame], int]] = []
    for line in path.read_text().splitlines():
        body, _, count = line.rpartition(" ")
        if not body or not count.isdigit():
            continue
        frames: list[Frame] = []
        for part in body.split(";"):
            func, sep, rest = part.partition(" (")
            if not sep:
                frames.append((part, "", 0))
                continue
            location = rest.rstrip(")")
            file, _, lineno = location.rpartition(":")
            frames.append((func, file, int(lineno) if lineno.isdigit() else 0))
        stacks.append((frames, int(count)))
    return stacks


def _source(frame: Frame) -> str:
    return linecache.getline(frame[1], frame[2]) if frame[1].startswith("/") else ""


def _in(frame: Frame, *fragments: str) -> bool:
    return any(f in frame[1] for f in fragments)


def _func(frame: Frame, *names: str) -> bool:
    short = frame[0].rsplit(".", 1)[-1]
    return short in names


Rule = tuple[str, Callable[[list[Frame]], bool]]


def _any(stack: list[Frame], test: Callable[[Frame], bool]) -> bool:
    return any(test(f) for f in stack)


def _leaf_line_has(stack: list[Frame], *snippets: str) -> bool:
    """The innermost frame of ours or python-pkcs11's calls one of ``snippets``."""
    for frame in reversed(stack):
        if frame[1].startswith("<") or ("/pkcs11/" in frame[1] and "site-packages" in frame[1]):
            continue
        text = _source(frame)
        return any(s in text for s in snippets)
    return False


_HSM_C = (".encrypt(", ".decrypt(", ".sign(", "generate_random(")

# KeyStore stages (first match wins). "HSM C call" is the python-pkcs11 call itself
# (its Cython wrapper + SoftHSM2's C_*Init/C_*): what the raw side pays as well.
LIBRARY_STAGES: list[Rule] = [
    ("audit: HSM HMAC of a checkpoint", lambda s: _any(s, lambda f: _func(f, "audit_mac"))),
    ("audit: event, line, chain, write", lambda s: _any(s, lambda f: _in(f, "hsmkeys/audit.py") or _func(f, "_write_audit"))),
    ("usage record (GetKeyLastUsage)", lambda s: _any(s, lambda f: _in(f, "hsmkeys/usage.py"))),
    ("HSM C_GenerateRandom (python-pkcs11)", lambda s: _leaf_line_has(s, "generate_random(")),
    ("HSM C_*Init + C_* (python-pkcs11 call)", lambda s: _any(s, lambda f: _in(f, "site-packages/pkcs11/")) or _leaf_line_has(s, *_HSM_C)),
    ("ECDSA r||s -> DER", lambda s: _leaf_line_has(s, "encode_dss_signature")),
    ("Pkcs11Hsm plumbing (lock, session, handle cache, params)", lambda s: _any(s, lambda f: _in(f, "hsmkeys/hsm/"))),
    ("authorization (memo key / decide)", lambda s: _any(s, lambda f: _in(f, "hsmkeys/authz/") or _func(f, "_authorize", "_memo_key", "_base_conditions", "_compiled_policy", "_volatile"))),
    ("catalog.get_key (cached row)", lambda s: _any(s, lambda f: _in(f, "hsmkeys/catalog/"))),
    ("hash the message (SHA-256)", lambda s: _leaf_line_has(s, "hashlib")),
    ("argument validation", lambda s: _any(s, lambda f: _in(f, "hsmkeys/validation.py") or _func(f, "check_tokens", "require_symmetric_algorithm", "_signing_algorithm"))),
    ("key id -> record (_key/_lookup, state/usage checks)", lambda s: _any(s, lambda f: _func(f, "_key", "_lookup", "_require_enabled", "_require_usage", "refuse_management", "data_key_master", "signing_algorithms"))),
    ("GCM budget + IV pool", lambda s: _any(s, lambda f: _in(f, "hsmkeys/gcmlimit.py", "hsmkeys/ivs.py"))),
    ("blob header / AAD / context encoding", lambda s: _any(s, lambda f: _in(f, "hsmkeys/ciphertext.py"))),
    ("result dataclass + ARN + call.used", lambda s: _any(s, lambda f: _in(f, "hsmkeys/models.py", "hsmkeys/call.py") or _func(f, "_arn")) or s[-1][1] == "<string>"),
    ("invoke (Call, request id, try/finally)", lambda s: _any(s, lambda f: _func(f, "invoke", "next", "current_call", "principal")) and not _any(s, lambda f: _in(f, "hsmkeys/ops/") or _func(f, "_seal", "_open"))),
    ("op body (ops/*.py, _seal/_open)", lambda s: _any(s, lambda f: _in(f, "hsmkeys/ops/", "hsmkeys/keystore.py"))),
    ("descriptor / wrapper (operations.py)", lambda s: _any(s, lambda f: _in(f, "hsmkeys/operations.py"))),
]

HSM_STAGES = ("HSM C_GenerateRandom (python-pkcs11)", "HSM C_*Init + C_* (python-pkcs11 call)")
HSM_TIMED = "HSM call(s) via python-pkcs11 (timed alone, same object)"
# The raw side's own glue (GCMParams, AAD concat, int/bytes for DER) falls through to this.
RAW_GLUE = "raw: Python glue around the call"

LOOP_C = "rest: uvloop + httptools C, sockets, kernel (CPU - above)"

SERVER_STAGES: list[Rule] = [
    ("audit (one done line per Encrypt)", lambda s: _any(s, lambda f: _in(f, "hsmkeys/audit.py") or _func(f, "_write_audit"))),
    ("KeyStore: HSM C call (python-pkcs11)", lambda s: _any(s, lambda f: _in(f, "hsmkeys/keystore.py", "hsmkeys/ops/")) and (_any(s, lambda f: _in(f, "site-packages/pkcs11/")) or _leaf_line_has(s, *_HSM_C))),
    ("KeyStore: Python (authz, lookup, seal, usage)", lambda s: _any(s, lambda f: _in(f, "hsmkeys/keystore.py", "hsmkeys/ops/", "hsmkeys/hsm/", "hsmkeys/catalog/", "hsmkeys/authz/", "hsmkeys/usage.py"))),
    ("SigV4 verification", lambda s: _any(s, lambda f: _in(f, "hsmkeys/server/sigv4.py"))),
    ("response: result -> JSON (wire)", lambda s: _any(s, lambda f: _in(f, "hsmkeys/server/wire.py") and _func(f, "write", "encode_body", "__call__", "_write_blob", "_write_scalar", "_write_timestamp", "_has_lone_surrogate"))),
    ("request: JSON parse + model check (wire)", lambda s: _any(s, lambda f: _in(f, "hsmkeys/server/wire.py"))),
    ("metrics + access log", lambda s: _any(s, lambda f: _in(f, "hsmkeys/server/metrics.py", "hsmkeys/server/accesslog.py"))),
    ("response: ASGI send -> uvicorn/httptools", lambda s: _any(s, lambda f: _func(f, "_respond"))),
    ("app routing, headers, body read", lambda s: _any(s, lambda f: _in(f, "hsmkeys/server/app.py"))),
    ("uvicorn Python (protocol callbacks, ASGI cycle)", lambda s: True),
]


def _classify(
    stacks: list[tuple[list[Frame], int]], rules: list[Rule], root: Callable[[list[Frame]], bool], fallback: str
) -> collections.Counter[str]:
    """Samples per stage, for stacks inside the measured call (``root``)."""
    counts: collections.Counter[str] = collections.Counter()
    for stack, n in stacks:
        if not root(stack):
            continue
        for name, test in rules:
            if test(stack):
                counts[name] += n
                break
        else:
            counts[fallback] += n
    return counts


# ============================================================ library phase (child process)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    label: str
    keystore: Callable[[], object]
    raw: Callable[[], object]
    hsm_only: Callable[[], object]  # just the python-pkcs11 C call(s) the KeyStore makes, nothing else


def _sampled_loop(op: Callable[[], object], until: Callable[[], bool]) -> int:
    calls = 0
    while not until():
        for _ in range(64):
            op()
        calls += 64
    return calls


def _profile_op(op: Callable[[], object], seconds: float, out: Path) -> int:
    """Run ``op`` in a loop while py-spy samples this process; returns the calls made."""
    spy = subprocess.Popen(
        [_py_spy(), "record", "--pid", str(os.getpid()), "--nonblocking", "--idle", "--full-filenames",
         "--rate", str(SAMPLE_RATE), "--duration", str(max(1, round(seconds))), "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    calls = _sampled_loop(op, lambda: spy.poll() is not None)
    _, err = spy.communicate()
    if spy.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed (exit {spy.returncode}): {err.decode(errors='replace')[-500:]}")
    return calls


def _in_op(stack: list[Frame]) -> bool:
    """A sample inside the measured call, not in the loop around it."""
    for i, frame in enumerate(stack):
        if frame[1] == THIS_FILE and frame[0] == "_sampled_loop":
            return i + 1 < len(stack)
    return False


def phase_library(
    token: bench.BenchToken, keys: bench.BenchKeys, rounds: int, seconds: float, spy_seconds: float, keep: str | None
) -> dict[str, Any]:
    bench._enter_token(token)
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from pkcs11 import Mechanism, ObjectClass
    from pkcs11.mechanisms import GCMParams

    from hsmkeys.audit import AuditLog
    from hsmkeys.authz.model import Principal
    from hsmkeys.keystore import KeyStore
    from hsmkeys.operations import ENCRYPT

    store, hsm, catalog = bench._open_keystore_parts(token)
    audited = KeyStore(hsm=hsm, catalog=catalog)
    audit_dir = Path(tempfile.mkdtemp(prefix="hsmkeys-profile-audit-"))
    audited._audit = AuditLog(audit_dir / "audit.log", mac=audited.audit_mac, checkpoints=catalog)
    session = bench._raw_session(token)
    spy_dir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="hsmkeys-profile-spy-"))
    spy_dir.mkdir(parents=True, exist_ok=True)
    try:
        def raw_encrypt_for(key_id: str) -> Callable[[], bytes]:
            key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=bench._label(key_id))
            prefix = bench._header_prefix(key_id)

            def raw() -> bytes:
                iv = session.generate_random(96)
                aad: bytes = prefix + iv
                body: bytes = key.encrypt(bench.PLAINTEXT, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad, 128))
                return aad + body

            return raw

        key_id = keys.aes[0]
        aes_key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=bench._label(key_id))
        prefix = bench._header_prefix(key_id)
        raw_encrypt = raw_encrypt_for(key_id)

        def raw_data_key() -> bytes:
            data = session.generate_random(256)
            iv = session.generate_random(96)
            aad: bytes = prefix + iv
            body: bytes = aes_key.encrypt(data, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad, 128))
            return aad + body

        blob = raw_encrypt()
        gcm = GCMParams(bytes(12), prefix + bytes(12), 128)

        def hsm_encrypt() -> object:
            return aes_key.encrypt(bench.PLAINTEXT, mechanism=Mechanism.AES_GCM, mechanism_param=gcm)

        def hsm_data_key() -> object:
            return aes_key.encrypt(session.generate_random(256), mechanism=Mechanism.AES_GCM, mechanism_param=gcm)

        blob_gcm = GCMParams(blob[21:33], blob[:33], 128)

        def hsm_decrypt() -> object:
            return aes_key.decrypt(blob[33:], mechanism=Mechanism.AES_GCM, mechanism_param=blob_gcm)

        digest = hashlib.sha256(bench.SIGN_MESSAGE).digest()

        def raw_decrypt() -> bytes:
            if blob[0] != 1 or len(blob) < 49:
                raise ValueError("bad blob")
            body: bytes = aes_key.decrypt(blob[33:], mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(blob[21:33], blob[:33], 128))
            return body

        ec_key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=bench._label(keys.p256))

        def hsm_sign() -> object:
            return ec_key.sign(digest, mechanism=Mechanism.ECDSA)

        def raw_sign_ec() -> bytes:
            raw = ec_key.sign(hashlib.sha256(bench.SIGN_MESSAGE).digest(), mechanism=Mechanism.ECDSA)
            half = len(raw) // 2
            return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

        app = f"arn:aws:iam::{store.account_id}:role/app"
        policy_arn = store.create_key(policy=bench._twenty_statement_policy(store.account_id, app)).key_metadata.arn
        policy_args = {"key_id": policy_arn, "plaintext": bench.PLAINTEXT, "encryption_context": {"tenant": "acme", "purpose": "billing-eu"}}
        caller = Principal(app)
        store.invoke(ENCRYPT, policy_args, principal=caller)  # allowed, or nothing here means anything
        raw_policy_encrypt = raw_encrypt_for(policy_arn.rsplit("/", 1)[-1])
        assert store.decrypt(ciphertext_blob=blob).plaintext == bench.PLAINTEXT

        scenarios = [
            Scenario("encrypt", "KeyStore.encrypt 32 B (trusted caller)",
                     lambda: store.encrypt(key_id=key_id, plaintext=bench.PLAINTEXT), raw_encrypt, hsm_encrypt),
            Scenario("encrypt_policy", "KeyStore.encrypt, 20-statement policy + context",
                     lambda: store.invoke(ENCRYPT, policy_args, principal=caller), raw_policy_encrypt, hsm_encrypt),
            Scenario("encrypt_audited", "KeyStore.encrypt, audit log on",
                     lambda: audited.encrypt(key_id=key_id, plaintext=bench.PLAINTEXT), raw_encrypt, hsm_encrypt),
            Scenario("datakey", "generate_data_key AES_256",
                     lambda: store.generate_data_key(key_id=key_id, key_spec="AES_256"), raw_data_key, hsm_data_key),
            Scenario("decrypt", "decrypt 32 B",
                     lambda: store.decrypt(ciphertext_blob=blob), raw_decrypt, hsm_decrypt),
            Scenario("sign_p256", "sign ECC_NIST_P256 ECDSA_SHA_256 RAW",
                     lambda: store.sign(key_id=keys.p256, message=bench.SIGN_MESSAGE,
                                        signing_algorithm="ECDSA_SHA_256", message_type="RAW"),
                     raw_sign_ec, hsm_sign),
        ]  # fmt: skip
        results: dict[str, Any] = {}
        for sc in scenarios:
            log(f"library: {sc.name}: timing ({rounds} interleaved rounds)")
            cmp = bench._compare(sc.keystore, sc.raw, rounds, seconds)
            # The bare python-pkcs11 call(s) on the same object, timed (not sampled: py-spy
            # --nonblocking loses many samples inside the C call, so its share is not trusted).
            floor = bench._compare(sc.hsm_only, sc.hsm_only, max(3, rounds // 2), seconds / 2)
            log(f"library: {sc.name}: sampling with py-spy ({spy_seconds:.0f} s per side)")
            ks_file, raw_file = spy_dir / f"{sc.name}.ks.raw", spy_dir / f"{sc.name}.raw.raw"
            _profile_op(sc.keystore, spy_seconds, ks_file)
            _profile_op(sc.raw, spy_seconds, raw_file)
            ks_counts = _classify(_parse_raw(ks_file), LIBRARY_STAGES, _in_op, "other")
            raw_counts = _classify(_parse_raw(raw_file), LIBRARY_STAGES, _in_op, RAW_GLUE)
            results[sc.name] = {
                "label": sc.label,
                "us": cmp.us,
                "raw_us": cmp.raw_us,
                "ratio": cmp.ratio,
                "ratio_spread": cmp.ratio_spread,
                "rounds": cmp.rounds,
                "samples": sum(ks_counts.values()),
                "raw_samples": sum(raw_counts.values()),
                "hsm_only_us": floor.us,
                "stages": dict(ks_counts.most_common()),
                "raw_stages": dict(raw_counts.most_common()),
            }
        return results
    finally:
        session.close()
        if audited._audit is not None:
            audited._audit.close()
        store.close()
        shutil.rmtree(audit_dir, ignore_errors=True)
        if not keep:
            shutil.rmtree(spy_dir, ignore_errors=True)


# ============================================================ server phase


def _main_thread(stack: list[Frame]) -> bool:
    """The event loop's thread (every tick of py-spy --idle samples it once)."""
    return _any(stack, lambda f: _func(f, "run") and _in(f, "asyncio/runners.py"))


def _loop_c(stack: list[Frame]) -> bool:
    """The loop's own C code is the leaf (uvloop: waiting in epoll, or transport/parse work)."""
    return _func(stack[-1], "run") and _in(stack[-1], "asyncio/runners.py")


_IDLE_LEAVES = ("wait", "_worker", "get", "sleep", "select", "_wait_for_tstate_lock")


def _server_busy(stack: list[Frame]) -> bool:
    """A Python frame doing work (not the loop's C leaf, not an idle helper thread)."""
    if _main_thread(stack):
        return not _loop_c(stack)
    leaf = stack[-1]
    return not (_func(leaf, *_IDLE_LEAVES) and _in(leaf, "threading.py", "concurrent/futures", "queue.py"))


def phase_server(args: argparse.Namespace, token: bench.BenchToken) -> dict[str, Any]:
    access_key = "AKIA" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
    secret_key = secrets.token_urlsafe(30)
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    cli = str(Path(sys.executable).parent / "hsmkeys")
    server = bench.ServerProcess(
        "hsmkeys-w1", [cli, "serve", "--ephemeral", "--host", "127.0.0.1", "--port", "0", "--workers", "1"]
        + (["--no-audit"] if args.no_audit else []),
        env,
    )
    spy_dir = Path(args.keep_samples) if args.keep_samples else Path(tempfile.mkdtemp(prefix="hsmkeys-profile-server-"))
    spy_dir.mkdir(parents=True, exist_ok=True)
    cpu_plain: list[float] = []
    cpu_spied: list[float] = []
    rps_plain: list[float] = []
    raw_us: list[float] = []
    spied_runs: list[dict[str, float]] = []
    samples = 0
    try:
        log("server: starting hsmkeys serve --ephemeral --workers 1")
        url = server.start()
        key_id = bench._create_key_with_boto3(url, access_key, secret_key)
        assert server.pid is not None

        def load() -> loadgen.LoadResult:
            spec = loadgen.LoadSpec(
                endpoint=url, access_key_id=access_key, secret_access_key=secret_key, region=bench.REGION,
                target="Encrypt", payload=loadgen.encrypt_payload(key_id, bench.PLAINTEXT), clients=args.clients,
                requests_per_client=max(1, args.requests // args.clients), warmup_per_client=50, max_seconds=60,
            )  # fmt: skip
            result = loadgen.run_load(spec)
            if result.errors:
                raise RuntimeError(f"{result.errors} failed requests; first: {result.first_error}")
            return result

        for round_no in range(args.server_rounds):
            raw_us.append(bench._in_fresh_process(bench.phase_raw_encrypt, token, 20_000, timeout=300))
            for spied in ((False, True) if round_no % 2 == 0 else (True, False)):
                spy: subprocess.Popen[bytes] | None = None
                out = spy_dir / f"server.round{round_no}.raw"
                if spied:
                    spy = subprocess.Popen(
                        [_py_spy(), "record", "--pid", str(server.pid), "--subprocesses", "--nonblocking", "--idle",
                         "--full-filenames", "--rate", str(SAMPLE_RATE), "--format", "raw", "--output", str(out)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                    spy_started = time.perf_counter()
                    time.sleep(1.0)  # attached before the window starts
                before = bench._worker_counters(url, 1)
                result = load()
                after = bench._worker_counters(url, 1)
                cpu = bench._cpu_per_request_us(before, after)
                if spy is not None:
                    recorded = time.perf_counter() - spy_started
                    spy.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
                    spy.wait(60)
                    answered = sum(after[w][1] - before[w][1] for w in after)
                    stacks = _parse_raw(out)
                    # py-spy's ticks, from the main thread's samples over the recording (its
                    # whole length: from the attach to SIGINT, about window + 1 s + stop).
                    ticks = sum(n for st, n in stacks if _main_thread(st))
                    busy = [(st, n) for st, n in stacks if _server_busy(st)]
                    counts = _classify(busy, SERVER_STAGES, lambda st: True, "other")
                    tick_us = recorded / max(ticks, 1) * 1e6
                    stage_us = {k: n * tick_us / max(answered, 1) for k, n in counts.items()}
                    stage_us[LOOP_C] = cpu - sum(stage_us.values())
                    spied_runs.append(stage_us)
                    cpu_spied.append(cpu)
                    samples += sum(counts.values())
                else:
                    cpu_plain.append(cpu)
                    rps_plain.append(result.req_per_s)
                log(
                    f"server round {round_no + 1}/{args.server_rounds} {'py-spy' if spied else 'plain'}: "
                    f"{result.req_per_s:,.0f} req/s, worker CPU {cpu:.0f} µs/request; raw encrypt {raw_us[-1]:.1f} µs"
                )
    finally:
        log(f"server: stopped (exit {server.stop()})")
        if not args.keep_samples:
            shutil.rmtree(spy_dir, ignore_errors=True)
    return {
        "cpu_us_per_request": statistics.median(cpu_plain),
        "runs_cpu_us_per_request": cpu_plain,
        "runs_cpu_us_per_request_with_py_spy": cpu_spied,
        "req_per_s": statistics.median(rps_plain),
        "runs_req_per_s": rps_plain,
        "raw_encrypt_us": statistics.median(raw_us),
        "runs_raw_encrypt_us": raw_us,
        "samples": samples,
        # µs of worker CPU per request, medians over the py-spy runs
        "stages_us": dict(sorted(
            ((k, statistics.median(r.get(k, 0.0) for r in spied_runs)) for k in {k for r in spied_runs for k in r}),
            key=lambda kv: -kv[1],
        )),
    }


# ============================================================ report


def _stage_rows(stages: dict[str, int], per_call_us: float) -> list[tuple[str, float, float]]:
    n = sum(stages.values()) or 1
    return [(name, count / n * per_call_us, count / n) for name, count in stages.items()]


def render(report: dict[str, Any]) -> str:
    lines: list[str] = []
    for name, r in report.get("library", {}).items():
        lo, hi = r["ratio_spread"]
        lines.append("")
        lines.append(
            f"== {name}: {r['label']}: KeyStore {r['us']:.1f} µs/call, raw python-pkcs11 {r['raw_us']:.1f} µs/call, "
            f"ratio {r['ratio']:.2f} (rounds {lo:.2f}-{hi:.2f}, n={r['rounds']}); py-spy samples {r['samples']} / {r['raw_samples']}"
        )
        lines.append(f"   {'stage':<58}{'µs/call':>9}{'share':>8}   {'raw µs':>8}{'share':>8}")
        raw_rows = {s: (us, sh) for s, us, sh in _stage_rows(r["raw_stages"], r["raw_us"])}
        seen: set[str] = set()
        python = {k: n for k, n in r["stages"].items() if k not in HSM_STAGES}
        rows = [(HSM_TIMED, r["hsm_only_us"], r["hsm_only_us"] / r["us"])]
        rows += [(k, us, us / r["us"]) for k, us, _ in _stage_rows(python, r["us"] - r["hsm_only_us"])]
        lines.append(f"   (HSM call timed alone on the same object: {r['hsm_only_us']:.1f} µs; the rest split by py-spy shares of "
                     f"{sum(python.values())} samples outside it)")
        for stage, us, share in rows:
            seen.add(stage)
            raw = raw_rows.get(stage)
            raw_text = f"{raw[0]:>8.1f}{raw[1]:>8.0%}" if raw else f"{'':>8}{'':>8}"
            lines.append(f"   {stage:<58}{us:>9.1f}{share:>8.0%}   {raw_text}")
        for stage, (us, share) in raw_rows.items():
            if stage not in seen:
                lines.append(f"   {stage:<58}{'':>9}{'':>8}   {us:>8.1f}{share:>8.0%}")
    server = report.get("server")
    if server:
        runs = ", ".join(f"{x:.0f}" for x in server["runs_cpu_us_per_request"])
        spied = ", ".join(f"{x:.0f}" for x in server["runs_cpu_us_per_request_with_py_spy"])
        lines.append("")
        lines.append(
            f"== server, 1 worker, Encrypt 32 B: worker CPU {server['cpu_us_per_request']:.0f} µs/request "
            f"(unprofiled runs {runs}; with py-spy attached {spied}); {server['req_per_s']:,.0f} req/s; "
            f"raw encrypt {server['raw_encrypt_us']:.1f} µs -> ratio {server['cpu_us_per_request'] / server['raw_encrypt_us']:.1f}; "
            f"py-spy samples {server['samples']}"
        )
        lines.append(f"   {'stage (medians over the py-spy runs)':<62}{'µs/req':>9}{'share':>8}")
        total = sum(server["stages_us"].values()) or 1.0
        for stage, us in server["stages_us"].items():
            lines.append(f"   {stage:<62}{us:>9.1f}{us / total:>8.0%}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per library scenario")
    p.add_argument("--round-seconds", type=float, default=0.4, help="target length of one round per side")
    p.add_argument("--spy-seconds", type=float, default=4.0, help="py-spy sampling per library side")
    p.add_argument("--no-library", action="store_true", help="skip the library scenarios")
    p.add_argument("--server", action="store_true", help="also profile hsmkeys serve --workers 1 under load")
    p.add_argument("--server-rounds", type=int, default=3, help="rounds (one plain + one py-spy run each)")
    p.add_argument("--no-audit", action="store_true", help="serve with --no-audit (to compare the audit's cost)")
    p.add_argument("--clients", type=int, default=6, help="load generator processes")
    p.add_argument("--requests", type=int, default=12_000, help="requests per load run")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--keep-samples", metavar="DIR", help="keep the py-spy raw stacks (flamegraph input) in DIR")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _py_spy()
    os.environ.pop("SOFTHSM2_CONF", None)  # never the system token: the token below is ours
    tmp = Path(tempfile.mkdtemp(prefix="hsmkeys-profile-"))
    report: dict[str, Any] = {"cpus": os.cpu_count()}
    try:
        token = bench._make_token(tmp / "main", "hsmkeys-profile")
        if not args.no_library:
            keys, _ = bench._in_fresh_process(bench.phase_setup, token, timeout=300)
            report["library"] = bench._in_fresh_process(
                phase_library, token, keys, args.rounds, args.round_seconds, args.spy_seconds, args.keep_samples, timeout=1800
            )
        if args.server:
            report["server"] = phase_server(args, token)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(render(report))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
