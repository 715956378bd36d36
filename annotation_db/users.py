"""Sign-in accounts: annotators with a role and an argon2id password hash, kept in the store.

A person signs in as an :class:`~annotation_db.models.Annotator` (the labels they write are
attributed to that row). Annotators created by imports or by models have no password and cannot
sign in. Roles and what each may do:

- ``annotator``: label, see their own queues, export.
- ``adjudicator``: as annotator, plus the disagreement queue and final labels.
- ``admin``: everything, including imports, cutting crops from server slides, accounts, and
  training jobs, a dataset's active model and its suggestion settings (``train``): a job uses the
  server's CPU or GPU for minutes to hours, and the active model changes what every clinician is
  shown while labeling.

Functions take a session; the caller owns the transaction.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import ipaddress
import os
import threading
import time

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select
from sqlalchemy.orm import Session

from annotation_db.db import StoreError
from annotation_db.label_resolution import MODEL_ANNOTATOR_PREFIX, is_model_annotator
from annotation_db.models import Annotator

__all__ = ["ROLES", "PERMISSIONS", "AccountError", "hash_password", "verify_password", "add_user",
           "set_password", "set_role", "authenticate", "has_accounts", "role_of", "may", "list_users",
           "MIN_PASSWORD_CHARS", "local_user_name", "is_loopback", "SignInThrottle",
           "SESSION_TTL_S", "issue_session_token", "verify_session_token"]

ROLES = ("annotator", "adjudicator", "admin")
PERMISSIONS: dict[str, frozenset[str]] = {
    "annotator": frozenset({"label", "export"}),
    "adjudicator": frozenset({"label", "export", "adjudicate"}),
    "admin": frozenset({"label", "export", "adjudicate", "import", "slides", "users", "train"}),
}
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024  # argon2 hashes anything; a cap keeps a sign-in request cheap

_hasher = PasswordHasher()  # argon2id, the library's defaults (RFC 9106 low-memory profile)
# Verified when the name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash("not a password of anyone")


class AccountError(StoreError):
    """An account cannot be created or changed as asked; the message says why."""


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` (salted; the password itself is never stored)."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise AccountError(f"a password may have at most {MAX_PASSWORD_CHARS} characters")
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when ``password`` matches ``password_hash`` (False for no hash or a damaged one)."""
    if not password or len(password) > MAX_PASSWORD_CHARS:
        return False  # refused before any lookup cost, the same for known and unknown names
    try:
        matched = _hasher.verify(password_hash or _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return matched and password_hash is not None


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise AccountError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    return role


def _check_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise AccountError("an account needs a non-empty name")
    if len(name) > 200:
        raise AccountError(f"a name may have at most 200 characters, got {len(name)}")
    if is_model_annotator(name):
        raise AccountError(f"names starting with {MODEL_ANNOTATOR_PREFIX!r} are reserved for models")
    return name


def _get(session: Session, name: str) -> Annotator | None:
    return session.scalar(select(Annotator).where(Annotator.name == name.strip()))


def add_user(session: Session, name: str, password: str, role: str = "annotator") -> Annotator:
    """Create the account ``name``. An annotator already in the store without a password (e.g.
    named by an import) becomes this account and keeps its labels; one with a password is refused."""
    name, role = _check_name(name), _check_role(role)
    hashed = hash_password(password)
    annotator = _get(session, name)
    if annotator is not None and annotator.password_hash:
        raise AccountError(f"an account named {name!r} already exists; change it with `glom user passwd/role`")
    if annotator is None:
        annotator = Annotator(name=name)
        session.add(annotator)
    annotator.password_hash, annotator.role = hashed, role
    session.flush()
    return annotator


def _existing(session: Session, name: str) -> Annotator:
    annotator = _get(session, name)
    if annotator is None:
        raise AccountError(f"no account named {name!r}; create it with `glom user add {name}`")
    return annotator


def set_password(session: Session, name: str, password: str) -> Annotator:
    annotator = _existing(session, name)
    annotator.password_hash = hash_password(password)
    session.flush()
    return annotator


def set_role(session: Session, name: str, role: str) -> Annotator:
    annotator = _existing(session, name)
    annotator.role = _check_role(role)
    session.flush()
    return annotator


def authenticate(session: Session, name: str, password: str) -> Annotator | None:
    """The account ``name`` when ``password`` is its password, else None (same cost either way).

    Hashes made with older argon2 parameters are upgraded on a successful sign-in.
    """
    annotator = _get(session, name) if name and name.strip() else None
    stored = annotator.password_hash if annotator is not None else None
    if not verify_password(stored, password or ""):
        return None
    if _hasher.check_needs_rehash(stored):
        annotator.password_hash = _hasher.hash(password)
    return annotator


def has_accounts(session: Session) -> bool:
    """Whether anyone can sign in with a password (the first admin has been created)."""
    return session.scalar(select(Annotator.id).where(Annotator.password_hash.is_not(None)).limit(1)) is not None


def role_of(session: Session, name: str) -> str | None:
    return session.scalar(select(Annotator.role).where(Annotator.name == name))


def may(role: str | None, action: str) -> bool:
    """Whether ``role`` may do ``action`` (label, export, adjudicate, import, slides, users)."""
    return action in PERMISSIONS.get(role or "", frozenset())


def list_users(session: Session) -> list[tuple[str, str]]:
    """(name, role) of every account that can sign in, by name."""
    rows = session.execute(
        select(Annotator.name, Annotator.role).where(Annotator.password_hash.is_not(None)).order_by(Annotator.name))
    return [(name, role) for name, role in rows]


def is_loopback(host: str | None) -> bool:
    """Whether a server bound to ``host`` is reachable from this machine only ("" or None: every
    interface, so not loopback)."""
    host = (host or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_user_name() -> str:
    """Who single-user mode attributes labels to: ``$GLOM_LOCAL_USER``, else the login name."""
    name = os.environ.get("GLOM_LOCAL_USER", "").strip()
    if not name:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):
            name = "local"
    return name


class SignInThrottle:
    """Failed sign-ins counted per name and per client address: after ``free_failures`` within
    ``window_s``, the next attempt waits ``base_delay_s``, doubling with each further failure up
    to ``max_delay_s``. While a key must wait, the attempt is refused before any password is
    checked (an attacker gets no answer and costs no hashing); a success clears the name's count.

    Kept in the server's memory (one labeling server process; a restart forgets), thread-safe::

        wait = throttle.wait_s(name, address)     # > 0: refuse, "try again in N s"
        throttle.record(name, address, ok=False)
    """

    def __init__(self, free_failures: int = 5, window_s: float = 900.0, base_delay_s: float = 2.0,
                 max_delay_s: float = 300.0, clock=None) -> None:  # clock: a time.monotonic-like callable
        self.free_failures, self.window_s = free_failures, window_s
        self.base_delay_s, self.max_delay_s = base_delay_s, max_delay_s
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}  # key -> times of recent failures

    @staticmethod
    def _keys(name: str, address: str | None) -> list[str]:
        keys = [f"name:{name.strip().casefold()}"]
        if address:
            keys.append(f"address:{address}")
        return keys

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(key, ()) if now - t < self.window_s]
        if times:
            self._failures[key] = times
        else:
            self._failures.pop(key, None)
        return times

    def wait_s(self, name: str, address: str | None = None) -> float:
        """Seconds before ``name`` from ``address`` may try again (0: now)."""
        now = self._clock()
        with self._lock:
            wait = 0.0
            for key in self._keys(name, address):
                times = self._recent(key, now)
                over = len(times) - self.free_failures
                if over >= 0:
                    delay = min(self.max_delay_s, self.base_delay_s * 2 ** over)
                    wait = max(wait, times[-1] + delay - now)
            return max(0.0, wait)

    def record(self, name: str, address: str | None, *, ok: bool) -> None:
        """Count a failed attempt, or clear the name's failures after a successful one (the
        address keeps its count: one address guessing many names stays slowed down)."""
        now = self._clock()
        with self._lock:
            if ok:
                self._failures.pop(self._keys(name, None)[0], None)
                return
            for key in self._keys(name, address):
                self._recent(key, now)
                self._failures.setdefault(key, []).append(now)


