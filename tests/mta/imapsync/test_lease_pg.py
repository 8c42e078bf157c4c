"""The same mailbox configured in two dealmail processes sharing one PostgreSQL: the account's
lease (``SELECT … FOR UPDATE SKIP LOCKED``) lets exactly one of them sync it, and every
message is stored once (docs/reliability.md E.6.17)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.dovecot import mail, sync_config

from crmstore import models as m
from crmstore.db import Store

ROOT = Path(__file__).resolve().parents[3]

# One dealmail process running the mailbox sync service until every message of the mailbox
# has a UID row (written by whichever process holds the lease), then a second more.
SYNC_PROCESS = r"""
import json, sys, time
from pathlib import Path
from crmstore import models as m
from dealmail.app import App
from dealmail.config import load_config
from mta.imapsync.service import SyncService

config = load_config(Path(sys.argv[1]), sys.argv[4:])
total = int(sys.argv[3])
app = App(config)
app.open_store()
app.capture = app.build_capture()
service = SyncService(app.store, app.capture, app.get_config, app.clock, Path.cwd(),
                      holder=sys.argv[2], tick=0.05)
service.start()
deadline = time.monotonic() + 60
while time.monotonic() < deadline and m.MailboxMessage.select().count() < total:
    time.sleep(0.1)
time.sleep(1.0)
fetched = sum(s.fetched for r in service.runners.values() for s in r.sync.last_stats.values())
service.stop()
print(json.dumps({"holder": sys.argv[2], "fetched": fetched}))
"""


@pytest.mark.postgres
def test_one_account_in_two_processes_is_synced_once(tmp_path: Path, dovecot: Any,
                                                     pg_url: str) -> None:
    login = dovecot.add_user()
    dovecot.deliver(login, [mail(i, sender=f"c{i}@cust{i % 9}.test") for i in range(300)])
    overrides = [f"database.url={pg_url}"]
    config = sync_config(tmp_path, dovecot, login, *overrides)
    store = Store(pg_url)
    store.open()  # the schema, created once before both start
    store.sync_config(config)
    args = ["listeners.inbound=127.0.0.1:0", "listeners.submission=", "server.demo_data=",
            *overrides]
    procs = [subprocess.Popen([sys.executable, "-c", SYNC_PROCESS, str(config.path),
                               f"process-{n}", "300", *args],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for n in (1, 2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    try:
        fetched = sorted(r["fetched"] for r in results)
        assert fetched == [0, 300], results  # one process synced, the other never did
        assert m.Email.select().count() == 300
        assert m.MailboxMessage.select().count() == 300
        assert m.Sighting.select().where(m.Sighting.channel == "imap").count() == 300
        account = m.MailboxAccount.get()
        assert account.lease_holder is None  # released at stop
    finally:
        store.close()
