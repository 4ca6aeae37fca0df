"""Real processes for tests: free ports, redis-server, mlxmux gateways and sim nodes.

Everything binds 127.0.0.1 on a port the OS says is free; nothing touches 6379.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class Proc:
    """A child process whose output goes to a log file that is printed if a test needs it."""

    def __init__(self, args: Sequence[str], port: int, env: dict[str, str] | None = None, name: str = "proc") -> None:
        self.args = list(args)
        self.port = port
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"mlxmux-{name}-", suffix=".log")[1])
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        self._log = self.log_path.open("wb")
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 20.0) -> Proc:
        try:
            wait_for_port(self.port, timeout, self.proc)
        except Exception as exc:
            raise RuntimeError(f"{self.name} did not start: {exc}\n{self.output()}") from exc
        return self

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


def mlxmux(*args: str, port: int, env: dict[str, str] | None = None, name: str = "mlxmux") -> Proc:
    """Start `mlxmux <args>` (run from this checkout) as a child process."""
    return Proc([sys.executable, "-m", "proxy.cli", *args], port=port, env=env, name=name)


def sim_node(*extra: str, port: int | None = None, name: str = "sim") -> Proc:
    port = port or free_port()
    return mlxmux("sim-node", "--port", str(port), *extra, port=port, name=name).wait_ready()


def gateway(*nodes: str, port: int | None = None, extra: Sequence[str] = (), env: dict[str, str] | None = None) -> Proc:
    port = port or free_port()
    args = ["serve", "--port", str(port)]
    for n in nodes:
        args += ["--node", n]
    p = mlxmux(*args, *extra, port=port, env=env, name="gateway").wait_ready()
    wait_http_ok(p.url + "/health")
    return p


def wait_http_ok(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=1.0)
            if r.status_code == 200:
                return
            last = r.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not 200 after {timeout}s (last: {last})")


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


@contextlib.contextmanager
def redis_server(password: str | None = None, tls: tuple[str, str] | None = None) -> Iterator[str]:
    """A private redis-server on a free port with no persistence; yields its redis:// URL.

    `password` adds `--requirepass` (the URL carries it); `tls` = (cert file, key file) serves TLS only
    (the URL is rediss://, with the certificate as the CA to trust).
    """
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed: run `bash .ci/run` or `apt-get install -y redis-server`")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mlxmux-redis-") as d:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", d]
        auth = f":{password}@" if password else ""
        url = f"redis://{auth}127.0.0.1:{port}/0"
        if password:
            args += ["--requirepass", password]
        if tls:
            cert, key = tls
            args[1:3] = ["--port", "0", "--tls-port", str(port)]
            args += ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", cert]
            args += ["--tls-auth-clients", "no"]
            url = f"rediss://{auth}127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        with Proc(args, port=port, name="redis") as p:
            p.wait_ready()
            yield url
