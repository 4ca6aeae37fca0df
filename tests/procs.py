"""Real processes for tests: free ports, redis-server, mlxmux gateways and sim nodes.

Everything binds 127.0.0.1 on a port the OS says is free; nothing touches 6379.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import redis as redis_sync

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


@dataclasses.dataclass
class SentinelSet:
    """A Redis primary, its replicas and the sentinels watching them (`redis_sentinels`)."""

    service: str
    primary: Proc
    replicas: list[Proc]
    sentinels: list[Proc]
    password: str | None = None
    sentinel_password: str | None = None
    tls: tuple[str, str] | None = None

    def url(self, db: int = 0) -> str:
        """The `redis+sentinel://` URL of the set (`rediss+sentinel://` with TLS)."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        query = []
        if self.sentinel_password:
            query.append(f"sentinel_password={self.sentinel_password}")
        if self.tls:
            query.append(f"ssl_ca_certs={self.tls[0]}")
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{auth}{hosts}/{self.service}/{db}" + ("?" + "&".join(query) if query else "")

    def server(self, port: int) -> redis_sync.Redis:
        """A plain client of one of the set's Redis servers (by port)."""
        return self._client(port, self.password)

    def sentinel(self, index: int = 0) -> redis_sync.Redis:
        return self._client(self.sentinels[index].port, self.sentinel_password)

    def _client(self, port: int, password: str | None) -> redis_sync.Redis:
        tls = {"ssl": True, "ssl_ca_certs": self.tls[0]} if self.tls else {}
        return redis_sync.Redis("127.0.0.1", port, password=password, decode_responses=True, socket_timeout=5, **tls)

    def info(self, port: int, section: str) -> dict[str, Any]:
        with contextlib.closing(self.server(port)) as r:
            return dict(r.info(section))

    def primary_port(self, index: int = 0) -> int:
        """The port sentinel `index` names as the primary now."""
        with contextlib.closing(self.sentinel(index)) as s:
            _, port = s.sentinel_get_master_addr_by_name(self.service)
        return int(port)


def _redis_args(binary: str, port: int, d: str, tls: tuple[str, str] | None) -> list[str]:
    args = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", d]
    args += ["--repl-diskless-sync-delay", "0"]  # a replica's first sync at once, not after 5 s
    if tls:
        cert, key = tls
        args += ["--port", "0", "--tls-port", str(port), "--tls-replication", "yes", "--tls-auth-clients", "no"]
        return [*args, "--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", cert]
    return [*args, "--port", str(port)]


@contextlib.contextmanager
def redis_sentinels(
    *,
    sentinels: int = 3,
    replicas: int = 1,
    password: str | None = None,
    sentinel_password: str | None = None,
    tls: tuple[str, str] | None = None,
    down_after_ms: int = 1000,
    service: str = "mlxmux-test",
) -> Iterator[SentinelSet]:
    """A primary, `replicas` replicas and `sentinels` sentinels (`redis-server --sentinel`, quorum: a majority),
    each on a free port of 127.0.0.1 with nothing kept on disk; yields once every sentinel knows the replicas
    and its peers, so a failover can be had at once. `password` is the servers' (`requirepass`, `masterauth`,
    the sentinels' `auth-pass`); `sentinel_password` the sentinels' own; `tls` = (cert, key) serves TLS only."""
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed: run `make redis` or `apt-get install -y redis-server`")
    with tempfile.TemporaryDirectory(prefix="mlxmux-sentinel-") as root, contextlib.ExitStack() as stack:
        auth = ["--requirepass", password, "--masterauth", password] if password else []

        def server(name: str, *extra: str) -> Proc:
            port = free_port()
            d = Path(root, name)
            d.mkdir()
            args = [*_redis_args(binary, port, str(d), tls), *auth, *extra]
            return stack.enter_context(Proc(args, port=port, name=name)).wait_ready()

        primary = server("primary")
        copies = [server(f"replica{i}", "--replicaof", "127.0.0.1", str(primary.port)) for i in range(replicas)]
        found = SentinelSet(service, primary, copies, [], password, sentinel_password, tls)
        for replica in copies:
            _eventually(lambda r=replica: found.info(r.port, "replication")["master_link_status"] == "up")
        quorum = sentinels // 2 + 1
        # Each sentinel is told its peers and the replicas up front, as the lines it writes itself into its
        # config once it has found them (hello messages every 2 s, INFO every 10 s): ready in a moment.
        peers = {free_port(): secrets.token_hex(20) for _ in range(sentinels)}  # port -> sentinel id
        for i, port in enumerate(peers):
            conf = Path(root, f"sentinel{i}.conf")
            lines = [
                "bind 127.0.0.1",
                f"dir {root}",
                f"sentinel myid {peers[port]}",
                f"sentinel monitor {service} 127.0.0.1 {primary.port} {quorum}",
                f"sentinel down-after-milliseconds {service} {down_after_ms}",
                f"sentinel failover-timeout {service} {max(3000, down_after_ms * 3)}",
                *(f"sentinel known-replica {service} 127.0.0.1 {r.port}" for r in copies),
                *(f"sentinel known-sentinel {service} 127.0.0.1 {p} {id_}" for p, id_ in peers.items() if p != port),
            ]
            if tls:
                cert, key = tls
                lines += ["port 0", f"tls-port {port}", "tls-replication yes", "tls-auth-clients no"]
                lines += [f"tls-cert-file {cert}", f"tls-key-file {key}", f"tls-ca-cert-file {cert}"]
            else:
                lines.append(f"port {port}")
            if password:
                lines.append(f'sentinel auth-pass {service} "{password}"')
            if sentinel_password:
                lines.append(f'requirepass "{sentinel_password}"')
            conf.write_text("\n".join(lines) + "\n")
            name = f"sentinel{i}"
            found.sentinels.append(stack.enter_context(Proc([binary, str(conf), "--sentinel"], port, name=name)))
            found.sentinels[-1].wait_ready()

        def ready(index: int) -> bool:
            with contextlib.closing(found.sentinel(index)) as s:
                state = s.sentinel_master(service)
                if int(state["num-slaves"]) < replicas or int(state["num-other-sentinels"]) < sentinels - 1:
                    return False
                return all(not r["is_sdown"] for r in s.sentinel_slaves(service))

        for i in range(sentinels):
            _eventually(lambda i=i: ready(i), what=f"sentinel {i} knows the replicas and its peers")
        with contextlib.closing(found.server(primary.port)) as p:  # writes reach every replica now
            p.set("fixture:replicated", "1")
            _eventually(lambda: p.wait(replicas, 1000) >= replicas, what="a write on every replica")
            p.delete("fixture:replicated")
        yield found


def _eventually(check: Callable[[], bool], timeout: float = 30.0, what: str = "redis replication") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis_sync.RedisError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout}s")
        time.sleep(0.05)
