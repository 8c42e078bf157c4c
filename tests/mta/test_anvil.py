"""The table of per-client counters the worker processes share (mta/anvil.py): a worker's
open connections die with it, a restart keeps login counters, slots are reused once
expired, a full table fails open, IPv6 clients count by their /64."""

from __future__ import annotations

from pathlib import Path

from mta.anvil import KIND_ACCOUNT_CLIENT, KIND_CLIENT, ClientTable, client_key, table_path


def _table(tmp_path: Path, workers: int = 2, slots: int = 64) -> ClientTable:
    ClientTable.prepare(tmp_path / "t", workers, slots=slots)
    return ClientTable.open(tmp_path / "t")


def test_a_dead_workers_connections_are_forgotten(tmp_path: Path) -> None:
    table = _table(tmp_path)
    for worker in (0, 0, 1):
        assert table.connect("192.0.2.1", worker, 100.0, 60, 3, 0) is None
    assert table.connect("192.0.2.1", 1, 100.0, 60, 3, 0) == "connections"
    table.clear_worker(0)  # worker 0 died; its replacement starts
    counters = table.counters("c:192.0.2.1", 100.0)
    assert counters is not None and counters.connections == 1
    assert table.connect("192.0.2.1", 0, 100.0, 60, 3, 0) is None
    table.disconnect("192.0.2.1", 1, 100.0)
    assert table.counters("c:192.0.2.1", 100.0).connections == 1  # type: ignore[union-attr]
    table.close()


def test_a_restart_keeps_login_counters_and_clears_connections(tmp_path: Path) -> None:
    table = _table(tmp_path)
    table.connect("192.0.2.1", 1, 100.0, 60, 10, 0)
    table.login_failure("192.0.2.1", "bob@example.com", 100.0, 900, 900,
                        {KIND_ACCOUNT_CLIENT: 1})
    table.close()
    ClientTable.prepare(tmp_path / "t", 2, slots=64)  # the server starts again
    table = ClientTable.open(tmp_path / "t")
    assert table.counters("c:192.0.2.1", 100.0).connections == 0  # type: ignore[union-attr]
    assert table.locked("192.0.2.1", "bob@example.com", 100.0) == 1000.0
    table.close()
    ClientTable.prepare(tmp_path / "t", 3, slots=64)  # another shape: a fresh table
    table = ClientTable.open(tmp_path / "t")
    assert table.workers == 3 and table.locked("192.0.2.1", "bob@example.com", 100.0) == 0
    table.close()


def test_slots_are_reused_and_a_full_table_fails_open(tmp_path: Path) -> None:
    table = _table(tmp_path, slots=8)
    for i in range(8):
        assert table.connect(f"192.0.2.{i}", 0, 100.0, 60, 1, 0) is None
    # Every slot holds an open connection: a ninth client is served, uncounted.
    assert table.connect("192.0.2.99", 0, 100.0, 60, 1, 0) is None
    assert table.counters("c:192.0.2.99", 100.0) is None
    for i in range(8):
        table.disconnect(f"192.0.2.{i}", 0, 100.0)
    # Closed and their windows over: the slots take new clients, limits apply again.
    assert table.connect("192.0.2.99", 0, 161.0, 60, 1, 0) is None
    assert table.connect("192.0.2.99", 0, 161.0, 60, 1, 0) == "connections"
    table.close()


def test_unlock_by_address_or_account(tmp_path: Path) -> None:
    table = _table(tmp_path)
    limits = {KIND_CLIENT: 2, KIND_ACCOUNT_CLIENT: 1}
    table.login_failure("192.0.2.1", "bob@example.com", 100.0, 900, 900, limits)
    table.login_failure("192.0.2.1", "ann@example.com", 100.0, 900, 900, limits)
    table.login_failure("192.0.2.2", "bob@example.com", 100.0, 900, 900, limits)
    assert table.locked("192.0.2.1", None, 100.0)
    assert table.locked("192.0.2.2", "bob@example.com", 100.0)
    assert table.unlock(client="192.0.2.1") == 3  # the address and its two pairs
    assert not table.locked("192.0.2.1", "ann@example.com", 100.0)
    assert table.locked("192.0.2.2", "bob@example.com", 100.0)
    assert table.unlock(account="bob@example.com") == 2  # the account and its last pair
    assert not table.locked("192.0.2.2", "bob@example.com", 100.0)
    left = {(c.label, c.fail_count, c.locked_until) for c in table.login_entries(100.0)}
    assert left == {("192.0.2.2", 1, 0.0), ("ann@example.com", 1, 0.0)}
    table.close()


def test_client_keys_and_paths(tmp_path: Path) -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") == (
        "2001:db8:1:2::/64")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert table_path(f"sqlite:///{tmp_path}/x.db", tmp_path) == tmp_path / "x.db.clients"
    pg = table_path("postgresql://u@h:5432/d", tmp_path)
    assert pg.parent == tmp_path / "var" and pg.name.startswith("clients-")
