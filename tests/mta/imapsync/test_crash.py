"""A sync process killed with SIGKILL in the middle of a chunk's transaction (after the bodies
were fetched, with part of the chunk written but not committed) loses nothing and doubles
nothing: the restart (in another process, once the dead one's lease has expired) reads that
chunk again (docs/reliability.md E.6.5)."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from support.dovecot import imap_emails, mail, one_pass, sync_config

from crmstore import models as m

ROOT = Path(__file__).resolve().parents[3]

# One sync pass in its own process; it kills itself (SIGKILL, no clean-up of any kind) when
# the capture records its KILL_AT-th message, inside the chunk's open transaction.
SYNC_AND_DIE = r"""
import os, signal, sys
from pathlib import Path
import linking.capture as capture
from dealmail.app import App
from dealmail.config import load_config
from mta.imapsync.lease import ensure_account
from mta.imapsync.service import SyncService, configured_accounts
from mta.imapsync.sync import AccountSync

config = load_config(Path(sys.argv[1]), sys.argv[3:])
kill_at = int(sys.argv[2])
app = App(config)
app.open_store()
app.capture = app.build_capture()
calls = [0]
record = capture.Capture.record
def dying_record(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return record(self, *args, **kwargs)
capture.Capture.record = dying_record
service = SyncService(app.store, app.capture, app.get_config, app.clock, Path.cwd())
account = next(iter(configured_accounts(config)[0].values()))
sync = AccountSync(account, service.deps)
sync.account_id = ensure_account(app.store, account.key, account.user.address)
assert service.deps.lease.acquire(sync.account_id)
sync.catch_up(sync.open())
print("not killed")
"""


def test_kill_between_fetch_and_commit_no_loss_no_duplicate(tmp_path: Path, dovecot: Any,
                                                             app_factory: Any,
                                                             clock: Any) -> None:
    login = dovecot.add_user()
    dovecot.deliver(login, [mail(i, sender=f"c{i}@cust{i % 5}.test") for i in range(400)])
    overrides = ("imap.chunk_messages=100",)
    config = sync_config(tmp_path, dovecot, login, *overrides)
    args = [f"database.url=sqlite:///{tmp_path}/dealmail.db", "listeners.inbound=127.0.0.1:0",
            "listeners.submission=", "server.demo_data=", *overrides]
    proc = subprocess.run([sys.executable, "-c", SYNC_AND_DIE, str(config.path), "250", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]

    running = app_factory(config)
    # Two chunks were committed; the third died with its transaction.
    assert imap_emails() == 200
    folder = m.MailboxFolder.get(m.MailboxFolder.name == "INBOX")
    assert folder.last_uid == 200
    account = m.MailboxAccount.get()
    assert account.lease_holder is not None  # the dead process still holds it...
    # ...until it expires: then this process takes the account over.
    clock.set(datetime.now(UTC) + timedelta(minutes=5))
    sync = one_pass(running)
    assert sync.last_stats["INBOX"].fetched == 200
    assert imap_emails() == 400
    assert m.Email.select().count() == 400
    assert m.MailboxMessage.select().count() == 400
    assert m.MailboxFolder.get(m.MailboxFolder.name == "INBOX").last_uid == 400
