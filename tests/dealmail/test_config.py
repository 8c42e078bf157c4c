"""Tests for dealmail.config: the example loads, every mistake is reported at once as
``FILE:LINE: key: message``, address claims are unique across users and companies, ``--set``
overrides, and the order in which the config file is found.

Each bad config below is written to a temporary file with its line numbers known, so the test
checks that the reported line is the one the admin must edit.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dealmail.config import ConfigError, find_config_path, load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "conf" / "dealmail.example.toml"


pytestmark = pytest.mark.usefixtures("restore_logging")

# A small valid config; tests append to it or replace pieces. Line numbers matter below.
BASE = """\
[server]
mail_domain = "dealmail.localhost"

[[companies]]
slug = "example"
name = "Example Inc"
internal_domains = ["example.com"]

[[companies.users]]
address = "alice@example.com"
alternates = ["alice.personal@mail.test"]

[[companies.users]]
address = "bob@example.com"
"""

OTHER_COMPANY = """
[[companies]]
slug = "other"
name = "Other Ltd"
internal_domains = ["other.test"]

[[companies.users]]
address = "olga@other.test"
"""


def write(tmp_path: Path, text: str, name: str = "dealmail.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def line_of(path: Path, needle: str) -> int:
    """The 1-based line of the first line of ``path`` containing ``needle``."""
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in line:
            return lineno
    raise AssertionError(f"{needle!r} not in {path}")


# --------------------------------------------------------------------------- the example


def test_example_loads_with_the_documented_demo_company() -> None:
    config = load_config(EXAMPLE)
    assert config.mail_domain == "dealmail.localhost"
    assert config.database.url == "sqlite:///var/dealmail.db"
    assert config.listeners.inbound == "127.0.0.1:2525"
    assert config.listeners.submission == "127.0.0.1:2587"
    assert config.limits.message_size == 25 * 1024 * 1024
    assert [c.slug for c in config.companies] == ["example"]
    company = config.companies[0]
    assert company.internal_domains == ("example.com",)
    alice = company.user("alice@example.com")
    bob = company.user("bob@example.com")
    assert alice is not None and bob is not None
    assert alice.role == "admin" and alice.default_visibility == "shared"
    assert alice.alternates == ("alice.personal@mail.test",)
    assert alice.auto_link_deals and bob.auto_link_deals
    assert bob.role == "user" and bob.default_visibility == "private"
    assert bob.language == "ja" and bob.timezone == "Asia/Tokyo"
    # An alternate address finds its user, and the index points at the primary.
    found = config.find_user("alice.personal@mail.test")
    assert found is not None and found[1].address == "alice@example.com"
    assert config.is_trusted("127.0.0.1") and not config.is_trusted("192.0.2.1")


def test_every_example_option_has_a_comment() -> None:
    """The example documents every option: each ``key =`` line follows a comment line or
    another documented key of the same group (the user blocks repeat the first one's keys)."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    documented: set[str] = set()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "[", '"')) or "=" not in stripped:
            continue
        key = stripped.split("=", 1)[0].strip()
        if lines[i - 1].strip().startswith("#"):
            documented.add(key)
        elif key not in documented and key not in ("name", "address"):
            undocumented.append(f"{i + 1}: {key}")
    assert undocumented == []


# --------------------------------------------------------------------------- mistakes


def test_three_different_mistakes_are_reported_at_once_with_their_lines(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace(
        'mail_domain = "dealmail.localhost"\n',
        'mail_domain = "dealmail.localhost"\ncolour = "blue"\n\n[limits]\nmessage_size = "big"\n',
    ).replace('address = "bob@example.com"', 'address = "bob at example.com"'))
    problems = problems_of(path)
    assert problems == [
        f"{path}:3: server.colour: unknown key",
        f"{path}:6: limits.message_size: must be an integer",
        f"{path}:18: companies[0].users[1].address: malformed address 'bob at example.com' "
        "(not a single address: 'bob at example.com')",
    ]
    assert line_of(path, "colour") == 3
    assert line_of(path, "message_size") == 6
    assert line_of(path, "bob at example.com") == 18


def test_check_config_reports_every_mistake_and_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from dealmail.cli import main

    path = write(tmp_path, BASE.replace('slug = "example"', 'slug = "Ex+ample"')
                 .replace('alternates = ["alice.personal@mail.test"]',
                          'alternates = ["alice.personal@mail.test"]\ntimezone = "Mars/Base"'))
    assert main(["check-config", "--config", str(path)]) == 78
    err = capsys.readouterr()
    assert err.out == ""
    lines = err.err.splitlines()
    assert lines[0].startswith(f"{path}:5: companies[0].slug: 'Ex+ample' is not a valid")
    assert lines[1] == f"{path}:12: companies[0].users[0].timezone: unknown time zone 'Mars/Base'"
    assert lines[2] == "dealmail: 2 problem(s) in the configuration; nothing started"


def test_a_bad_user_address_does_not_hide_the_users_other_mistakes(tmp_path: Path) -> None:
    text = BASE + 'timezone = "Nowhere/City"\npassword_hash = "hunter2hunter2"\n'
    path = write(tmp_path, text.replace('"bob@example.com"', '"bob@@example.com"'))
    keys = [p.split(": ")[1] for p in problems_of(path)]
    assert keys == ["companies[0].users[1].address", "companies[0].users[1].timezone",
                    "companies[0].users[1].password_hash"]


@pytest.mark.parametrize(
    ("extra", "key", "message"),
    [
        ('role = "root"', "companies[0].users[1].role", "must be admin or user"),
        ('default_visibility = "public"', "companies[0].users[1].default_visibility",
         "must be shared or private"),
        ('language = "fr"', "companies[0].users[1].language", "must be en or ja"),
        ('timezone = "Europe/Atlantis"', "companies[0].users[1].timezone",
         "unknown time zone 'Europe/Atlantis'"),
        ('password_hash = "correct horse battery"', "companies[0].users[1].password_hash",
         "must be a hash made by `dealmail set-password` (never a plain password)"),
        ("auto_link_deals = 1", "companies[0].users[1].auto_link_deals",
         "must be true or false"),
        ('alternates = "bob@mail.test"', "companies[0].users[1].alternates", "must be a list"),
        ('nickname = "bobby"', "companies[0].users[1].nickname", "unknown key"),
    ],
)
def test_user_value_mistakes(tmp_path: Path, extra: str, key: str, message: str) -> None:
    path = write(tmp_path, BASE + extra + "\n")
    assert problems_of(path) == [f"{path}:15: {key}: {message}"]


def test_plain_text_password_is_refused_and_a_scrypt_hash_accepted(tmp_path: Path) -> None:
    from dealmail.passwords import hash_password

    plain = write(tmp_path, BASE + 'password_hash = "s3cret-pass"\n', "plain.toml")
    assert "never a plain password" in problems_of(plain)[0]
    hashed = write(tmp_path, BASE + f'password_hash = "{hash_password("s3cret-pass")}"\n',
                   "hashed.toml")
    user = load_config(hashed).companies[0].user("bob@example.com")
    assert user is not None and user.password_hash.startswith("scrypt$")


@pytest.mark.parametrize(
    ("slug", "ok"),
    [("example", True), ("acme-sales", True), ("a.b_c", True), ("x", True),
     ("Example", False), ("ex+ample", False), ("ex ample", False), ("-example", False),
     ("example.", False), ("", False), ("exämple", False), ("e@x", False)],
)
def test_company_slug_must_be_a_valid_local_part(tmp_path: Path, slug: str, ok: bool) -> None:
    path = write(tmp_path, BASE.replace('slug = "example"', f'slug = "{slug}"'))
    if ok:
        assert load_config(path).companies[0].slug == slug
    else:
        problems = problems_of(path)
        assert problems == [f"{path}:5: companies[0].slug: {slug!r} is not a valid local part "
                            "(lower-case letters, digits, '.', '_' and '-'; no '+')"]


def test_bad_cidr_reports_the_array_line_not_the_table_header(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace(
        '[server]\nmail_domain = "dealmail.localhost"\n',
        '[server]\nmail_domain = "dealmail.localhost"\n\n[policy]\n'
        'trusted_networks = ["10.0.0.0/8", "10.0.0.0/33", "fe80::/10", "not-a-net"]\n'))
    assert problems_of(path) == [
        f"{path}:5: policy.trusted_networks[1]: '10.0.0.0/33' is not a CIDR network",
        f"{path}:5: policy.trusted_networks[3]: 'not-a-net' is not a CIDR network",
    ]


def test_trusted_networks_accept_ipv4_and_ipv6(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE), ["policy.trusted_networks=[\"10.1.0.0/16\", "
                                                 "\"2001:db8::/32\"]"])
    assert config.is_trusted("10.1.2.3") and config.is_trusted("2001:db8::1")
    assert not config.is_trusted("10.2.0.1") and not config.is_trusted("not an ip")


