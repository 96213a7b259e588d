"""``kraite-mp init DIR``: an install directory from the files that ship inside the package.

A wheel install has no checkout, so no ``etc/``: the example configuration, the supervisord programs
and the systemd units live in ``kraite_mp/ops/templates/`` (byte-identical to the repository's
``etc/``; a test keeps them so). ``init`` writes, under DIR:

- ``etc/kraite-mp.toml``: the example, with a freshly generated ``secret_key`` (mode 0600). It is
  never overwritten, not even with ``--force``: replacing it would replace the key that decrypts the
  stored API secrets.
- ``etc/supervisord.d/*.conf`` and ``etc/systemd/*.service``: the shipped files with absolute paths,
  DIR and the installed ``kraite-mp`` executable (the one next to this interpreter), instead of
  ``%(here)s/../..`` and ``/opt/kraite-mp/.venv/bin``. Comment lines are left as shipped.
- ``var/run``, ``var/spool`` (0700: they hold account data) and ``var/log``.

Every target is checked before anything is written: an existing file stops ``init`` with one line
and exit 73 (EX_CANTCREAT), unless ``--force``; so does a file or directory that cannot be created.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import click

from kraite_mp import exitcodes
from kraite_mp.ops.cli import fail

EXIT_CANTCREAT = exitcodes.EXIT_CANTCREAT

#: The shipped files, as paths under ``kraite_mp/ops/templates/`` (and under the repository's ``etc/``).
CONFIG_TEMPLATE = "kraite-mp.toml.example"
SUPERVISORD_TEMPLATES = ("supervisord.d/kraite-mp.conf", "supervisord.d/kraite-mp-worker.conf")
SYSTEMD_TEMPLATES = (
    "systemd/kraite-mp.service",
    "systemd/kraite-mp-worker.service",
    "systemd/kraite-mp-reconcile-worker.service",
)
TEMPLATES = (CONFIG_TEMPLATE, *SUPERVISORD_TEMPLATES, *SYSTEMD_TEMPLATES)

#: Where the configuration goes under DIR (the working directory finds it there by itself).
CONFIG_PATH = "etc/kraite-mp.toml"

#: Directories created under DIR with their modes (an existing one is left as it is).
DIRECTORIES: dict[str, int] = {
    "etc": 0o755,
    "etc/supervisord.d": 0o755,
    "etc/systemd": 0o755,
    "var": 0o755,
    "var/run": 0o700,
    "var/spool": 0o700,
    "var/log": 0o750,
}

#: What the shipped files say for the install directory and the executable, longest first.
SUPERVISORD_PLACEHOLDERS = ("%(here)s/../../.venv/bin/kraite-mp", "%(here)s/../..")
SYSTEMD_PLACEHOLDERS = ("/opt/kraite-mp/.venv/bin/kraite-mp", "/opt/kraite-mp")
SYSTEMD_USER_LINE = "User=kraite"

#: A systemd User= name (and a sane Unix one).
USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")

#: The shipped example's secret_key line (commented out at its default).
SECRET_KEY_LINE = re.compile(r'^# ?secret_key = "".*$', re.MULTILINE)


@dataclass(frozen=True)
class Planned:
    """One file ``init`` writes."""

    path: Path
    text: str
    mode: int
    #: The configuration: never overwritten.
    keep: bool = False


def template_text(name: str) -> str:
    """A shipped file's text (``name`` as in ``TEMPLATES``)."""
    return resources.files("kraite_mp.ops").joinpath("templates", name).read_text(encoding="utf-8")


def kraite_command() -> str:
    """The installed ``kraite-mp`` next to this interpreter (a venv's bin or a wheel's scripts
    directory), or this interpreter running the package when there is no such script."""
    script = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "kraite-mp")
    if os.access(script, os.X_OK):
        return script
    return f"{os.path.abspath(sys.executable)} -m kraite_mp"


def unsafe_path(path: str) -> bool:
    """True when supervisord or systemd would read ``path`` as more than a path: they split command
    lines at whitespace and expand or unquote %, $, quotes and backslashes."""
    return any(c.isspace() or c in "\"'\\$%" or not c.isprintable() for c in path)


def _fill(text: str, comment: str, rewrite: Callable[[str], str]) -> str:
    """``text`` with ``rewrite`` applied to every line that is not a comment."""
    lines = text.splitlines(keepends=True)
    return "".join(line if line.lstrip().startswith(comment) else rewrite(line) for line in lines)


def render_supervisord(text: str, home: str, command: str) -> str:
    """A shipped supervisord file with absolute paths: ``command`` runs kraite-mp, ``home`` is DIR."""
    exe_placeholder, home_placeholder = SUPERVISORD_PLACEHOLDERS
    return _fill(
        text, ";", lambda line: line.replace(exe_placeholder, command).replace(home_placeholder, home)
    )


def render_systemd(text: str, home: str, command: str, user: str) -> str:
    """A shipped systemd unit with DIR, the executable and ``User=`` filled in."""
    exe_placeholder, home_placeholder = SYSTEMD_PLACEHOLDERS

    def rewrite(line: str) -> str:
        if line.strip() == SYSTEMD_USER_LINE:
            return f"User={user}\n"
        return line.replace(exe_placeholder, command).replace(home_placeholder, home)

    return _fill(text, "#", rewrite)


def render_config(text: str, secret_key: str | None) -> str:
    """The example configuration, with ``secret_key`` set when one is given."""
    if secret_key is None:
        return text
    line = f'secret_key = "{secret_key}"'
    filled = SECRET_KEY_LINE.sub(line, text, count=1)
    try:
        if tomllib.loads(filled).get("secret_key") == secret_key:
            return filled
    except tomllib.TOMLDecodeError:
        pass
    # the example no longer has that line where a top-level key belongs: a top-level key goes first
    return f"{line}\n{text}"


