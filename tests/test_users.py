"""Accounts in the store (SQLite and PostgreSQL): argon2id hashes, never the password; roles;
an imported annotator becomes an account and keeps its labels; `glom user` on the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import select

from annotation_db import store, users
from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.models import Annotator, Label

PASSWORD = "correct horse battery"


@pytest.fixture
def Session(store_url):  # noqa: N802
    engine = create_store_engine(store_url)
    upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_passwords_are_stored_as_argon2id_hashes_and_checked(Session):
    with Session() as s, s.begin():
        users.add_user(s, "dr_li", PASSWORD, "admin")
    with Session() as s, s.begin():
        row = s.scalar(select(Annotator).where(Annotator.name == "dr_li"))
        assert row.password_hash.startswith("$argon2id$") and PASSWORD not in row.password_hash
        assert row.role == "admin"
        assert users.authenticate(s, "dr_li", PASSWORD).name == "dr_li"
        assert users.authenticate(s, "dr_li", PASSWORD + "x") is None
        assert users.authenticate(s, "nobody", PASSWORD) is None
        assert users.authenticate(s, "dr_li", "") is None
        assert users.list_users(s) == [("dr_li", "admin")]


def test_accounts_refuse_bad_names_roles_and_short_passwords(Session):
    with Session() as s, s.begin():
        users.add_user(s, "dr_li", PASSWORD)
        with pytest.raises(users.AccountError, match="already exists"):
            users.add_user(s, "dr_li", PASSWORD)
        with pytest.raises(users.AccountError, match="at least 8"):
            users.add_user(s, "dr_chen", "short")
        with pytest.raises(users.AccountError, match="unknown role"):
            users.add_user(s, "dr_chen", PASSWORD, "root")
        with pytest.raises(users.AccountError, match="reserved for models"):
            users.add_user(s, "model:abc", PASSWORD)
        with pytest.raises(users.AccountError, match="no account"):
            users.set_role(s, "ghost", "admin")


def test_an_imported_annotator_becomes_an_account_and_keeps_its_labels(Session, bueno_dir):
    with Session() as s, s.begin():
        ds = store.create_dataset(s, "d", ["a", "b"], root=bueno_dir)
        img = store.add_image(s, ds, sorted(bueno_dir.glob("globally_sclerotic/*.png"))[0].relative_to(bueno_dir))
        store.set_label(s, img, "dr_wu", ["a"])
        assert users.authenticate(s, "dr_wu", PASSWORD) is None  # no password: cannot sign in
        assert not users.has_accounts(s)
        users.add_user(s, "dr_wu", PASSWORD, "adjudicator")
    with Session() as s:
        assert users.has_accounts(s)
        account = users.authenticate(s, "dr_wu", PASSWORD)
        assert s.scalar(select(Label.annotator_id)) == account.id
        assert users.may(account.role, "adjudicate") and not users.may(account.role, "import")


def test_roles_grant_what_docs_security_says():
    assert users.may("admin", "import") and users.may("admin", "adjudicate")
    assert not users.may("adjudicator", "import") and users.may("adjudicator", "adjudicate")
    assert users.may("annotator", "label") and not users.may("annotator", "adjudicate")
    assert not users.may(None, "label")


def test_glom_user_on_the_command_line(tmp_path):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    glom = [sys.executable, "-m", "core.cli", "--db", db, "user"]
    out = subprocess.run([*glom, "add", "dr_li", "--role", "admin", "--password-stdin"], input=PASSWORD + "\n",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*glom, "add", "dr_x", "--password-stdin"], input="short\n", capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "at least 8 characters" in out.stderr
    subprocess.run([*glom, "role", "dr_li", "adjudicator"], check=True, capture_output=True, timeout=120)
    out = subprocess.run([*glom, "list"], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines() == ["dr_li\tadjudicator"]
    engine = create_store_engine(db)
    with make_sessionmaker(engine)() as s:
        assert users.authenticate(s, "dr_li", PASSWORD) is not None
    engine.dispose()


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failed_sign_ins_slow_down_the_name_and_the_address():
    clock = _Clock()
    throttle = users.SignInThrottle(free_failures=3, window_s=600, base_delay_s=2, max_delay_s=60, clock=clock)
    for _ in range(3):
        assert throttle.wait_s("dr_li", "10.0.0.7") == 0
        throttle.record("dr_li", "10.0.0.7", ok=False)
    assert throttle.wait_s("dr_li", "10.0.0.7") == 2
    assert throttle.wait_s("DR_LI ", "10.0.0.9") == 2  # the name, from anywhere, any case
    assert throttle.wait_s("dr_wang", "10.0.0.7") == 2  # the address, whatever name it tries
    assert throttle.wait_s("dr_wang", "10.0.0.9") == 0
    clock.now += 2
    throttle.record("dr_li", "10.0.0.7", ok=False)
    assert throttle.wait_s("dr_li", None) == 4  # doubles with each further failure
    for _ in range(10):
        throttle.record("dr_li", None, ok=False)
    assert throttle.wait_s("dr_li", None) == 60  # up to the cap
    clock.now += 601
    assert throttle.wait_s("dr_li", "10.0.0.7") == 0  # failures older than the window are forgotten


def test_a_successful_sign_in_clears_the_name_but_not_the_address():
    clock = _Clock()
    throttle = users.SignInThrottle(free_failures=2, base_delay_s=5, clock=clock)
    for name in ("dr_li", "dr_li", "dr_wang"):
        throttle.record(name, "10.0.0.7", ok=False)
    clock.now += 10
    throttle.record("dr_li", "10.0.0.7", ok=True)
    assert throttle.wait_s("dr_li", None) == 0
    clock.now -= 10
    assert throttle.wait_s("dr_li", "10.0.0.7") == 10  # that address failed three times: 2 free, then 5 s, 10 s


def test_a_session_token_signs_in_until_it_expires_or_the_password_changes(SqliteSession):  # noqa: N803
    secret = b"s" * 32
    with SqliteSession() as s, s.begin():
        token = users.issue_session_token(users.add_user(s, "dr_li", PASSWORD), secret, now=1000.0)
        users.add_user(s, "dr_wang", PASSWORD)
    with SqliteSession() as s:
        assert users.verify_session_token(s, token, secret, now=1000.0 + users.SESSION_TTL_S - 1).name == "dr_li"
        assert users.verify_session_token(s, token, secret, now=1000.0 + users.SESSION_TTL_S + 1) is None
        assert users.verify_session_token(s, token, b"another server's secret" * 2, now=1000.0) is None
        payload, mac = token.split(".")
        forged = users._b64(f"{1000 + users.SESSION_TTL_S}:dr_wang".encode())  # another name, same signature
        for bad in (f"{forged}.{mac}", f"{payload}.{mac[:-2]}xx", "garbage", "", f"{payload}"):
            assert users.verify_session_token(s, bad, secret, now=1000.0) is None, bad
    with SqliteSession() as s, s.begin():
        users.set_password(s, "dr_li", "a new password")
    with SqliteSession() as s:
        assert users.verify_session_token(s, token, secret, now=1000.0) is None  # a new password ends it