# --------------------------------------------------------------------------- address claims


def test_two_users_with_the_same_address(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + '\n[[companies.users]]\naddress = "Bob@Example.com"\n')
    assert problems_of(path) == [
        f"{path}:17: companies[0].users[2].address: bob@example.com is already claimed by "
        "companies[0].users[1].address"]


def test_an_alternate_equal_to_another_users_primary(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + 'alternates = ["alice@example.com"]\n')
    assert problems_of(path) == [
        f"{path}:15: companies[0].users[1].alternates[0]: alice@example.com is already "
        "claimed by companies[0].users[0].address"]


def test_the_same_alternate_for_two_users(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + 'alternates = ["ALICE.personal@mail.test"]\n')
    assert problems_of(path) == [
        f"{path}:15: companies[0].users[1].alternates[0]: alice.personal@mail.test is already "
        "claimed by companies[0].users[0].alternates[0]"]


def test_a_primary_address_inside_another_companys_domain(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + OTHER_COMPANY + '\n[[companies.users]]\n'
                 'address = "mallory@example.com"\n')
    assert problems_of(path) == [
        f"{path}:{line_of(path, 'mallory')}: companies[1].users[1].address: "
        "mallory@example.com is outside the company's internal domains"]


def test_an_alternate_inside_another_companys_domain(tmp_path: Path) -> None:
    """Even an address no one else claims: it belongs to the other company's people."""
    path = write(tmp_path, BASE + 'alternates = ["nobody@other.test"]\n' + OTHER_COMPANY)
    assert problems_of(path) == [
        f"{path}:15: companies[0].users[1].alternates[0]: nobody@other.test is inside the "
        "internal domain other.test of company 'other'"]


