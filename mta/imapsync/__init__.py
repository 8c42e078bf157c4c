"""Two-way sync of users' own mailboxes over IMAP (a transport: another source of mail).

* :mod:`.presets`: provider presets (host, port, TLS, folder rules) and the configuration
  checks that need them (``dealmail check-config`` runs them too);
* :mod:`.credentials`: passwords from a file or the environment, OAuth2 access tokens refreshed
  against the provider's token endpoint;
* :mod:`.client`: connecting (TLS, STARTTLS), logging in (LOGIN, XOAUTH2), ID, special-use
  folder discovery, with bounded reads;
* :mod:`.sync`: the per-account, per-folder sync loop (checkpoints, chunked fetches, IDLE);
* :mod:`.lease`: one process at a time per account;
* :mod:`.sentcopy`: relayed mail filed in the user's Sent folder;
* :mod:`.service`: the runner the application starts and stops (one thread per account).

Every synced message enters the one capture path (``linking.capture``) with channel ``imap``
and trust ``mailbox``; the folder checkpoint is written in the transaction that stored it.
"""
