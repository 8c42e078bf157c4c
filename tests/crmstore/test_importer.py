"""Tests of crmstore.importing: the demo CSVs, idempotency, whole-file refusal with line numbers,
encodings, Pipedrive columns, person matching by any address, and a 100,000-person file.

Each test runs on SQLite and, when reachable, on a PostgreSQL database created for this module
(skipped with a message when PostgreSQL is not running, a failure when env CI is set).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from support.crm import PG_HOST, pg_database

from crmstore import models as m
from crmstore.db import Store
from crmstore.importing import CsvImportError, ImportReport, detect_encoding, import_csv
from dealmail.config import load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "conf" / "dealmail.example.toml"
DEMO = ROOT / "conf" / "demo"
FIXTURES = Path(__file__).resolve().parent / "fixtures_import"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this module, dropped at the end."""
    with pg_database("import") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A store with the example config's companies and users and no CRM rows."""
    config = load_config(EXAMPLE)
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path}/t.db")
        s.open()
    else:
        s = Store(request.getfixturevalue("pg_url"))
        s.open()
        tables = ", ".join(f'"{model._meta.table_name}"' for model in m.ALL_MODELS
                           if model is not m.SchemaInfo)
        s.db.execute_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    s.sync_config(config)
    try:
        yield s
    finally:
        s.close()


def import_demo(store: Store) -> list[ImportReport]:
    return [import_csv(store, "example", kind, DEMO / f"{kind}.csv")
            for kind in ("organizations", "persons", "deals")]


def counts() -> dict[str, int]:
    return {model.__name__: model.select().count() for model in m.ALL_MODELS}


def crm_snapshot() -> dict[str, list[tuple[Any, ...]]]:
    """Every CRM row's content (without timestamps), to compare before and after."""
    return {
        "org": sorted(m.Organization.select(m.Organization.id, m.Organization.name).tuples()),
        "domain": sorted(m.OrgDomain.select(m.OrgDomain.organization, m.OrgDomain.domain)
                         .tuples()),
        "person": sorted(m.Person.select(m.Person.id, m.Person.name, m.Person.organization)
                         .tuples()),
        "address": sorted(m.PersonAddress.select(m.PersonAddress.person,
                                                 m.PersonAddress.address).tuples()),
        "deal": sorted(m.Deal.select(m.Deal.id, m.Deal.title, m.Deal.status, m.Deal.person,
                                     m.Deal.organization, m.Deal.owner, m.Deal.value,
                                     m.Deal.currency, m.Deal.stage).tuples()),
    }


def person(address: str) -> m.Person:
    pa = m.PersonAddress.get(m.PersonAddress.address == address)
    return m.Person.get_by_id(pa.person_id)


def addresses_of(p: m.Person) -> set[str]:
    return {a.address for a in m.PersonAddress.select().where(m.PersonAddress.person == p.id)}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


# --------------------------------------------------------------------------- demo


def test_demo_import_creates_expected_rows(store: Store) -> None:
    reports = import_demo(store)
    assert [(r.kind, r.rows, r.created, r.updated, r.unchanged) for r in reports] == [
        ("organizations", 2, 2, 0, 0), ("persons", 3, 3, 0, 0), ("deals", 4, 4, 0, 0)]

    customer = m.Organization.get(m.Organization.name == "Customer Inc")
    other = m.Organization.get(m.Organization.name == "Other Ltd")
    assert {d.domain for d in m.OrgDomain.select().where(m.OrgDomain.organization == customer.id)
            } == {"customer.test"}
    ann, carl, dora = (person("ann@customer.test"), person("carl@other.test"),
                       person("dora@customer.test"))
    assert (ann.name, ann.organization_id) == ("Ann Customer", customer.id)
    assert (carl.name, carl.organization_id) == ("Carl Other", other.id)
    assert dora.organization_id == customer.id

    def deals(p: m.Person) -> list[tuple[str, str, Decimal, str, str]]:
        q = m.Deal.select().where(m.Deal.person == p.id).order_by(m.Deal.title)
        return [(d.title, d.status, Decimal(d.value), d.currency,
                 m.User.get_by_id(d.owner_id).address) for d in q]

    assert deals(ann) == [("Renewal 2027", "open", Decimal(12000), "EUR", "alice@example.com"),
                          ("Upsell seats", "open", Decimal(4500), "EUR", "alice@example.com")]
    assert deals(carl) == [("Old order", "won", Decimal(800), "EUR", "bob@example.com"),
                           ("Pilot", "open", Decimal(3000), "EUR", "bob@example.com")]
    assert deals(dora) == []
    assert {d.organization_id for d in m.Deal.select().where(m.Deal.person == ann.id)} == {
        customer.id}
    assert m.Deal.get(m.Deal.title == "Pilot").stage == "Negotiation"