def test_a_user_address_inside_dealmails_own_domain(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + 'alternates = ["example@dealmail.localhost"]\n')
    assert problems_of(path) == [
        f"{path}:15: companies[0].users[1].alternates[0]: example@dealmail.localhost is "
        "inside dealmail's own mail domain"]


def test_two_companies_with_the_same_slug(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + OTHER_COMPANY.replace('slug = "other"', 'slug = "example"'))
    assert problems_of(path) == [
        f"{path}:17: companies[1].slug: company 'example' is defined twice"]
    assert line_of(path, 'slug = "example"') == 5  # the first definition; line 17 repeats it


def test_alternates_outside_every_company_are_fine(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE + OTHER_COMPANY))
    assert config.find_user("olga@other.test") is not None
    found = config.find_user("alice.personal@mail.test")
    assert found is not None and found[0].slug == "example"


# --------------------------------------------------------------------------- other errors


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "role = \n")
    problems = problems_of(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}:15: (syntax):")


def test_missing_file(tmp_path: Path) -> None:
    problems = problems_of(tmp_path / "nope.toml")
    assert problems[0].startswith(f"{tmp_path / 'nope.toml'}:1: (file): cannot read")


# --------------------------------------------------------------------------- --set


def test_set_overrides_values_with_toml_typing(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    config = load_config(path, [
        "listeners.inbound=127.0.0.1:2600",  # a bare word is a string, like Postfix's -o
        "listeners.submission=",              # empty disables the listener
        "limits.max_recipients=7",            # a TOML integer
        "policy.create_unknown_persons=false",
        f"database.url=sqlite:///{tmp_path}/x.db",
        'server.mail_domain="Mail.Example.NET"',
    ])
    assert config.listeners.inbound == "127.0.0.1:2600"
    assert config.listeners.submission == ""
    assert config.limits.max_recipients == 7
    assert config.policy.create_unknown_persons is False
    assert config.database.url == f"sqlite:///{tmp_path}/x.db"
    assert config.mail_domain == "mail.example.net"


def test_set_values_are_validated_like_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    problems = problems_of(path, ("limits.max_recipients=0", "server.colour=red"))
    assert [p.split(": ", 1)[1] for p in problems] == [
        "server.colour: unknown key", "limits.max_recipients: must be at least 1"]


def test_set_without_equals_sign_is_an_error(tmp_path: Path) -> None:
    assert problems_of(write(tmp_path, BASE), ("limits.max_recipients",)) == [
        "--set limits.max_recipients: expected section.key=value"]


# --------------------------------------------------------------------------- resolution


def test_config_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    monkeypatch.delenv("DEALMAIL_CONFIG", raising=False)
    # Fresh clone: no conf/dealmail.toml -> the example, flagged as a fallback.
    assert find_config_path(None, tmp_path) == (
        tmp_path / "conf" / "dealmail.example.toml", True)
    main = write(tmp_path / "conf", BASE)
    assert find_config_path(None, tmp_path) == (main, False)
    monkeypatch.setenv("DEALMAIL_CONFIG", str(tmp_path / "env.toml"))
    assert find_config_path(None, tmp_path) == (tmp_path / "env.toml", False)
    assert find_config_path(str(tmp_path / "cli.toml"), tmp_path) == (
        tmp_path / "cli.toml", False)


def test_config_resolution_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """check-config names the file it used and flags the example fallback."""
    from dealmail.cli import main

    (tmp_path / "conf").mkdir()
    example = tmp_path / "conf" / "dealmail.example.toml"
    example.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEALMAIL_CONFIG", raising=False)

    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"config: {example} (the example: conf/dealmail.toml not found)"

    own = write(tmp_path / "conf", BASE.replace("Example Inc", "Own Inc"))
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"config: {own}" and "Own Inc" in out

    env = write(tmp_path, BASE.replace("Example Inc", "Env Inc"), "env.toml")
    monkeypatch.setenv("DEALMAIL_CONFIG", str(env))
    assert main(["check-config"]) == 0
    assert "Env Inc" in capsys.readouterr().out

    explicit = write(tmp_path, BASE.replace("Example Inc", "Cli Inc"), "cli.toml")
    assert main(["--config", str(explicit), "check-config"]) == 0
    assert "Cli Inc" in capsys.readouterr().out


def test_sender_verification_sub_table_mistakes_name_their_lines(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace(
        'internal_domains = ["example.com"]\n',
        'internal_domains = ["example.com"]\n\n[companies.sender_verification]\n'
        'minimum = "trust-me"\naccept = ["spf", "dkim"]\non_unverified = "bounce"\n'))
    assert problems_of(path) == [
        f"{path}:10: companies[0].sender_verification.minimum: must be one of none, spf, "
        "trusted-network, arc, upstream, strong",
        f"{path}:11: companies[0].sender_verification.accept[1]: must be one of none, spf, "
        "trusted-network, arc, upstream, strong",
        f"{path}:12: companies[0].sender_verification.on_unverified: must be reject or "
        "quarantine",
    ]


# --------------------------------------------------------------------------- mailboxes


def test_mailbox_blocks_are_read_and_their_mistakes_reported(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace('alternates = ["alice.personal@mail.test"]\n', '''\
alternates = ["alice.personal@mail.test"]
never_track = ["Lawyer.TEST", "hr@other.test", "not an address@"]

[[companies.users.mailboxes]]
provider = "gmail"
username = "alice@example.com"
password_env = "ALICE_IMAP"
folders = ["INBOX"]

[[companies.users.mailboxes]]
provider = "imap"
tls = "plain"
password_file = "a"
password_env = "B"
''') + "\n[imap]\nidle_seconds = 3600\npoll_seconds = 0\n")
    problems = problems_of(path)
    second = line_of(path, "provider = \"imap\"") - 1
    assert f"{path}:{second + 2}: companies[0].users[0].mailboxes[1].tls: must be implicit or " \
           "starttls" in problems
    assert f"{path}:{second}: companies[0].users[0].mailboxes[1]: missing key: username" \
        in problems
    assert any(p.endswith("needs exactly one of password_file, password_env or "
                          "oauth2_refresh_token_file (a password never sits in this file)")
               for p in problems)
    assert any("never_track[2]" in p for p in problems)
    assert any("imap.idle_seconds: must be at most 1740" in p for p in problems)
    assert any("imap.poll_seconds: must be positive" in p for p in problems)
    good = write(tmp_path, BASE.replace('alternates = ["alice.personal@mail.test"]\n', '''\
alternates = ["alice.personal@mail.test"]
never_track = ["Lawyer.TEST", "hr@other.test"]

[[companies.users.mailboxes]]
provider = "gmail"
username = "alice@example.com"
password_env = "ALICE_IMAP"
folders = ["INBOX"]
'''), "good.toml")
    config = load_config(good)
    alice = config.companies[0].users[0]
    assert alice.never_track == ("lawyer.test", "hr@other.test")
    (box,) = alice.mailboxes
    assert (box.provider, box.username, box.folders, box.since_days) == (
        "gmail", "alice@example.com", ("INBOX",), 30)
    assert box.line == line_of(good, "[[companies.users.mailboxes]]")


def test_check_config_reports_a_missing_secret_as_file_line(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    from dealmail.cli import main

    path = write(tmp_path, BASE.replace('alternates = ["alice.personal@mail.test"]\n', f'''\
alternates = ["alice.personal@mail.test"]

[[companies.users.mailboxes]]
provider = "outlook"
username = "alice@example.com"
password_file = "{tmp_path}/missing.txt"

[[companies.users.mailboxes]]
provider = "nosuchmail"
username = "alice@example.com"
password_env = "DEALMAIL_TEST_UNSET_VARIABLE"
'''))
    code = main(["--config", str(path), "--set", f"database.url=sqlite:///{tmp_path}/x.db",
                 "check-config"])
    out, err = capsys.readouterr()
    assert code == 78
    first = line_of(path, "provider = \"outlook\"") - 1
    assert (f"{path}:{first}: companies[0].users[0].mailboxes[0].password_file: cannot read "
            f"{tmp_path}/missing.txt") in err
    assert "mailboxes[1].provider: unknown provider 'nosuchmail'" in err
    assert "mailbox of alice@example.com: alice@example.com at outlook.office365.com:993" in out
