"""The ``dealmail`` command line: serve, check-config, set-password, import, listings, and the
admin's operations tools (status, quarantine).

Every subcommand takes ``--config PATH`` and any number of ``--set section.key=value``
overrides. Errors are one clear message on stderr and a non-zero exit; nothing is written when
the config or an input file is invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mta.routing import KINDS

from .config import Config, ConfigError, check_files, find_config_path, load_config
from .logs import setup_logging

log = logging.getLogger("dealmail")

EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h
EXIT_DATA = 65  # EX_DATAERR
EXIT_NOTFOUND = 67  # EX_NOUSER
EXIT_OSERR = 71  # EX_OSERR: a listener cannot bind
# EX_UNAVAILABLE: `dealmail status` finds no running server; `dealmail imap test`
# cannot reach or log in to a mailbox.
EXIT_UNAVAILABLE = 69


def _version() -> str:
    """The installed package's version (its metadata), or the source tree's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dealmail")
    except PackageNotFoundError:
        return "0+source"


def _common(level: int) -> argparse.ArgumentParser:
    """The options every (sub)command takes, for the parser ``level`` deep.

    argparse copies every attribute a subparser sets over what the parent parser already
    parsed, defaults included, so ``dealmail --config X check-config`` would lose ``X``. Below
    the top level the defaults are therefore suppressed, and ``--set`` collects into its own
    ``set_<level>`` list that :func:`_overrides` joins in command-line order."""
    common = argparse.ArgumentParser(add_help=False)
    default: Any = argparse.SUPPRESS if level else None
    common.add_argument("--config", default=default,
                        help="config file (default: $DEALMAIL_CONFIG, else "
                        "conf/dealmail.toml, else the example)")
    common.add_argument("--set", action="append", dest=f"set_{level}" if level else "set",
                        default=argparse.SUPPRESS if level else [],
                        metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        default=default, help="log level (default: server.log_level)")
    common.add_argument("--log-format", choices=["text", "json"], default=default,
                        help="log lines as text or one JSON object per line "
                        "(default: server.log_format)")
    return common


def _overrides(args: argparse.Namespace) -> list[str]:
    """Every ``--set`` of the command line, wherever it was given (later ones win)."""
    return [*args.set, *getattr(args, "set_1", []), *getattr(args, "set_2", [])]