def test_demo_import_twice_changes_nothing(store: Store) -> None:
    import_demo(store)
    before_counts, before_rows = counts(), crm_snapshot()
    again = import_demo(store)
    assert counts() == before_counts
    assert crm_snapshot() == before_rows
    assert [(r.created, r.updated, r.unchanged) for r in again] == [(0, 0, 2), (0, 0, 3),
                                                                   (0, 0, 4)]


# --------------------------------------------------------------------------- bad rows


def test_one_bad_row_imports_nothing_and_names_its_line(store: Store) -> None:
    import_demo(store)
    m.Deal.delete().execute()
    before = counts()
    path = FIXTURES / "deals_one_bad.csv"
    with pytest.raises(CsvImportError) as info:
        import_csv(store, "example", "deals", path)
    assert info.value.problems == [
        f"{path}:3: Owner: unknown owner 'mallory@example.com': not a user of company "
        "'example'"]
    assert counts() == before  # the two good rows were not written either


def test_every_bad_row_is_reported_with_its_physical_line(store: Store) -> None:
    import_demo(store)
    before = crm_snapshot()
    path = FIXTURES / "deals_many_bad.csv"
    with pytest.raises(CsvImportError) as info:
        import_csv(store, "example", "deals", path)
    problems = info.value.problems
    # Line 2-3 is one record (a quoted Stage spanning two lines), so the next is line 4.
    expected = [
        (4, "Title", "a deal needs a title"),
        (5, "Status", "unknown status 'pending': must be open, won or lost"),
        (6, "Person", "unknown person 'Nobody Known'"),
        (7, "Value", "malformed value '12.000,00'"),
        (8, "Person", "invalid address 'carl@@other.test'"),
        (9, "Status", "unknown status 'deleted': deleted deals are not imported"),
        (10, "Owner", "unknown owner 'mallory@example.com'"),
    ]
    assert len(problems) == len(expected), problems
    for problem, (line, column, message) in zip(problems, expected, strict=True):
        assert problem.startswith(f"{path}:{line}: {column}: {message}"), problem
    assert crm_snapshot() == before


def test_unknown_owner_rejects_the_deal(store: Store, tmp_path: Path) -> None:
    import_demo(store)
    path = write(tmp_path, "deals.csv", "Title,Person,Owner\nNew,Ann Customer,nobody@example.com\n")
    with pytest.raises(CsvImportError, match=r"deals\.csv:2: Owner: unknown owner"):
        import_csv(store, "example", "deals", path)
    assert not m.Deal.select().where(m.Deal.title == "New").exists()


def test_invalid_person_address_is_a_bad_row(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv",
                 "Name,Email\nOk,ok@x.test\nBroken,\"a@x.test, not an address\"\n")
    with pytest.raises(CsvImportError) as info:
        import_csv(store, "example", "persons", path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}:3: Email: invalid address 'not an address'")
    assert m.Person.select().count() == 0


def test_missing_required_column_is_reported_on_the_header(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "Name,Status\nX,open\n")
    with pytest.raises(CsvImportError, match=r"d\.csv:1: \(header\): no Title column"):
        import_csv(store, "example", "deals", path)


def test_same_person_twice_in_one_file_is_refused(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "Name,Email\nA,a@x.test\nA again,A@X.test\n")
    with pytest.raises(CsvImportError, match=r"p\.csv:3: Email: address a@x\.test also on line 2"):
        import_csv(store, "example", "persons", path)


def test_a_user_address_is_not_a_customer(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "Name,Email\nBob,bob@example.com\n")
    with pytest.raises(CsvImportError, match="dealmail user's address"):
        import_csv(store, "example", "persons", path)


# --------------------------------------------------------------------------- encodings


def test_utf8_bom_is_dropped_from_the_header(store: Store) -> None:
    import_demo(store)
    report = import_csv(store, "example", "persons", FIXTURES / "persons_bom.csv")
    assert (report.created, report.organizations_created) == (1, 0)
    jose = person("jose@customer.test")
    assert jose.name == "José García"
    assert m.Organization.get_by_id(jose.organization_id).name == "Customer Inc"


