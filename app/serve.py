"""Start the labeling app with its own settings, from any working directory:

    python app/serve.py [--host 127.0.0.1] [--port 8501] [--single-user] [-- --db URL]

Streamlit reads ``.streamlit/config.toml`` only from the working directory; started elsewhere it
would bind every interface. This launcher passes the bind address and the repository's settings
on the command line (highest precedence), so the address is the one asked for, loopback by default.
``--single-user`` (loopback only) signs the local user in without a password.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python app/serve.py` from anywhere
    sys.path.insert(0, str(REPO))

from annotation_db.users import is_loopback  # noqa: E402
# app/asgi.py: the labeling app (app/label.py) plus the slide workspace's tile routes, one server.
APP = REPO / "app" / "asgi.py"
# What .streamlit/config.toml says, so the app behaves the same wherever it is started from.
SETTINGS = {
    "server.headless": "true",
    "server.runOnSave": "false",
    "server.fileWatcherType": "none",
    "runner.postScriptGC": "false",
    "browser.gatherUsageStats": "false",
    "client.toolbarMode": "minimal",
    "theme.primaryColor": "#7b2d8e",
}


def streamlit_argv(host: str, port: int, app_args: list[str]) -> list[str]:
    """The ``streamlit run`` command line for ``host``:``port``."""
    argv = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", host, "--server.port", str(port)]
    for key, value in SETTINGS.items():
        argv += [f"--{key}", value]
    if is_loopback(host):
        argv += ["--browser.serverAddress", host]
    secrets = REPO / ".streamlit" / "secrets.toml"
    if secrets.is_file():
        argv += ["--secrets.files", str(secrets)]
    return argv + (["--", *app_args] if app_args else [])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    app_args: list[str] = []
    if "--" in argv:
        argv, app_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=os.environ.get("GLOM_HOST", "127.0.0.1"),
                        help="address to bind (default $GLOM_HOST, else 127.0.0.1: this computer only)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GLOM_PORT", "8501")))
    parser.add_argument("--single-user", action="store_true",
                        help="no sign-in: everything is attributed to $GLOM_LOCAL_USER (or your login); loopback only")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    env.pop("GLOM_SINGLE_USER", None)
    if args.single_user:
        if not is_loopback(args.host):
            parser.error(f"--single-user needs a loopback address, not {args.host}: with others able to reach "
                         "the app, everyone signs in (create accounts with `glom user add`)")
        env["GLOM_SINGLE_USER"] = "1"
    os.execve(sys.executable, streamlit_argv(args.host, args.port, app_args), env)


if __name__ == "__main__":
    main()
