"""Run every benchmark in bench/ and write docs/BENCHMARKS.md (``make bench``).

Each ``bench/<name>.py`` prints one markdown section on stdout (progress on stderr). This runner
starts them one after the other (never in parallel: they measure the same machine), shows their
progress live, and writes their sections, together with the machine they ran on and the date, into
one document. A script that fails or times out does not stop the others: its section says so, with
the end of its stderr, and the runner exits 1 after writing the document.

Usage::

    .venv/bin/python bench/run_all.py [--only mark_price --only supervisor_memory]
        [--args "supervisor_memory=--accounts 10,100"] [--timeout 3600] [--output docs/BENCHMARKS.md]

The scripts find PostgreSQL and Redis themselves (their docstrings say how); the machine section
reports the versions at ``KRAITE_BENCH_DATABASE_URL`` / ``KRAITE_BENCH_REDIS_URL`` (defaults: the
local servers on the standard ports). The longest are ``mass_reconnect`` and ``fleet_failover`` (about
half an hour each at their defaults); ``fleet_failover`` needs root (its hosts are network namespaces)
and otherwise prints a section that says it did not run. ``--only`` / ``--args`` shorten a run.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUTPUT = ROOT / "docs" / "BENCHMARKS.md"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: One benchmark may run this long before it is stopped (SIGTERM, then SIGKILL to its group).
DEFAULT_TIMEOUT_SECS = 3600.0
#: After SIGTERM on timeout, wait this long before SIGKILL.
KILL_GRACE_SECS = 20.0
#: Lines of stderr kept for the report of a failed script.
STDERR_TAIL_LINES = 40
#: Probing the services for their versions must not hang the run.
PROBE_TIMEOUT_SECS = 3


@dataclass
class Result:
    script: str
    command: list[str]
    returncode: int | None = None
    seconds: float = 0.0
    stdout: str = ""
    stderr_tail: list[str] = field(default_factory=list)
    timed_out: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None and not self.timed_out and self.returncode == 0 and bool(self.stdout.strip())
        )

    def status(self) -> str:
        if self.error:
            return f"could not start: {self.error}"
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s"
        if self.returncode != 0:
            return f"failed: exit code {self.returncode} after {self.seconds:.0f} s"
        if not self.stdout.strip():
            return f"printed nothing (exit code 0 after {self.seconds:.0f} s)"
        return f"ok in {self.seconds:.0f} s"


def discover(bench_dir: Path, only: list[str]) -> list[Path]:
    scripts = sorted(
        p for p in bench_dir.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_")
    )
    if only:
        wanted = {o.removesuffix(".py") for o in only}
        unknown = wanted - {p.stem for p in scripts}
        if unknown:
            raise SystemExit(
                f"run_all: no such benchmark(s): {', '.join(sorted(unknown))} "
                f"(have: {', '.join(p.stem for p in scripts)})"
            )
        scripts = [p for p in scripts if p.stem in wanted]
    return scripts


def _pump(stream: IO[bytes], sink: IO[str] | None, keep: Any) -> None:
    """Copy lines from ``stream`` to ``sink`` (live) and into ``keep`` (a list or a bounded deque)."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        keep.append(line)
        if sink is not None:
            sink.write(line)
            sink.flush()
    stream.close()


def run_script(script: Path, extra_args: list[str], timeout_s: float, python: str = sys.executable) -> Result:
    command = [python, str(script), *extra_args]
    result = Result(script=script.name, command=command)
    sys.stderr.write(f"\n=== {script.name}: {shlex.join([Path(python).name, *command[1:]])}\n")
    sys.stderr.flush()
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            command,
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as e:
        result.error = str(e)
        return result
    out_lines: list[str] = []
    err_lines: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        threading.Thread(target=_pump, args=(proc.stdout, None, out_lines), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, err_lines), daemon=True),
    ]
    for t in readers:
        t.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        result.timed_out = True
        _stop_group(proc)
    except KeyboardInterrupt:
        _stop_group(proc)
        raise
    finally:
        for t in readers:
            t.join(timeout=10)
    result.seconds = time.monotonic() - started
    result.returncode = proc.returncode
    result.stdout = "".join(out_lines)
    result.stderr_tail = [line.rstrip("\n") for line in err_lines]
    sys.stderr.write(f"=== {script.name}: {result.status()}\n")
    return result


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_SECS), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# -- machine ------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def ram_total() -> str:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            kb = int(line.split()[1])
            return f"{kb / 1024 / 1024:.1f} GiB"
    return "unknown"