def test_shift_jis_file_with_japanese_names(store: Store) -> None:
    path = FIXTURES / "persons_shift_jis.csv"
    assert detect_encoding(path.read_bytes()) == "cp932"
    report = import_csv(store, "example", "persons", path)
    assert (report.created, report.organizations_created) == (2, 1)
    yamada = person("yamada@test.co.jp")
    assert yamada.name == "山田太郎"
    assert m.Organization.get_by_id(yamada.organization_id).name == "株式会社テスト"
    assert person("sato@test.co.jp").organization_id == yamada.organization_id


def test_wrong_forced_encoding_names_the_line(store: Store) -> None:
    path = FIXTURES / "persons_shift_jis.csv"
    with pytest.raises(CsvImportError, match=r"persons_shift_jis\.csv:1: \(file\): not valid "
                                             r"utf-8"):
        import_csv(store, "example", "persons", path, encoding="utf-8")


@pytest.mark.parametrize(("text", "encoding"), [
    ("Name\nAnn\n", "utf-8"),
    ("Name\nJosé\n", "utf-8"),
    ("Name\n株式会社テスト\n", "cp932"),
    ("Name\nｶﾌﾞｼｷｶﾞｲｼｬ\n", "cp932"),  # half-width katakana of old Japanese systems
    ("Name\nMüller\n", "cp1252"),  # valid CP932 bytes, but not Japanese
    ("Name\nSociété Générale\n", "cp1252"),
    ("Name\nCafé\n", "cp1252"),
    ("Name\nSão Paulo Ltda\n", "cp1252"),  # decodes as CP932 to S縊 Paulo
    ("Name\nØresund\n", "cp1252"),  # decodes as CP932 to ﾘresund
    ("Name,Org\nMÄRZ GmbH,Ça va SA\n", "cp1252"),
    ("Name,Org\n山田太郎,A社\n佐藤花子,ABC株式会社\n", "cp932"),
    ("Name,Note\n㈱テスト,※重要①\n", "cp932"),
])
def test_detect_encoding(text: str, encoding: str) -> None:
    data = text.encode("utf-8" if encoding == "utf-8" else encoding)
    assert detect_encoding(data) == encoding
    assert detect_encoding(b"\xef\xbb\xbf" + text.encode("utf-8")) == "utf-8-sig"


# --------------------------------------------------------------------------- persons


def test_pipedrive_columns_and_comma_separated_emails(store: Store) -> None:
    import_demo(store)
    report = import_csv(store, "example", "persons", FIXTURES / "persons_pipedrive.csv")
    assert (report.created, report.organizations_created) == (3, 1)
    erin = person("erin@customer.test")
    assert addresses_of(erin) == {"erin@customer.test", "erin.home@mail.test"}
    frank = person("frank@other.test")  # normalised from Frank@Other.test
    assert frank.name == "Frank Multi"
    assert addresses_of(frank) == {"frank@other.test", "frank.alt@other.test"}
    assert m.Organization.get_by_id(frank.organization_id).name == "New Org GmbH"
    assert person("gina@mail.test").organization_id is None


def test_several_email_columns(store: Store) -> None:
    import_demo(store)
    import_csv(store, "example", "persons", FIXTURES / "persons_several_email_columns.csv")
    assert addresses_of(person("hank@customer.test")) == {"hank@customer.test",
                                                          "hank2@customer.test"}


def test_person_matched_by_second_address_gets_the_new_one(store: Store, tmp_path: Path) -> None:
    first = write(tmp_path, "a.csv", "Name,Email\nIvy,\"ivy@a.test, ivy@b.test\"\n")
    import_csv(store, "example", "persons", first)
    ivy = person("ivy@a.test")
    second = write(tmp_path, "b.csv", "Name,Email,Email\nIvy Renamed,ivy@b.test,ivy@c.test\n")
    report = import_csv(store, "example", "persons", second)
    assert (report.created, report.updated, report.unchanged) == (0, 1, 0)
    assert m.Person.select().count() == 1
    assert addresses_of(ivy) == {"ivy@a.test", "ivy@b.test", "ivy@c.test"}
    assert m.Person.get_by_id(ivy.id).name == "Ivy Renamed"
    again = import_csv(store, "example", "persons", second)
    assert (again.created, again.updated, again.unchanged) == (0, 0, 1)


def test_addresses_of_two_different_persons_are_refused(store: Store, tmp_path: Path) -> None:
    import_demo(store)
    path = write(tmp_path, "p.csv", "Name,Email\nMix,\"ann@customer.test,carl@other.test\"\n")
    with pytest.raises(CsvImportError, match="belong to different persons"):
        import_csv(store, "example", "persons", path)


