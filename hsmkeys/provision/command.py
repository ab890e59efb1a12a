"""``plan`` and ``apply``, shared by ``scripts/provision.py`` and ``hsmkeys provision``.

    provision.py plan|apply KEYS.yaml [--config F | --endpoint URL [--region R]] [--json] [--yes]

Exit status (as ``terraform plan -detailed-exitcode``): 0 nothing to change (or apply
done), 2 plan has changes pending, 1 error. Errors are ``error: ...`` lines on stderr
naming file:line, entry and field; progress goes to stderr, the plan to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, NoReturn

from hsmkeys.errors import ConfigError, KMSError
from hsmkeys.kmsclient import Boto3Kms, KmsApi, LocalKms
from hsmkeys.provision.apply import apply_plan
from hsmkeys.provision.plan import Change, Plan, build_plan
from hsmkeys.provision.schema import DesiredFile, ProvisionError, load_file, one_line
from hsmkeys.provision.state import read_state

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_PENDING", "add_arguments", "main", "run"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_PENDING = 2

#: Opens the KeyStore for ``--config`` (the hsmkeys CLI passes its own, tests an in-memory one).
StoreOpener = Callable[[], AbstractContextManager[Any]]


def add_arguments(parser: argparse.ArgumentParser, action: str) -> None:
    """The arguments of ``plan`` or ``apply`` (``--config`` and ``--json`` come from the caller)."""
    parser.add_argument("file", metavar="KEYS.yaml", help="the provisioning file")
    parser.add_argument("--endpoint", metavar="URL", help="a KMS endpoint (boto3's credential chain)")
    parser.add_argument("--region", metavar="R", help="region for --endpoint (default: from the environment)")
    if action == "apply":
        parser.add_argument("--yes", action="store_true", help="apply without asking")
    parser.set_defaults(provision_action=action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # exit 1, not argparse's 2 (= changes pending)
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="provision.py",
        description="Create and update hsmkeys keys from a YAML file (plan, then apply).",
        epilog="Exit status: 0 no changes (or applied), 2 changes pending, 1 error.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="plan|apply", parser_class=_Parser)
    for action, text in (("plan", "show what apply would change"), ("apply", "make the planned changes")):
        sub = actions.add_parser(action, help=text, description=text)
        add_arguments(sub, action)
        sub.add_argument("--config", metavar="F", help="hsmkeys config: use the KeyStore in process")
        sub.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def main(argv: Sequence[str] | None = None, *, open_store: StoreOpener | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    return run(args, open_store=open_store)


# ==================================================================== running


def _progress(message: str) -> None:
    print(f"provision: {message}", file=sys.stderr, flush=True)


def _error(message: str) -> None:
    sys.stdout.flush()
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)


@contextmanager
def _connect(args: argparse.Namespace, open_store: StoreOpener | None) -> Iterator[KmsApi]:
    endpoint: str | None = getattr(args, "endpoint", None)
    config: str | None = getattr(args, "config", None)
    if endpoint is not None:
        if config is not None:
            raise ProvisionError("give --config or --endpoint, not both")
        yield Boto3Kms.connect(endpoint_url=endpoint, region=args.region)
        return
    if args.region is not None:
        raise ProvisionError("--region goes with --endpoint")
    from hsmkeys.context import CallContext, call_context

    if open_store is None:
        from hsmkeys.keystore import KeyStore

        def open_store() -> AbstractContextManager[Any]:
            return KeyStore.open(config)

    # In process, the caller holds the PIN: trusted, audited with source "provision".
    with open_store() as store, call_context(CallContext(source="provision")):
        yield LocalKms(store)


def run(args: argparse.Namespace, *, open_store: StoreOpener | None = None) -> int:
    """Run ``args.provision_action`` (plan or apply); return the exit status."""
    try:
        desired = load_file(args.file)  # the whole file is valid before anything is read or changed
        with _connect(args, open_store) as api:
            _progress(f"{desired.path}: {len(desired.entries)} key entr{'y' if len(desired.entries) == 1 else 'ies'}")
            plan = build_plan(desired, read_state(api, desired, _progress))
            if args.provision_action == "plan":
                return _show_plan(plan, as_json=bool(args.json))
            return _apply(api, desired, plan, args)
    except ProvisionError as exc:
        for problem in exc.problems:
            _error(problem)
    except KMSError as exc:
        _error(f"{exc.code}: {' '.join(exc.message.split())}" if exc.message else exc.code)
    except ConfigError as exc:
        _error(f"ConfigError: {' '.join(str(exc).split())}")
    return EXIT_ERROR


def _show_plan(plan: Plan, *, as_json: bool) -> int:
    if as_json:
        print(json.dumps(plan.to_json(), indent=2, ensure_ascii=False))
    else:
        for change in plan.changes:
            print(change.line)
        print(f"Plan: {plan.summary()}." if plan.pending else "no changes")
    return EXIT_PENDING if plan.pending else EXIT_OK


def _confirm(plan: Plan, args: argparse.Namespace) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise ProvisionError("stdin is not a terminal, so apply cannot ask: review the plan and pass --yes")
    sys.stderr.write(f"Apply these {len(plan.changes)} change(s)? [y/N] ")
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise ProvisionError("apply cancelled; nothing was changed")


def _apply(api: KmsApi, desired: DesiredFile, plan: Plan, args: argparse.Namespace) -> int:
    as_json = bool(args.json)
    if not plan.pending:
        print(json.dumps({"applied": [], "counts": plan.counts()}) if as_json else "no changes")
        return EXIT_OK
    if not as_json:
        for change in plan.changes:
            print(change.line)
        print(f"Plan: {plan.summary()}.", flush=True)
    _confirm(plan, args)
    applied: list[Change] = []
    apply_plan(api, plan, progress=_progress, done=applied.append)
    if as_json:
        print(json.dumps({"applied": [c.to_json() for c in applied], "counts": plan.counts()}, indent=2))
    else:
        n = plan.counts()
        print(f"Applied: {n['create']} created, {n['update']} updated, {n['delete']} deleted.")
    _progress(f"{desired.path}: applied {len(applied)} change(s)")
    return EXIT_OK