def plan(home: Path, command: str, user: str, secret_key: str | None, header: str) -> list[Planned]:
    """Every file ``init`` writes under ``home``, rendered."""
    etc = home / "etc"
    files = [
        Planned(
            etc / "kraite-mp.toml",
            f"## {header}\n" + render_config(template_text(CONFIG_TEMPLATE), secret_key),
            0o600,
            keep=True,
        )
    ]
    for name in SUPERVISORD_TEMPLATES:
        text = render_supervisord(template_text(name), str(home), command)
        files.append(Planned(etc / name, f"; {header}\n{text}", 0o644))
    for name in SYSTEMD_TEMPLATES:
        text = render_systemd(template_text(name), str(home), command, user)
        files.append(Planned(etc / name, f"# {header}\n{text}", 0o644))
    return files


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create ``path`` (it must not exist) with exactly ``mode``; a partial file is removed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away: the mode is part of what we promise
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _replace(path: Path, text: str, mode: int) -> None:
    """Replace ``path`` atomically (a reader sees the old file or the new one, never half)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_user(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not USER_NAME.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not a user name")
    return value


@click.command("init")
@click.argument("directory", type=click.Path())
@click.option(
    "--force", is_flag=True, help="Overwrite the supervisord and systemd files (never etc/kraite-mp.toml)."
)
@click.option(
    "--user",
    default="kraite",
    show_default=True,
    callback=_check_user,
    help="User= of the systemd units (the user that owns DIR/var).",
)
@click.option(
    "--secret-key/--no-secret-key",
    default=True,
    show_default=True,
    help="Put a new secret_key in etc/kraite-mp.toml (--no-secret-key: give it as KRAITE_SECRET_KEY).",
)
@click.pass_context
def init_cmd(ctx: click.Context, directory: str, force: bool, user: str, secret_key: bool) -> None:
    """Write an install directory DIR: etc/kraite-mp.toml, the supervisord programs, the systemd units
    (with the paths of DIR and of this kraite-mp) and var/. Never overwrites a file without --force."""
    import kraite_mp

    home = Path(os.path.abspath(directory))
    command = kraite_command()
    if unsafe_path(str(home)):
        fail(
            ctx,
            f"cannot use {str(home)!r}: supervisord and systemd cannot hold whitespace, quotes, '\\', '$' "
            "or '%' in a path; choose another directory",
            exitcodes.EXIT_FATAL_CONFIG,
        )
    if unsafe_path(command):
        fail(
            ctx,
            f"the kraite-mp executable's path {command!r} holds whitespace, quotes, '\\', '$' or '%', which "
            "supervisord and systemd cannot run; install kraite-mp elsewhere",
            exitcodes.EXIT_FATAL_CONFIG,
        )
    key: str | None = None
    if secret_key:
        from kraite_mp.store.accounts import generate_secret_key

        key = generate_secret_key()
    header = f"Written by `kraite-mp init {home}` (kraite-mp {kraite_mp.__version__})."
    files = plan(home, command, user, key, header)

    existing = {f.path for f in files if f.path.exists() or f.path.is_symlink()}
    blocking = [f for f in files if f.path in existing and (not force or (f.keep and not f.path.is_file()))]
    if blocking:
        more = f" (and {len(blocking) - 1} more)" if len(blocking) > 1 else ""
        hint = "" if force else "; --force overwrites the supervisord and systemd files"
        fail(ctx, f"{blocking[0].path} exists{more}: nothing written{hint}", EXIT_CANTCREAT)

    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(ctx, f"cannot create {home}: {e.strerror or e}", EXIT_CANTCREAT)
    for name, mode in DIRECTORIES.items():
        path = home / name
        try:
            path.mkdir(mode=mode)
        except FileExistsError:
            if not path.is_dir():
                fail(ctx, f"cannot create {path}: a file of that name exists", EXIT_CANTCREAT)
            continue
        except OSError as e:
            fail(ctx, f"cannot create {path}: {e.strerror or e}", EXIT_CANTCREAT)
        path.chmod(mode)  # mkdir's mode goes through the umask
        click.echo(f"created {path}/ ({mode:04o})")

    for f in files:
        done = "wrote"
        try:
            if f.path in existing:
                if f.keep:
                    click.echo(
                        f"kept {f.path} (it exists and holds the secret_key: init never overwrites it)"
                    )
                    continue
                _replace(f.path, f.text, f.mode)
                done = "overwrote"
            else:
                _write_new(f.path, f.text, f.mode)
        except OSError as e:
            fail(ctx, f"cannot write {f.path}: {e.strerror or e}", EXIT_CANTCREAT)
        note = ", with a new secret_key" if f.keep and key else ""
        click.echo(f"{done} {f.path} ({f.mode:04o}{note})")

    config = home / CONFIG_PATH
    click.echo("next:")
    click.echo(f"  $EDITOR {config}   # database_url, redis_url, redis_namespace")
    click.echo(f"  cd {home} && {command} db migrate && {command} check-config --connect")
    click.echo(
        f"  supervisord: printf '[include]\\nfiles = {home}/etc/supervisord.d/*.conf\\n'"
        " > /etc/supervisor/conf.d/kraite-mp.conf"
    )
    click.echo(
        f"  or systemd:  cp {home}/etc/systemd/*.service /etc/systemd/system/ && systemctl daemon-reload"
        " && systemctl enable --now kraite-mp-worker kraite-mp-reconcile-worker kraite-mp"
    )
    if os.geteuid() == 0 and user != "root":
        click.echo(f"  as root: chown -R {user} {home}/var {config}   # the service runs as {user}")