def test_person_without_address_is_matched_by_name(store: Store, tmp_path: Path) -> None:
    import_demo(store)
    path = write(tmp_path, "p.csv",
                 "Name;Organization\nJules Phone;customer inc\nAnn Customer;Customer Inc\n")
    first = import_csv(store, "example", "persons", path)  # semicolon-separated export
    assert (first.created, first.unchanged, first.organizations_created) == (1, 1, 0)
    jules = m.Person.get(m.Person.name == "Jules Phone")
    assert m.Organization.get_by_id(jules.organization_id).name == "Customer Inc"
    again = import_csv(store, "example", "persons", path)
    assert (again.created, again.unchanged) == (0, 2)


def test_awkward_cell_text_is_stored_verbatim(store: Store, tmp_path: Path) -> None:
    # Quotes, commas, a backslash, \N and a line break inside a quoted cell: the bulk
    # writers (COPY on PostgreSQL) must store them as text, never as NULL or separators.
    name = 'Ola "Big" O\'Brien, Jr. \\N back\\slash'
    path = write(tmp_path, "p.csv", 'Name,Email,Organization\n'
                 f'"{name.replace(chr(34), chr(34) * 2)}",ola@x.test,"Multi\nLine & Co"\n'
                 'Next,next@x.test,\n')
    import_csv(store, "example", "persons", path)
    ola = person("ola@x.test")
    assert ola.name == name
    # Spaces and line breaks in names collapse to one space, like a spreadsheet user sees.
    assert m.Organization.get_by_id(ola.organization_id).name == "Multi Line & Co"
    assert person("next@x.test").organization_id is None
    deals = write(tmp_path, "d.csv", "Title,Person\nNo currency,ola@x.test\n")
    import_csv(store, "example", "deals", deals)
    deal = m.Deal.get(m.Deal.title == "No currency")
    assert (deal.currency, deal.stage, deal.value, deal.status) == ("", "", None, "open")