def _parser() -> argparse.ArgumentParser:
    common = _common(1)
    p = argparse.ArgumentParser(prog="dealmail", parents=[_common(0)],
                                description="Email-native mail server for sales teams.")
    p.add_argument("--version", action="version", version=f"dealmail {_version()}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common], help="run the server until SIGTERM")
    sub.add_parser("check-config", parents=[common],
                   help="validate the config and print the effective configuration")
    sp = sub.add_parser("set-password", parents=[common],
                        help="set a user's relay password (reads it from stdin if not a tty)")
    sp.add_argument("address", help="the user's primary address")
    ip = sub.add_parser("import", parents=[common], help="import a CRM export (CSV)")
    ip.add_argument("kind", choices=["organizations", "persons", "deals"],
                    help="what the file holds")
    ip.add_argument("file", type=Path, help="the CSV file (UTF-8 with or without BOM, Shift_JIS)")
    ip.add_argument("--company", required=True, metavar="SLUG", help="the company to import into")
    ip.add_argument("--encoding", help="force the file's encoding (default: detected)")
    ip.add_argument("--quiet", action="store_true",
                    help="no progress bar (it is shown only on a terminal anyway)")
    for name in ("persons", "deals"):
        lp = sub.add_parser(name, parents=[common], help=f"{name} commands")
        lsub = lp.add_subparsers(dest="action", required=True)
        ll = lsub.add_parser("list", parents=[_common(2)], help=f"list {name}")
        ll.add_argument("--company", metavar="SLUG",
                        help="the company (default: the first in the config)")
        ll.add_argument("--json", action="store_true", help="print JSON")
    rp = sub.add_parser("relink", parents=[common],
                        help="link stored mail to persons the CRM learned about since")
    rp.add_argument("--company", metavar="SLUG",
                    help="only this company (default: every company)")
    rp.add_argument("--quiet", action="store_true",
                    help="no progress bar (it is shown only on a terminal anyway)")
    op = sub.add_parser("outbox", parents=[common],
                        help="list what dealmail sends (questions, digests, relayed mail, DSNs)")
    op.add_argument("action", nargs="?", choices=["list", "retry", "drop"], default="list",
                    help="list (default), retry ID (make it due now) or drop ID (give it up)")
    op.add_argument("id", nargs="?", type=int, help="the outbox item (retry, drop)")
    op.add_argument("--json", action="store_true", help="print JSON")
    xp = sub.add_parser("inspect", parents=[common],
                        help="show how dealmail reads a message, storing nothing")
    xp.add_argument("file", type=Path, help="the message (.eml, raw RFC 5322 bytes)")
    xp.add_argument("--company", metavar="SLUG",
                    help="also show the persons and deals that would be linked")
    xp.add_argument("--json", action="store_true", help="print JSON")
    cp = sub.add_parser("conversations", parents=[common],
                        help="threads and emails of a person or deal, as a user may see them")
    cp.add_argument("--as", dest="as_user", required=True, metavar="USER_ADDRESS",
                    help="show what this user may see")
    target = cp.add_mutually_exclusive_group(required=True)
    target.add_argument("--person", metavar="ADDRESS", help="a person, by one of its addresses")
    target.add_argument("--deal", type=int, metavar="ID", help="a deal, by its id")
    cp.add_argument("--json", action="store_true", help="print JSON")
    authp = sub.add_parser("auth", parents=[common],
                           help="failed logins of the submission listeners: list or clear")
    authp.add_argument("action", choices=["status", "unlock"],
                       help="status: counters and locks; unlock: clear them")
    authp.add_argument("target", nargs="?", metavar="ADDRESS|IP",
                       help="unlock: an account (every address it failed from) or a client "
                       "address (every account that failed from it)")
    authp.add_argument("--json", action="store_true", help="print JSON")
    ep = sub.add_parser("emails", parents=[common],
                        help="a user's own tracked emails: list, show, sharing, deal, "
                        "persons, forget, ignore")
    esub = ep.add_subparsers(dest="action", required=True)
    actions: tuple[tuple[str, str, tuple[str, ...]], ...] = (
            ("list", "the user's latest own emails with their handles", ()),
            ("show", "one email the user may see", ("handle",)),
            ("private", "make the user's copy private", ("handles",)),
            ("share", "share the user's copy with colleagues", ("handles",)),
            ("deal", "put the email's thread on a deal (number or title)", ("handle", "deal")),
            ("unlink", "put the email's thread on no deal", ("handles",)),
            ("person", "link a person (address or name) to the email", ("handle", "person")),
            ("forget", "remove the user's copy (the email too when nobody else has it)",
             ("handles",)),
            ("ignore", "never track this address or @domain for the user", ("pattern",)),
            ("track", "undo ignore", ("pattern",)),
            ("ignored", "the addresses and domains the user does not track", ()))
    for action, helptext, extra in actions:
        ap = esub.add_parser(action, parents=[_common(2)], help=helptext)
        ap.add_argument("--as", dest="as_user", required=True, metavar="USER_ADDRESS",
                        help="act as this user, on their own copies only")
        ap.add_argument("--json", action="store_true", help="print JSON")
        if "handle" in extra:
            ap.add_argument("handle", metavar="E123", help="the email's handle")
        if "handles" in extra:
            ap.add_argument("handles", nargs="+", metavar="E123", help="the emails' handles")
        if action in ("deal", "person"):
            ap.add_argument("target", nargs="+", metavar=action.upper(),
                            help="the deal's number or title" if action == "deal"
                            else "the person's address or name")
        if "pattern" in extra:
            ap.add_argument("pattern", metavar="ADDRESS_OR_@DOMAIN",
                            help="a correspondent's address, or @ and a domain")
        if action in ("private", "share"):
            ap.add_argument("--thread", action="store_true",
                            help="every copy of the user's in the thread, and later ones")
        if action == "list":
            ap.add_argument("--limit", type=int, default=50, help="at most this many")
    mp = sub.add_parser("imap", parents=[common],
                        help="mailbox sync: try a user's mailboxes, show the sync state")
    msub = mp.add_subparsers(dest="action", required=True)
    mt = msub.add_parser("test", parents=[_common(2)],
                         help="connect and log in to ADDRESS's mailboxes, list their folders "
                         "and which ones are synced (nothing is read or changed)")
    mt.add_argument("address", help="a user's address, or a mailbox's login")
    ms = msub.add_parser("status", parents=[_common(2)],
                         help="per mailbox: state, last sync, checkpoints, errors")
    ms.add_argument("--json", action="store_true", help="print JSON")
    dp = sub.add_parser("digest", parents=[common],
                        help="compose a user's digest now (since their last one) and queue it")
    dp.add_argument("--user", required=True, metavar="ADDRESS", help="the user's address")
    dp.add_argument("--dry-run", action="store_true",
                    help="print the composed message instead of queueing it")
    pp = sub.add_parser("postfix-config", parents=[common],
                        help="print (or write) the company Postfix's settings and maps that "
                        "deliver to dealmail over LMTP")
    pp.add_argument("--write", type=Path, metavar="DIR",
                    help="write the snippets and maps into DIR (atomically, old files kept "
                    "as .bak) instead of printing them")
    pp.add_argument("--postmap", action="store_true",
                    help="with --write: run postmap on the hash tables")
    pp.add_argument("--postfix-dir", type=Path, metavar="DIR",
                    help="Postfix's configuration folder, for postmap -c (default: "
                    "Postfix's own)")
    stp = sub.add_parser("status", parents=[common],
                         help="the running server (listeners, workers, last error) and the "
                         "database (outbox by state, oldest deferred item, quarantine)")
    stp.add_argument("--json", action="store_true", help="print JSON")
    qp = sub.add_parser("quarantine", parents=[common],
                        help="copies held because their sender could not be verified")
    qsub = qp.add_subparsers(dest="action", required=True)
    ql = qsub.add_parser("list", parents=[_common(2)],
                         help="list them: claimed sender, client, evidence, subject, size, "
                         "date (never the body)")
    ql.add_argument("--company", metavar="SLUG", help="only this company")
    ql.add_argument("--json", action="store_true", help="print JSON")
    for action, text in (("release", "make it the claimed user's normal copy, linked as usual"),
                         ("drop", "delete it (and the email, when nobody else has a copy)")):
        qa = qsub.add_parser(action, parents=[_common(2)], help=text)
        qa.add_argument("id", type=int, metavar="ID", help="the email id (quarantine list)")
    return p


def _load(args: argparse.Namespace) -> tuple[Config, bool]:
    path, fallback = find_config_path(args.config)
    config = load_config(path, args.set)
    return config, fallback


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `dealmail conversations ... | head`: the reader left. Say nothing (as cat and grep
        # do), and point stdout at /dev/null so the interpreter's final flush cannot fail
        # again (the Python documentation's recipe for SIGPIPE, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a killed pipe writer


def _main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.set = _overrides(args)
    try:
        config, fallback = _load(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"dealmail: {len(exc.problems)} problem(s) in the configuration; "
              "nothing started", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(args.log_level or config.server.log_level, config.server.log_file,
                  args.log_format or config.server.log_format)
    command = args.command
    if command == "serve":
        return serve(config, fallback, tuple(args.set))
    if command == "check-config":
        from mta.imapsync.presets import check_mailboxes, describe_mailboxes

        lines = config.describe([(k.form, k.purpose) for k in KINDS]).splitlines()
        if fallback:
            lines[0] += " (the example: conf/dealmail.toml not found)"
        problems = check_files(config, Path.cwd())
        for problem in problems:
            print(problem, file=sys.stderr)
        print("\n".join(lines + describe_mailboxes(config)))
        mailbox_problems = check_mailboxes(config)
        for problem in mailbox_problems:
            print(problem, file=sys.stderr)
        if mailbox_problems:
            print(f"dealmail: {len(mailbox_problems)} problem(s) with mailboxes",
                  file=sys.stderr)
        return EXIT_CONFIG if problems or mailbox_problems else 0
    if command == "imap" and args.action == "test":
        return _imap_test(config, args.address)
    if command == "set-password":
        return _set_password(config, args.address)
    if command == "inspect":
        return _inspect(config, args)
    if command == "auth":
        return _auth(config, args)
    if command == "postfix-config":
        return _postfix_config(config, args)
    try:
        return _store_command(config, args)
    except _CliError as exc:
        print(f"dealmail: {exc}", file=sys.stderr)
        return exc.code


class _CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def serve(config: Config, fallback: bool, overrides: tuple[str, ...]) -> int:
    """Run the server. A start-up failure (a file the config names cannot be read, a listener
    cannot bind, the database refuses) is one clear log line and a non-zero exit."""
    if fallback:
        log.warning("conf/dealmail.toml not found: using the example config %s "
                    "(copy it to conf/dealmail.toml to make it yours)", config.path)
    else:
        log.info("using config %s", config.path)
    problems = check_files(config, Path.cwd())
    if problems:
        for problem in problems:
            log.error("cannot start: %s", problem)
        return EXIT_CONFIG
    if config.listeners.workers > 1 and config.listeners.metrics:
        # prometheus_client picks its multi-process mode when it is first imported (below,
        # through dealmail.app): the workers' counters go to files the parent sums.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(Path.cwd() / "var" / "metrics")
    from crmstore.db import StoreError

    from .app import App, StartupError

    try:
        if config.listeners.workers > 1:
            from .prefork import serve_prefork

            return serve_prefork(config, overrides, Path.cwd(), load_demo_if_empty)
        app = App(config, overrides=overrides)
        app.open_store()
        load_demo_if_empty(app)
        asyncio.run(app.serve_forever())
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_OSERR
    except StoreError as exc:
        log.error("cannot start: database: %s", exc)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        pass
    return 0


def load_demo_if_empty(app: Any) -> None:
    """First start with ``server.demo_data`` set: load its CSVs into the empty database."""
    from crmstore import models as m
    from crmstore.importing import import_csv

    config = app.config
    if not config.server.demo_data or not config.companies:
        return
    folder = Path(config.server.demo_data)
    if not folder.is_absolute():
        folder = app.base / folder
    if m.Person.select().exists() or not folder.is_dir():
        return
    slug = config.companies[0].slug
    for kind in ("organizations", "persons", "deals"):
        path = folder / f"{kind}.csv"
        if path.exists():
            report = import_csv(app.store, slug, kind, path,
                                freemail_domains=config.policy.freemail_domains,
                                internal_domains=config.companies[0].internal_domains)
            log.info("demo data: imported %s rows of %s into company %s", report.rows, kind,
                     slug)


def _set_password(config: Config, address: str) -> int:
    from .passwords import hash_password, set_password_in_file

    found = config.find_user(address.strip().lower())
    if found is None:
        print(f"dealmail: unknown user {address!r}", file=sys.stderr)
        return EXIT_NOTFOUND
    if sys.stdin.isatty():
        password = getpass.getpass(f"New relay password for {address}: ")
        if getpass.getpass("Again: ") != password:
            print("dealmail: the passwords differ; nothing changed", file=sys.stderr)
            return EXIT_USAGE
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 10:
        print("dealmail: a relay password needs at least 10 characters", file=sys.stderr)
        return EXIT_USAGE
    set_password_in_file(config.path, found[1].address, hash_password(password))
    print(f"password set for {found[1].address} in {config.path}")
    return 0


def _postfix_config(config: Config, args: argparse.Namespace) -> int:
    from mta.postfix import DEFAULT_DIR, generate, write_files

    folder = args.write.resolve() if args.write else DEFAULT_DIR
    try:
        generated = generate(config, folder)
    except ValueError as exc:
        print(f"dealmail: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.write is None:
        print(generated.render())
        return 0
    try:
        written = write_files(generated, folder, postmap=args.postmap,
                              postfix_dir=args.postfix_dir)
    except (OSError, RuntimeError) as exc:
        print(f"dealmail: {exc}", file=sys.stderr)
        return 73  # EX_CANTCREAT
    for line in written:
        print(f"wrote {line}")
    print(f"Next: add {folder / 'dealmail_main.cf'} to main.cf and "
          f"{folder / 'dealmail_master.cf'} to master.cf, "
          + ("" if args.postmap else "run postmap on the hash: tables, ")
          + "then `postfix reload`.")
    return 0


def _inspect(config: Config, args: argparse.Namespace) -> int:
    from linking.parse import MessageRejected

    from .inspect import inspect_message

    try:
        raw = args.file.read_bytes()
    except OSError as exc:
        print(f"dealmail: {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_DATA
    store = None
    if args.company:
        from crmstore.db import Store

        store = Store(config.database.url)
        store.open()
    try:
        result = inspect_message(raw, config, args.company, with_db=store is not None)
    except MessageRejected as exc:
        print(f"dealmail: {args.file}: would be refused (554 5.6.0): {exc.reason}",
              file=sys.stderr)
        return EXIT_DATA
    finally:
        if store is not None:
            store.close()
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2, default=str))
    else:
        print(f"kind: {result['kind']}; sender: {result['sender']['address']}"
              f" (user: {result['sender_is_user'] or 'no'})")
        if result["original"]:
            o = result["original"]
            print(f"forwarded original from {o['from']['address'] if o['from'] else '?'}: "
                  f"{o['subject']} ({o['date']})")
        for p in result["participants"]:
            print(f"  {p['role']:<4} {p['address']} {p['name']}")
        print(f"reply text: {result['reply_text'][:200]!r}")
        for defect in result["defects"]:
            print(f"defect: {defect}")
        if "would_link" in result:
            print(f"would link: {json.dumps(result['would_link'], ensure_ascii=False)}")
    return 0


def _auth(config: Config, args: argparse.Namespace) -> int:
    """``dealmail auth status|unlock``: the failed-login counters every worker shares
    (mta/anvil.py), read and cleared while the server runs."""
    import ipaddress
    import time

    from dealmail.addresses import AddressError, normalize_address
    from mta.anvil import (
        KIND_ACCOUNT,
        KIND_ACCOUNT_CLIENT,
        ClientTable,
        client_key,
        table_path,
    )

    path = table_path(config.database.url, Path.cwd())
    if not path.exists():
        print(f"dealmail: no counters at {path} (the server has not run here)",
              file=sys.stderr)
        return EXIT_NOTFOUND if args.action == "unlock" else 0
    table = ClientTable.open(path)
    try:
        if args.action == "unlock":
            if not args.target:
                print("dealmail: auth unlock needs an account address or a client IP",
                      file=sys.stderr)
                return EXIT_USAGE
            try:
                ipaddress.ip_address(args.target.strip("[]"))
            except ValueError:
                try:
                    account = normalize_address(args.target)
                except AddressError:
                    account = args.target.strip().lower()
                cleared = table.unlock(account=account)
                what = f"account {account}"
            else:
                client = client_key(args.target)
                cleared = table.unlock(client=client)
                what = f"client address {client}"
            print(f"{what}: {cleared} counter(s) cleared")
            return 0
        now = time.time()
        delay = config.relay.auth_failure_delay
        rows = []
        for c in sorted(table.login_entries(now), key=lambda c: (c.kind, c.label)):
            kind = {KIND_ACCOUNT: "account", KIND_ACCOUNT_CLIENT: "account from client"}.get(
                c.kind, "client")
            failures = c.fail_count if c.fail_until > now else 0
            rows.append({
                "kind": kind, "who": c.label, "failures": failures,
                "window_ends": _iso(c.fail_until) if failures else None,
                "locked_until": _iso(c.locked_until) if c.locked_until > now else None,
                "login_delay_seconds": min(delay * failures, config.relay.auth_max_delay)
                if c.kind == KIND_ACCOUNT else None,
            })
    finally:
        table.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no failed logins within the window, nothing locked")
    for r in rows:
        state = (f"refused until {r['locked_until']}" if r["locked_until"]
                 else f"logins wait {r['login_delay_seconds']:g} s"
                 if r["login_delay_seconds"] else "")
        print(f"{r['kind']:<20} {r['who']:<45} {r['failures']:>4} failure(s)  {state}")
    return 0


def _iso(when: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def _progress_bar(enabled: bool, unit: str) -> Any:
    """A ``progress(done, total)`` callback drawing a tqdm bar on standard error (done,
    total, rate, time left), or None when quiet or when standard error is not a terminal (a
    log file or a pipe gets no carriage-return noise). tqdm: it computes a smoothed rate and
    the time left, and redraws at most a few times a second whatever the call rate."""
    if not enabled or not sys.stderr.isatty():
        return None
    import shutil

    from tqdm import tqdm

    bar: Any = None
    # A terminal that reports no size (0x0: some consoles, a bare pty) makes tqdm's own probe
    # draw nothing at all; shutil falls back to 80x24 then.
    size = shutil.get_terminal_size((80, 24))

    def show(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit=f" {unit}", unit_scale=False, file=sys.stderr,
                       ncols=size.columns, nrows=size.lines, mininterval=0.2)
        bar.total = max(total, done)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return show


def _store_command(config: Config, args: argparse.Namespace) -> int:
    from crmstore import queries
    from crmstore.db import Store, StoreError

    store = Store(config.database.url)
    try:
        store.open()
        store.sync_config(config)
    except StoreError as exc:
        raise _CliError(str(exc), EXIT_CONFIG) from exc

    def company_id(slug: str | None) -> int:
        if slug is None:
            if not config.companies:
                raise _CliError("no company in the config", EXIT_CONFIG)
            slug = config.companies[0].slug
        if config.company(slug) is None:
            raise _CliError(f"unknown company {slug!r}", EXIT_NOTFOUND)
        return store.company_id(slug)

    try:
        if args.command == "import":
            from crmstore.importing import CsvImportError, import_csv

            company_id(args.company)
            try:
                company = config.company(args.company)
                assert company is not None
                relinked: list[Any] = []
                report = import_csv(store, args.company, args.kind, args.file, args.encoding,
                                    progress=_progress_bar(not args.quiet, "rows"),
                                    freemail_domains=config.policy.freemail_domains,
                                    internal_domains=company.internal_domains,
                                    after_write=_relink_after_import(config, company,
                                                                     relinked))
            except CsvImportError as exc:
                for problem in exc.problems:
                    print(problem, file=sys.stderr)
                raise _CliError(f"{args.file}: {len(exc.problems)} bad row(s); nothing "
                                "imported", EXIT_DATA) from exc
            except OSError as exc:
                raise _CliError(f"{args.file}: {exc.strerror}", EXIT_DATA) from exc
            print(f"{args.kind}: {report.rows} rows; {report.created} created, "
                  f"{report.updated} updated, {report.unchanged} unchanged")
            for done in (d for d in relinked if d.emails):
                print(f"earlier mail: {done.emails} email(s) linked to the imported persons, "
                      f"{done.deals} deal link(s), {len(done.questions)} question(s) queued")
            return 0
        if args.command in ("persons", "deals"):
            cid = company_id(args.company)
            rows = (queries.list_persons(cid) if args.command == "persons"
                    else queries.list_deals(cid))
            if args.json:
                print(json.dumps(rows, ensure_ascii=False, indent=2))
            else:
                for r in rows:
                    if args.command == "persons":
                        print(f"#{r['id']:<6} {r['name']:<28} {', '.join(r['addresses']):<40} "
                              f"{r['organization'] or '-':<20} open deals: {r['open_deals']}")
                    else:
                        print(f"#{r['id']:<6} {r['title']:<28} {r['status']:<5} "
                              f"{r['stage'] or '-':<14} {r['person'] or '-':<20} "
                              f"{r['organization'] or '-':<20} {r['value'] or '-'} "
                              f"{r['currency']} owner {r['owner'] or '-'}")
            return 0
        if args.command == "relink":
            slugs = [args.company] if args.company else [c.slug for c in config.companies]
            for slug in slugs:
                company_id(slug)
            return _relink(config, store, slugs, quiet=args.quiet)
        if args.command == "outbox":
            return _outbox(args)
        if args.command == "conversations":
            return _conversations(config, store, args)
        if args.command == "digest":
            return _digest(config, store, args)
        if args.command == "imap":
            return _imap_status(config, args)
        if args.command == "status":
            return _status(config, store, args)
        if args.command == "quarantine":
            return _quarantine(config, store, args, company_id)
        if args.command == "emails":
            return _emails(config, store, args)
    except queries.NotFound as exc:
        raise _CliError(str(exc), EXIT_NOTFOUND) from exc
    finally:
        store.close()
    raise _CliError(f"unknown command {args.command}", EXIT_USAGE)


def _relink_after_import(config: Config, company: Any,
                         out: list[Any]) -> Callable[[int, Any], None]:
    """Inside the import's transaction: earlier mail that carries an address the import added
    is linked to its person now (linking/relink.py), and the questions that needs are
    queued."""

    def after_write(company_id: int, report: Any) -> None:
        from datetime import UTC, datetime

        from digest.questions import queue_relink_questions
        from linking.record import Directory
        from linking.relink import relink_addresses

        if not report.new_addresses:
            return
        now = datetime.now(UTC)
        done = relink_addresses(config, company, company_id, report.new_addresses, now,
                                actor="dealmail import")
        queue_relink_questions(config, Directory(config), company, done.questions, now)
        out.append(done)

    return after_write


def _relink(config: Config, store: Any, slugs: list[str], quiet: bool = False) -> int:
    """``dealmail relink``: one transaction per company; questions for emails that now need a
    deal choice are queued (batched) like any other."""
    from datetime import UTC, datetime

    from digest.questions import queue_relink_questions
    from linking.record import Directory
    from linking.relink import relink_addresses

    now = datetime.now(UTC)
    for slug in slugs:
        company = config.company(slug)
        assert company is not None
        with store.transaction():
            directory = Directory(config)
            report = relink_addresses(config, company, directory.company_ids[slug], None, now,
                                      actor="dealmail relink",
                                      progress=_progress_bar(not quiet, "emails"))
            queue_relink_questions(config, directory, company, report.questions, now)
        print(f"{slug}: {report.emails} email(s) linked ({report.participants} "
              f"participant(s)), {report.deals} deal link(s), {len(report.questions)} "
              "question(s) queued")
    return 0


def _outbox(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from crmstore import outbox

    if args.action in ("retry", "drop"):
        if args.id is None:
            raise _CliError(f"outbox {args.action} needs an item id", EXIT_USAGE)
        done = (outbox.retry_item(args.id, datetime.now(UTC)) if args.action == "retry"
                else outbox.drop_item(args.id))
        if not done:
            raise _CliError(f"no {'retryable' if args.action == 'retry' else 'queued'} "
                            f"outbox item {args.id}", EXIT_NOTFOUND)
        print(f"outbox item {args.id}: {'due now' if args.action == 'retry' else 'dropped'}")
        return 0
    items = outbox.list_items()
    if args.json:
        print(json.dumps(items, ensure_ascii=False, indent=2))
        return 0
    for i in items:
        print(f"#{i['id']:<6} {i['state']:<8} {i['kind']:<9} attempts {i['attempts']:<3} "
              f"{', '.join(i['to'])[:40]:<40} {i['subject'][:40]}"
              + (f"  next {i['next_attempt']}" if i["next_attempt"] else "")
              + (f"  ({i['last_error'][:60]})" if i["last_error"] else ""))
    return 0


def _conversations(config: Config, store: Any, args: argparse.Namespace) -> int:
    from crmstore import queries

    user = queries.find_user(args.as_user)
    cid = user.company_id
    person = queries.find_person(cid, args.person) if args.person else None
    deal = queries.find_deal(cid, args.deal) if args.deal is not None else None
    result = queries.conversations(user, person=person, deal=deal)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    what = f"person {args.person}" if person else f"deal #{args.deal} {deal.title if deal else ''}"
    print(f"Conversations of {what} as seen by {user.address}:")
    for t in result["threads"]:
        deal_txt = (f"deal #{t['deal']['id']} {t['deal']['title']}" if t["deal"]
                    else ("needs a deal choice" if t["needs_choice"] else "no deal"))
        print(f"\n  thread #{t['id']}: {t['subject']}  [{deal_txt}]")
        for e in t["emails"]:
            print(f"    {e['handle'] or '-':<7} {e['date']}  {e['from']['address']:<28} "
                  f"{e['subject']}  ({e['channel']}, {e['owner']}, {e['visibility']})")
            if e["snippet"]:
                print(f"        {e['snippet'][:100]}")
    return 0


def _handle_number(text: str) -> int:
    from crmstore.handles import parse_handle

    number = parse_handle(text)
    if number is None:
        raise _CliError(f"{text!r} is not an email handle (E123)", EXIT_USAGE)
    return number


def _emails(config: Config, store: Any, args: argparse.Namespace) -> int:
    """``dealmail emails ACTION --as USER``: the commands users send by email, for scripts.
    The same checks apply: only the user's own copies, and the same audit entries."""
    from datetime import UTC, datetime

    from crmstore import inbox
    from digest.commands import Command, actor_for, result_line, run_one

    now = datetime.now(UTC)
    try:
        actor = actor_for(config, args.as_user, now, "cli")
    except LookupError as exc:
        raise _CliError(str(exc), EXIT_NOTFOUND) from exc
    action = args.action
    if action in ("list", "show", "ignored"):
        if action == "list":
            listed: Any = inbox.list_own(actor.user, args.limit)
        elif action == "ignored":
            listed = sorted(inbox.ignored_patterns(actor.user.id))
        else:
            listed = inbox.describe(actor.user, _handle_number(args.handle))
            if listed is None:
                raise _CliError(f"{args.handle}: unknown, or not an email you may see",
                                EXIT_NOTFOUND)
        if args.json:
            print(json.dumps(listed, ensure_ascii=False, indent=2))
        elif action == "list":
            for e in listed:
                deal = f"deal #{e['deal']['id']} {e['deal']['title']}" if e["deal"] else "-"
                print(f"{e['handle']:<7} {e['date']}  {e['visibility']:<8} {e['subject']}  "
                      f"[{deal}]")
        elif action == "ignored":
            print("\n".join(listed) if listed else "(nobody is ignored)")
        else:
            for key, value in listed.items():
                print(f"{key}: {json.dumps(value, ensure_ascii=False)}")
        return 0
    if action in ("ignore", "track"):
        command = Command(action, target=args.pattern)
    elif action in ("deal", "person"):
        command = Command(action, (_handle_number(args.handle),),
                          target=" ".join(args.target))
    else:
        command = Command(action, tuple(_handle_number(h) for h in args.handles),
                          thread=bool(getattr(args, "thread", False)))
    with store.transaction():
        results = run_one(config, actor, command)
        if any(r.values.get("deleted") for r in results):
            store.scrub_after_commit()
    if args.json:
        print(json.dumps([r.as_dict() for r in results], ensure_ascii=False, indent=2,
                         default=str))
    else:
        for r in results:
            print(f"{r.status}: {result_line(r, 'en')}")
    refused = [r for r in results if not r.ok]
    if any(r.reason == "unknown" for r in refused):
        return EXIT_NOTFOUND
    return EXIT_DATA if refused else 0


def _digest(config: Config, store: Any, args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from digest.digests import (
        compose_digest,
        default_since,
        digest_message,
        find_user_config,
        last_digest_until,
        queue_digest,
    )

    try:
        _company, user = find_user_config(config, args.user)
    except LookupError as exc:
        raise _CliError(str(exc), EXIT_NOTFOUND) from exc
    now = datetime.now(UTC)
    with store.transaction():
        since = default_since(user, now, last_digest_until(user.address))
        digest = compose_digest(config, user.address, since, now, now)
        if digest.empty:
            print(f"digest for {user.address}: nothing since {since:%Y-%m-%d %H:%M} UTC; "
                  "not sent")
            return 0
        if args.dry_run:
            # Headers and the readable text part (the HTML alternative is its twin).
            msg = digest_message(config, digest, now)
            for name, value in msg.items():
                if name.lower() not in ("content-type", "mime-version",
                                        "content-transfer-encoding"):
                    print(f"{name}: {value}")
            body = msg.get_body(preferencelist=("plain",))
            print()
            sys.stdout.write(body.get_content() if body is not None else "")
            return 0
        ids = queue_digest(config, digest, f"manual-{now:%Y%m%dT%H%M%S.%f}", now)
    print(f"digest for {user.address}: {digest.email_count} email(s); queued as outbox "
          + ", ".join(f"#{i}" for i in ids))
    return 0


def _imap_test(config: Config, address: str) -> int:
    """``dealmail imap test ADDRESS``: connect, log in, list folders and the sync plan."""
    from mta.imapsync.client import capability_list, close, connect, list_folders, plan_folders
    from mta.imapsync.credentials import CredentialError, Credentials
    from mta.imapsync.presets import resolve

    wanted = address.strip().lower()
    found = config.find_user(wanted)
    boxes = [(u, mb) for c in config.companies for u in c.users for mb in u.mailboxes
             if (found is not None and u.address == found[1].address)
             or mb.username.lower() == wanted]
    if not boxes:
        print(f"dealmail: no mailbox configured for {address!r}", file=sys.stderr)
        return EXIT_NOTFOUND
    failed = 0
    for user, mb in boxes:
        try:
            account = resolve(user, mb)
        except ValueError as exc:
            print(f"{config.path}:{mb.line}: {mb.key}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"mailbox {mb.username} of {user.address}: {account.preset.label}, "
              f"{account.host}:{account.port} ({account.tls} TLS), "
              f"{'XOAUTH2' if account.oauth2 else 'password'} login")
        try:
            client = connect(account, Credentials(account, Path.cwd(), _now),
                             base=Path.cwd(), timeout=config.imap.timeout_seconds,
                             max_literal=1 << 20)
        except (CredentialError, Exception) as exc:  # every failure is reported the same way
            print(f"  FAILED: {exc}", file=sys.stderr)
            failed += 1
            continue
        try:
            caps = capability_list(client)
            print(f"  logged in; capabilities: {' '.join(caps)}")
            folders = list_folders(client)
            plan, sent = plan_folders(account, folders, "X-GM-EXT-1" in caps)
            print("  folders:")
            for f in folders:
                special = " ".join(x for x in f.flags if x in (
                    "\\sent", "\\all", "\\drafts", "\\trash", "\\junk", "\\archive",
                    "\\flagged"))
                print(f"    {f.name}{'  ' + special if special else ''}")
            print("  synced:")
            for p in plan:
                print(f"    {p.name}  ({p.role}: {p.why})")
            print(f"  relayed mail filed in: {sent or '(no Sent folder found)'}"
                  + ("" if mb.append_sent else " (append_sent = false: not filed)"))
            history = f"the last {mb.since_days} days" if mb.since_days else "all history"
            print(f"  first sync reads {history}")
        finally:
            close(client)
    return EXIT_UNAVAILABLE if failed else 0


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def _imap_status(config: Config, args: argparse.Namespace) -> int:
    from mta.imapsync.service import status

    rows = status(config)
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    if not rows:
        print("no mailbox configured")
    for r in rows:
        if r["account"] is None:
            print(f"misconfigured: {r['last_error']}")
            continue
        print(f"{r['account']}  {r['state']}"
              + (f"  last sync {r['last_sync']}" if r.get("last_sync") else "")
              + (f"  tracked {r['messages_tracked']}" if "messages_tracked" in r else "")
              + (f"  failed {r['messages_failed']}" if r.get("messages_failed") else ""))
        for f in r["folders"]:
            done = (f"  {f['progress_percent']}% of UID {f['newest_uid']}"
                    if f.get("progress_percent") is not None and f["progress_percent"] < 100
                    else "")
            print(f"    {f['name']:<24} UIDVALIDITY {f['uidvalidity']}  last UID {f['last_uid']}"
                  f"  {f['handled']} handled{done}"
                  + (f"  ({f['epochs']} epoch change(s))" if f["epochs"] else ""))
        if r.get("last_error"):
            print(f"    last error: {r['last_error']}")
        if r.get("next_retry"):
            print(f"    next retry: {r['next_retry']}")
    return 0


def _status(config: Config, store: Any, args: argparse.Namespace) -> int:
    """``dealmail status``: the running server's own report (the status file it keeps under
    ``var/``: listeners, workers, last error; checked against the process table) and the
    database's state (outbox by state, oldest deferred item, quarantine). Exit 0 when the
    server runs, 69 (EX_UNAVAILABLE) when it does not, like a service manager's check."""
    from crmstore.status import store_status

    name = config.server.status_file
    path = Path(name) if Path(name).is_absolute() else Path.cwd() / name
    server: dict[str, Any] | None = None
    if name and path.exists():
        try:
            server = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            server = None
    running = bool(server and server.get("state") == "running" and _alive(server.get("pid")))
    if server is not None:
        if server.get("state") == "running" and not running:
            server["state"] = "not running (stale status file)"
        for worker in server.get("workers", []):
            worker["alive"] = _alive(worker.get("pid"))
            own = path.with_name(f"{path.name}.worker{worker.get('index')}")
            try:
                worker["last_error"] = json.loads(own.read_text(encoding="utf-8")).get(
                    "last_error")
            except (OSError, ValueError):
                worker["last_error"] = None
    from .app import _masked_url

    report: dict[str, Any] = {
              "server": server or {"state": "not running (no status file)"},
              "running": running, "database": {"url": _masked_url(config.database.url),
                                               **store_status(store)}}
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0 if running else EXIT_UNAVAILABLE
    srv: dict[str, Any] = report["server"]
    print(f"server: {srv['state']}" + (f" (pid {srv['pid']}, since {srv.get('started')})"
                                       if server and running else ""))
    for lname, address in (srv.get("listeners") or {}).items():
        print(f"  {lname}: {address}")
    for worker in srv.get("workers", []):
        print(f"  worker {worker['index']}: pid {worker['pid']} "
              f"{'alive' if worker['alive'] else 'gone'}")
    errors = [srv.get("last_error")] + [w.get("last_error") for w in srv.get("workers", [])]
    last = max((e for e in errors if e), key=lambda e: e.get("at", ""), default=None)
    print(f"  last error: {last['at']} {last['message']}" if last else "  last error: none")
    db: dict[str, Any] = report["database"]
    print(f"database: {db['url']} (schema {db['schema_version']})")
    print("  outbox: " + ", ".join(f"{n} {state}" for state, n in db["outbox"].items()))
    oldest = db["oldest_deferred"]
    print("  oldest deferred: " + (f"#{oldest['id']} since {oldest['created']} "
                                   f"({oldest['attempts']} attempt(s): {oldest['last_error']})"
                                   if oldest else "none"))
    print(f"  quarantined copies: {db['quarantined']}")
    return 0 if running else EXIT_UNAVAILABLE


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    return True


def _quarantine(config: Config, store: Any, args: argparse.Namespace, company_id: Any) -> int:
    """``dealmail quarantine list|release|drop``."""
    from datetime import UTC, datetime

    from crmstore.quarantine import drop_quarantined, list_quarantined

    if args.action == "list":
        items = list_quarantined(company_id(args.company) if args.company else None)
        if args.json:
            print(json.dumps(items, ensure_ascii=False, indent=2))
            return 0
        for q in items:
            # "#": the email's id, not a user's handle (E<number> in the company).
            print(f"#{q['id']:<6} {q['received']}  claimed {q['claimed_user']}  from "
                  f"{q['client_ip'] or '-'} <{q['envelope_from']}>  {q['verification']}  "
                  f"{q['size']} bytes  {q['subject'][:50]}")
        if not items:
            print("no quarantined copies")
        return 0
    now = datetime.now(UTC)
    if args.action == "drop":
        with store.transaction():
            done = drop_quarantined(args.id, now, actor="dealmail quarantine drop")
        if not done:
            raise _CliError(f"no quarantined copy of email {args.id}", EXIT_NOTFOUND)
        print(f"email {args.id}: quarantined copy dropped")
        return 0
    from .app import App

    # The capture path with the application's hooks (the deal question), on the app's own
    # store (building an App binds the models to it).
    app = App(config)
    app.open_store()
    try:
        capture = app.build_capture()
        with app.store.transaction():
            result = capture.release(args.id, actor="dealmail quarantine release")
    finally:
        app.executor.shutdown()
        app.store.close()
    if result is None:
        raise _CliError(f"no quarantined copy of email {args.id} (or its user is no longer "
                        "in the config)", EXIT_NOTFOUND)
    print(f"email {args.id}: released; linked as usual"
          + ("; a deal question is queued" if result.needs_choice else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
