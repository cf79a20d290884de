"""The processes a benchmark run starts: otabox, and mosquitto and nginx as references.

Each runs in the foreground as a child of the harness, on 127.0.0.1 only, with its files in
the run's temporary folder; `Proc.stop()` ends it (SIGTERM, then SIGKILL) and is idempotent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


class StartError(RuntimeError):
    """A server did not come up; the message says why (and where its log is)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that cannot bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> int:
    """Raise the soft open-file limit to the hard limit; children started later inherit it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class Proc:
    """A child process with its log file, memory and CPU readings from /proc."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log
        self.pid = popen.pid
        self.ports: dict[str, int] = {}  # otabox: its ports.json

    def alive(self) -> bool:
        return self.popen.poll() is None

    def _status(self, field: str) -> int:
        """A kB field of /proc/<pid>/status (VmRSS, VmHWM) in bytes; 0 once the process is gone."""
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def rss(self) -> int:
        return self._status("VmRSS")

    def hwm(self) -> int:
        """Peak RSS since the process started."""
        return self._status("VmHWM")

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the process and its live children (nginx's worker)."""
        return sum(_cpu(pid) for pid in self._tree())

    def _tree(self) -> list[int]:
        pids = [self.pid]
        for pid in pids:  # grows while iterating: children, grandchildren, ...
            try:
                with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as fh:
                    pids += [int(c) for c in fh.read().split()]
            except OSError:
                pass
        return pids

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL. Safe to call twice."""
        if self.popen.poll() is not None:
            return
        try:
            self.popen.send_signal(signal.SIGTERM)
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
        except ProcessLookupError:
            pass

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def _spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> Proc:
    fh = open(log, "wb")  # noqa: SIM115 - the child keeps writing after this returns
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # Ctrl-C in the terminal reaches the harness only; it stops the children
        )
    finally:
        fh.close()
    return Proc(name, popen, log)


def _wait_port(proc: Proc, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(f"{proc.name} exited with {proc.popen.returncode}; log {proc.log}:\n{proc.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    proc.stop()
    raise StartError(f"{proc.name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s; log {proc.log}")


# ---------------------------------------------------------------- otabox


def start_otabox(
    work: Path, token: str, log_level: str = "INFO", timeout: float = 30.0, tls: bool = False
) -> tuple[Proc, int, int]:
    """`python -m otabox serve` on free ports with a fresh data dir; returns (proc, http port, mqtt port).

    With `tls`, also MQTT over TLS and HTTPS (`--tls-self-signed 127.0.0.1`: otabox's own CA and
    an ECDSA P-256 server certificate); `proc.ports` holds every port of ports.json ("mqtts", "https").
    """
    data = work / "otabox-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTABOX_")}
    env["OTABOX_ADMIN_TOKEN"] = token
    argv = [
        sys.executable,
        "-m",
        "otabox",
        "serve",
        "--data-dir",
        str(data),
        "--host",
        "127.0.0.1",
        "--http-port",
        "0",
        "--mqtt-port",
        "0",
        "--log-level",
        log_level,
    ]
    if tls:
        argv += ["--tls-self-signed", "127.0.0.1,localhost", "--mqtts-port", "0", "--https-port", "0"]
    proc = _spawn("otabox", argv, work / "otabox.log", env=env, cwd=REPO)
    ports_file = data / "ports.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(f"otabox exited with {proc.popen.returncode}; log {proc.log}:\n{proc.tail()}")
        if ports_file.exists():
            try:
                ports = json.loads(ports_file.read_text())
                http, mqtt = int(ports["http"]), int(ports["mqtt"])
                if tls:
                    int(ports["mqtts"])  # KeyError until the TLS listener is up
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        proc.ports = {k: int(v) for k, v in ports.items() if isinstance(v, int)}
                        return proc, http, mqtt
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.1)
    proc.stop()
    raise StartError(f"otabox did not become ready within {timeout:.0f}s; log {proc.log}:\n{proc.tail()}")


# ---------------------------------------------------------------- references (Debian packages)


def ensure_debian(binaries: dict[str, str]) -> dict[str, str | None]:
    """Path of each binary (name -> Debian package), installing the missing packages with apt-get.

    `apt-get update` runs only when the first install fails. Debian's packages may try to start
    their services on install; in containers policy-rc.d refuses, elsewhere we stop nothing we
    did not start, so the references always run as our own foreground processes on other ports.
    """
    found: dict[str, str | None] = {b: _which(b) for b in binaries}
    missing = sorted({binaries[b] for b, p in found.items() if p is None})
    if missing:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            print(f"bench: {', '.join(missing)} missing and cannot be installed (not root / no apt-get)", flush=True)
            return found
        print(f"bench: installing {', '.join(missing)} (apt-get)", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", *missing]
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=False)
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=False)
        found = {b: _which(b) for b in binaries}
    return found


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def start_mosquitto(binary: str, work: Path) -> tuple[Proc, int]:
    """mosquitto on a free 127.0.0.1 port: anonymous, no connection limit, no persistence."""
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(
        "\n".join(
            [
                "per_listener_settings false",
                f"listener {port} 127.0.0.1",
                "allow_anonymous true",
                "max_connections -1",
                "max_queued_messages 0",  # the one collector of device messages must not drop any
                "set_tcp_nodelay true",  # as asyncio (otabox, the clients) does: no Nagle delay on round trips
                "persistence false",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                "",
            ]
        )
    )
    proc = _spawn("mosquitto", [binary, "-c", str(conf)], work / "mosquitto.log")
    _wait_port(proc, port, 15)
    return proc, port


def start_nginx(binary: str, work: Path, root: Path) -> tuple[Proc, int]:
    """nginx on a free 127.0.0.1 port serving `root` under /fw/ (sendfile), one worker like otabox's one process."""
    port = free_port()
    prefix = work / "nginx"
    prefix.mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""  # otabox's data dir is 0700: the worker must be able to read it
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    types {{ application/octet-stream bin; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        location /fw/ {{ alias {root}/; }}
    }}
}}
"""
    )
    proc = _spawn("nginx", [binary, "-p", str(prefix), "-c", str(conf)], work / "nginx.log")
    _wait_port(proc, port, 15)
    return proc, port


def start_profiler(proc: Proc, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    """`py-spy record` of `proc` for `seconds` into `out` (collapsed stacks); None when py-spy is missing."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return None
    argv = [spy, "record", "--pid", str(proc.pid), "--duration", str(max(1, int(seconds)))]
    argv += ["--format", "raw", "--output", str(out), "--nonblocking"]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
