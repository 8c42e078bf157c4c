"""Command line of the benchmarks:
``python -m bench ingest|scale|lmtp|imap [--quick] [--json FILE]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="mode", required=True)
    for name, text in (("ingest", "dealmail's Smart BCC ingestion vs a bare aiosmtpd server"),
                       ("scale", "ingestion cost and conversations query time as data grows")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--quick", action="store_true", help="a short run (under a minute)")
        sp.add_argument("--json", type=Path, metavar="FILE", help="write all figures here")
        sp.add_argument("--workers", type=int, default=2,
                        help="dealmail worker processes (listeners.workers; default 2)")
    sub.choices["ingest"].add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="a config override for the dealmail server (repeatable), e.g. "
        "clients.exempt_networks=[] to count the loopback client in the per-client table")
    sub.choices["ingest"].add_argument(
        "--database", metavar="postgresql://HOST:PORT/DB",
        help="also run dealmail on PostgreSQL: a fresh database is created on this server "
        "(DB is only used to connect) and dropped afterwards; its figures are printed "
        "beside SQLite's")
    lp = sub.add_parser("lmtp", help="Postfix's queue into dealmail over LMTP vs a bare "
                        "aiosmtpd LMTP sink")
    lp.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    lp.add_argument("--json", type=Path, metavar="FILE", help="write all figures here")
    sp = sub.add_parser("imap", help="initial IMAP mailbox sync vs a bare imapclient fetch")
    sp.add_argument("--quick", action="store_true", help="small mailboxes (seconds)")
    sp.add_argument("--json", type=Path, metavar="FILE", help="write all figures here")
    args = p.parse_args(argv)
    if args.mode == "lmtp":
        from .lmtp import main as lmtp_main

        return lmtp_main(args.quick, args.json)
    if args.mode == "imap":
        from .imap import main as imap_main

        return imap_main(args.quick, args.json)
    if args.mode == "ingest":
        from .ingest import main as ingest_main

        return ingest_main(args.quick, args.json, args.workers, tuple(args.set),
                           args.database)
    from .scale import main as scale_main

    return scale_main(args.quick, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
