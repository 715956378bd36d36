"""``glom user``: sign-in accounts of the labeling app and the viewer (kept in the store).

    glom user add dr_li --role admin          # asks for the password twice
    printf 'secret-pw\n' | glom user add dr_chen --password-stdin
    glom user passwd dr_li | glom user role dr_chen adjudicator | glom user list
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence

from annotation_db.db import StoreError
from annotation_db.users import ROLES, add_user, list_users, set_password, set_role


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise StoreError("no terminal to ask for the password: pipe it in with --password-stdin")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise StoreError("the two passwords differ; nothing changed")
    return first


def cmd_user(args: argparse.Namespace) -> int:
    from annotation_db.db import open_store

    with open_store(args.db)() as session, session.begin():
        if args.action == "list":
            for name, role in list_users(session):
                print(f"{name}\t{role}")
            return 0
        if args.action == "add":
            add_user(session, args.name, _password(args), args.role)
            print(f"account {args.name!r} created ({args.role})")
        elif args.action == "passwd":
            set_password(session, args.name, _password(args))
            print(f"password of {args.name!r} changed")
        elif args.action == "role":
            set_role(session, args.name, args.role)
            print(f"{args.name!r} is now {args.role}")
    return 0


def register(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    p = subparsers.add_parser("user", parents=list(parents), help="sign-in accounts (annotator, adjudicator, admin)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", parents=list(parents), help="create an account (the first one: --role admin)")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, default="annotator")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    pw = actions.add_parser("passwd", parents=list(parents), help="set an account's password")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    role = actions.add_parser("role", parents=list(parents), help="change an account's role")
    role.add_argument("name")
    role.add_argument("role", choices=ROLES)
    actions.add_parser("list", parents=list(parents), help="accounts that can sign in, with their roles")
    p.set_defaults(func=cmd_user)