SESSION_TTL_S = 12 * 3600  # a signed-in browser stays signed in across reloads for a working day


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _session_mac(secret: bytes, payload: str, password_hash: str) -> str:
    # The account's password hash is part of the key: a new password ends every earlier session.
    return _b64(hmac.new(secret, payload.encode("ascii") + b"\0" + password_hash.encode(), hashlib.sha256).digest())


def issue_session_token(account: Annotator, secret: bytes, *, ttl_s: float = SESSION_TTL_S,
                        now: float | None = None) -> str:
    """A token that proves ``account`` signed in with its password, until ``ttl_s`` from now:
    its name and expiry, signed (HMAC-SHA256) with ``secret`` and the account's password hash."""
    if not account.password_hash:
        raise AccountError(f"{account.name!r} has no password: it cannot sign in")
    expires = int((time.time() if now is None else now) + ttl_s)
    payload = _b64(f"{expires}:{account.name}".encode())
    return f"{payload}.{_session_mac(secret, payload, account.password_hash)}"


def verify_session_token(session: Session, token: str, secret: bytes, *, now: float | None = None) -> Annotator | None:
    """The account a token from :func:`issue_session_token` names, when its signature holds, it
    has not expired and the account's password has not changed since; else None."""
    try:
        payload, mac = token.split(".")
        expires, name = _unb64(payload).decode().split(":", 1)
        expired = int(expires) < (time.time() if now is None else now)
    except (ValueError, UnicodeDecodeError):
        return None
    if expired:
        return None
    annotator = _get(session, name) if name.strip() else None
    if annotator is None or not annotator.password_hash:
        return None
    if not hmac.compare_digest(mac, _session_mac(secret, payload, annotator.password_hash)):
        return None
    return annotator