def test_unclosed_quote_names_the_line_where_the_record_starts(store: Store,
                                                             tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", 'Name,Email\nA,a@x.test\n"B,b@x.test\nC,c@x.test\n')
    with pytest.raises(CsvImportError, match=r"p\.csv:3: \(file\): malformed CSV"):
        import_csv(store, "example", "persons", path)
    assert m.Person.select().count() == 0


def test_nul_character_is_refused(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(b"Name,Email\nA,a@x.test\nB\x00,b@x.test\n")
    with pytest.raises(CsvImportError, match=r"p\.csv:3: \(file\): NUL character"):
        import_csv(store, "example", "persons", path)


# --------------------------------------------------------------------------- organizations, deals


def test_organization_domains_and_website(store: Store, tmp_path: Path) -> None:
    path = write(tmp_path, "o.csv", "Organization - Name,Domains,Website\n"
                                    "Acme,\"acme.test, ACME.example\",https://www.acme-shop.test/x\n")
    report = import_csv(store, "example", "organizations", path)
    assert report.created == 1
    assert {d.domain for d in m.OrgDomain.select()} == {"acme.test", "acme.example",
                                                        "acme-shop.test"}
    clash = write(tmp_path, "o2.csv", "Name,Domain\nOther,acme.test\n")
    with pytest.raises(CsvImportError, match=r"acme\.test already belongs to organization 'Acme'"):
        import_csv(store, "example", "organizations", clash)


def test_freemail_and_internal_domains_are_refused(store: Store, tmp_path: Path) -> None:
    config = load_config(EXAMPLE)
    company = config.company("example")
    assert company is not None
    freemail, internal = config.policy.freemail_domains, company.internal_domains
    orgs = write(tmp_path, "o.csv", "Name,Domains\nGmail fans,gmail.com\nUs,example.com\n")
    with pytest.raises(CsvImportError) as info:
        import_csv(store, "example", "organizations", orgs, freemail_domains=freemail,
                   internal_domains=internal)
    assert [p.split(": ", 2)[0].rsplit(":", 1)[1] for p in info.value.problems] == ["2", "3"]
    assert "freemail" in info.value.problems[0]
    assert "own domains" in info.value.problems[1]
    persons = write(tmp_path, "p.csv", "Name,Email\nColleague,carol@example.com\n")
    with pytest.raises(CsvImportError, match=r"p\.csv:2: Email: carol@example\.com is in one"):
        import_csv(store, "example", "persons", persons, freemail_domains=freemail,
                   internal_domains=internal)
    assert m.Organization.select().count() == m.Person.select().count() == 0


def test_deal_external_id_is_its_identity(store: Store, tmp_path: Path) -> None:
    import_demo(store)
    header = "Deal - ID,Deal - Title,Deal - Status,Person - Email,Deal - Value,Deal - Stage\n"
    first = write(tmp_path, "d1.csv", header + "77,Expansion,Open,ann@customer.test,100,Lead\n")
    assert import_csv(store, "example", "deals", first).created == 1
    second = write(tmp_path, "d2.csv",
                   header + "77,Expansion (renamed),Won,ann@customer.test,\"1,250.50\",Won\n")
    report = import_csv(store, "example", "deals", second)
    assert (report.created, report.updated) == (0, 1)
    deal = m.Deal.get(m.Deal.external_id == "77")
    assert (deal.title, deal.status, Decimal(deal.value), deal.stage) == (
        "Expansion (renamed)", "won", Decimal("1250.50"), "Won")
    assert deal.organization_id == person("ann@customer.test").organization_id
    assert import_csv(store, "example", "deals", second).unchanged == 1


def test_progress_is_reported(store: Store, tmp_path: Path) -> None:
    lines = ["Name,Email"] + [f"P{i},p{i}@x.test" for i in range(2500)]
    path = write(tmp_path, "p.csv", "\n".join(lines) + "\n")
    calls: list[tuple[int, int]] = []
    import_csv(store, "example", "persons", path, progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (1000, 2500)
    assert calls[-1] == (2500, 2500)
    assert all(b[0] >= a[0] for a, b in itertools.pairwise(calls))


def test_concurrent_writer_conflict_writes_nothing(store: Store, tmp_path: Path) -> None:
    """On PostgreSQL another process (a Smart BCC delivery) may create the same address
    while the file is being checked; the import then fails whole with a clear message."""
    if store.is_sqlite:
        pytest.skip("SQLite: the import holds the write lock from its first read")
    import psycopg2
    lines = ["Name,Email"] + [f"P{i},p{i}@x.test" for i in range(1500)]
    path = write(tmp_path, "p.csv", "\n".join(lines) + "\n")
    company = store.company_id("example")
    db = store.db.database

    def meanwhile(done: int, total: int) -> None:
        if done == 1000:
            other = psycopg2.connect(host=PG_HOST, user="postgres", dbname=db)
            other.autocommit = True
            with other.cursor() as cur:
                cur.execute("INSERT INTO person (company_id, name, auto_created, created_at) "
                            "VALUES (%s, 'Auto', true, now()) RETURNING id", (company,))
                pid = cur.fetchone()[0]
                cur.execute("INSERT INTO person_address (person_id, company_id, address) "
                            "VALUES (%s, %s, 'p1200@x.test')", (pid, company))
            other.close()

    with pytest.raises(CsvImportError, match="the database changed during the import"):
        import_csv(store, "example", "persons", path, progress=meanwhile)
    assert [p.name for p in m.Person.select()] == ["Auto"]


# --------------------------------------------------------------------------- volume


def test_100k_persons(store: Store, tmp_path: Path) -> None:
    n = 100_000
    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write("Name,Email,Organization\r\n")
        for i in range(n):
            f.write(f"Person {i},person{i}@big{i % 500}.test,Org {i % 500}\r\n")
    started, cpu = time.perf_counter(), time.process_time()
    report = import_csv(store, "example", "persons", path)
    elapsed = time.perf_counter() - started
    print(f"\nimported {n} persons on {'SQLite' if store.is_sqlite else 'PostgreSQL'} "
          f"in {elapsed:.2f} s ({n / elapsed:,.0f} rows/s; "
          f"{time.process_time() - cpu:.2f} s CPU in this process)")
    assert (report.rows, report.created, report.organizations_created) == (n, n, 500)
    assert m.Person.select().count() == n
    assert m.PersonAddress.select().count() == n
    assert m.Organization.select().count() == 500
    p = person("person4242@big242.test")
    assert (p.name, m.Organization.get_by_id(p.organization_id).name) == ("Person 4242",
                                                                          "Org 242")
    started, cpu = time.perf_counter(), time.process_time()
    again = import_csv(store, "example", "persons", path)
    print(f"re-imported (all unchanged) in {time.perf_counter() - started:.2f} s "
          f"({time.process_time() - cpu:.2f} s CPU)")
    assert again.unchanged == n
    assert m.Person.select().count() == n