def postgres_version(url: str) -> str:
    try:
        import psycopg2

        conn = psycopg2.connect(url, connect_timeout=PROBE_TIMEOUT_SECS)
    except Exception as e:  # noqa: BLE001 - any failure is reported, never fatal
        return f"not reachable at the probe URL ({type(e).__name__}); the scripts may have used an embedded server"
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            row = cur.fetchone()
        return f"PostgreSQL {row[0]}" if row else "unknown"
    finally:
        conn.close()


def redis_version(url: str) -> str:
    try:
        import redis

        client = redis.Redis.from_url(
            url, socket_timeout=PROBE_TIMEOUT_SECS, socket_connect_timeout=PROBE_TIMEOUT_SECS
        )
        try:
            return f"Redis {client.info('server').get('redis_version', '?')}"
        finally:
            client.close()
    except Exception as e:  # noqa: BLE001
        return f"not reachable at the probe URL ({type(e).__name__}); the scripts may have used an embedded server"


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=str(ROOT), capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (rev or "unknown") + (" (with uncommitted changes)" if dirty else "")


def package_versions() -> str:
    from importlib import metadata

    parts = []
    for name in ("psycopg2-binary", "redis", "dramatiq", "websocket-client", "setproctitle"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


def machine_info(database_url: str, redis_url: str) -> list[tuple[str, str]]:
    from kraite_mp.config import redact_url

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    return [
        ("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPUs (nproc)", f"{usable} usable of {os.cpu_count()}"),
        ("CPU model", cpu_model()),
        ("RAM", ram_total()),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("PostgreSQL", f"{postgres_version(database_url)} ({redact_url(database_url)})"),
        ("Redis", f"{redis_version(redis_url)} ({redact_url(redis_url)})"),
        ("libraries", package_versions()),
        ("kraite-mp revision", git_revision()),
    ]


# -- document -----------------------------------------------------------------------------------


def render(results: list[Result], machine: list[tuple[str, str]], argv: list[str]) -> str:
    failed = [r for r in results if not r.ok]
    lines = [
        "# kraite-mp benchmarks",
        "",
        "Generated by `make bench` (`bench/run_all.py`); every figure below comes from the script named in its",
        "section, run on the machine described here. Rerun `make bench` to refresh the whole page, or",
        "`.venv/bin/python bench/<name>.py` for one section. Compare ratios measured within one run rather",
        "than absolute numbers across machines.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine],
        "",
        "## Runs",
        "",
        "| script | result |",
        "|---|---|",
        *[f"| `bench/{r.script}` | {r.status()} |" for r in results],
        "",
    ]
    if failed:
        lines += [
            f"**{len(failed)} of {len(results)} benchmark(s) did not complete**; their sections below "
            "show what they printed and the end of their error output.",
            "",
        ]
    for r in results:
        body = r.stdout.strip()
        if r.ok:
            lines += [body, "", f"_`bench/{r.script}`: {r.status()}._", ""]
            continue
        lines += [f"## bench/{r.script}: {r.status()}", ""]
        if body:
            lines += ["Partial output:", "", body, ""]
        if r.stderr_tail:
            lines += ["End of its stderr:", "", "```", *r.stderr_tail, "```", ""]
    lines += [f"<!-- generated by: {shlex.join(['bench/run_all.py', *argv])} -->", ""]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="Run only this benchmark (repeatable; name without .py).",
    )
    parser.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help='Extra arguments for one script, e.g. "supervisor_memory=--accounts 10,100".',
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECS, help="Seconds per script.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--list", action="store_true", help="List the benchmarks and exit.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    scripts = discover(args.bench_dir.resolve(), args.only)
    if args.list:
        for s in scripts:
            print(s.stem)
        return 0
    if not scripts:
        print(f"run_all: no benchmark scripts in {args.bench_dir}", file=sys.stderr)
        return 1
    extra: dict[str, list[str]] = {}
    for spec in args.args:
        name, sep, rest = spec.partition("=")
        if not sep:
            raise SystemExit(f"run_all: --args expects NAME=ARGS, got {spec!r}")
        extra[name.removesuffix(".py")] = shlex.split(rest)
    machine = machine_info(
        os.environ.get("KRAITE_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
        os.environ.get("KRAITE_BENCH_REDIS_URL", DEFAULT_REDIS_URL),
    )
    results = []
    for script in scripts:
        results.append(run_script(script, extra.get(script.stem, []), args.timeout))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(args.output.suffix + ".tmp")
    tmp.write_text(render(results, machine, argv))
    os.replace(tmp, args.output)
    failed = [r for r in results if not r.ok]
    print(
        f"\nwrote {args.output}: {len(results) - len(failed)} of {len(results)} benchmark(s) ok",
        file=sys.stderr,
    )
    for r in failed:
        print(f"  bench/{r.script}: {r.status()}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
