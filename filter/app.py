"""Composition: build everything from the policy, serve, reload, drain, fork workers (L6).

One process runs one event loop (uvloop when installed). ``server.workers = N`` forks
N worker processes that share the listening ports (SO_REUSEPORT); the parent keeps
the metrics/health listener, aggregates metrics across workers (prometheus-client
multiprocess mode), forwards SIGHUP/SIGTERM and restarts a worker that dies.
Workers watch the parent through a pipe and drain and exit when it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import logging
import os
import resource
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from filter import __version__
from filter.checks.dnsbl import bind_metrics as bind_dnsbl_metrics
from filter.checks.dnsbl import prepare_metrics as prepare_dnsbl_metrics
from filter.checks.dnsbl import run_prober
from filter.checks.registry import build_checks
from filter.frontend import Frontend, Runtime
from filter.httpapi import start_http_api
from filter.limits import ConnectionLimiter, SharedColumn, SharedCounts
from filter.logs import event, flush_logs, setup_logging
from filter.metrics import Metrics, default_metrics, mark_process_dead
from filter.model import UpstreamError
from filter.pipeline import Pipeline
from filter.policy import LoadedPolicy, PolicyError, load_policy
from filter.policy.schema import Policy
from filter.relay import Upstream
from filter.resolver import Resolver
from filter.store import Store
from filter.units import Address

log = logging.getLogger("mailgate.app")

LISTEN_BACKLOG = 1024

#: Signals mailgate handles, blocked from the start of ``serve`` until the process has
#: its handlers: their default actions would kill a process that is still starting (a
#: supervisor killed that way leaves its workers running with nobody to stop them). A
#: blocked signal stays pending and reaches the handler once it is installed.
HANDLED_SIGNALS = frozenset({signal.SIGHUP, signal.SIGTERM, signal.SIGINT})


def tls_context(policy: Policy) -> ssl.SSLContext | None:
    """Server-side TLS for STARTTLS, or None when not configured."""
    tls = policy.server.tls
    if not (tls.cert_file and tls.key_file):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2 renegotiation started by the client costs us a handshake each time for
    # nothing an SMTP client needs (CVE-2011-1473); OpenSSL 3 refuses insecure
    # renegotiation already, this refuses the rest. TLS 1.3 has none.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    return ctx


def build_runtime(
    policy: Policy, metrics: Metrics, generation: int = 1, previous: Runtime | None = None
) -> Runtime:
    checks = build_checks(policy)
    pipeline = Pipeline(checks, policy.server.check_timeout, metrics)
    resolver = previous.resolver if previous is not None else None
    if resolver is None or previous is None or previous.policy.dns != policy.dns:
        # A new resolver only when [dns] changed: the cache survives a reload.
        resolver = Resolver(policy.dns.nameservers, policy.dns.timeout, metrics)
    store = previous.store if previous is not None else None
    if store is None or previous is None or previous.policy.redis != policy.redis:
        # One Redis client (and pool) per process; rebuilt only when [redis] changed.
        # Sessions still holding the old one finish with it; it is closed after that.
        if store is not None:
            _close_later(store)
        store = Store.from_policy(policy.redis, metrics)
    return Runtime(policy, pipeline, tls_context(policy), generation, resolver, store)


def prepare_metrics(metrics: Metrics, runtime: Runtime) -> None:
    """Create at 0 the series ``runtime``'s policy can move: its checks' results, its zones'.

    Prometheus sees a labelled series only once it exists, so without this rate() and
    the dashboard read "no data" after a start or restart, and the first count was lost
    to rate(). Called at start and after each good reload (new checks, new zones) by
    each serving process: the single one, or every worker (the supervisor's /metrics
    sums their files). A series of a check or zone the reload dropped stays until the
    restart.
    """
    policy = runtime.policy
    metrics.prepare_checks(c.name for c in runtime.pipeline.checks)
    prepare_dnsbl_metrics(policy.dnsbl.zones if policy.dnsbl.enabled else ())


def check_runtime(policy: Policy) -> None:
    """Raise what ``build_runtime`` would refuse ``policy`` for, building nothing that serves.

    The supervisor judges a reload with it before its workers do (one SIGHUP, one
    count), and a worker restarted later starts from a policy that can run.
    """
    build_checks(policy)
    tls_context(policy)


def _close_later(store: Store, delay: float = 120.0) -> None:
    async def close() -> None:
        await asyncio.sleep(delay)
        await store.aclose()

    task = asyncio.get_running_loop().create_task(close())
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


_BACKGROUND: set[asyncio.Task[None]] = set()


def bind_socket(addr: Address, reuse_port: bool) -> socket.socket:
    """A listening socket; IPv6 wildcard listeners stay IPv6-only so ``0.0.0.0`` can coexist."""
    infos = socket.getaddrinfo(
        addr.host or None, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def worker_limits(policy: Policy) -> tuple[int, int]:
    """The connection limits: the whole of each, against counts shared by all workers.

    Not a 1/N share per worker: SO_REUSEPORT spreads one client's connections over the
    workers unevenly, so a share refused clients well below ``max_connections_per_ip``
    (4 connections against 2 workers with a share of 2 each: refused 5 times in 8).
    """
    srv = policy.server
    return srv.max_connections, srv.max_connections_per_ip


def open_listeners(listen: Iterable[Address], reuse_port: bool) -> list[socket.socket]:
    """Bind every listener; raise OSError naming the address that failed.

    The shipped default also listens on ``[::]:25``; on a host without IPv6 that one
    listener is skipped with a warning instead of refusing to start.
    """
    sockets: list[socket.socket] = []
    for addr in listen:
        try:
            sockets.append(bind_socket(addr, reuse_port))
        except OSError as exc:
            if addr.host == "::" and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                log.warning("skipping listener %s: no IPv6 on this host (%s)", addr, exc)
                continue
            for sock in sockets:
                sock.close()
            raise OSError(exc.errno, f"{addr}: {exc.strerror}") from exc
    if not sockets:
        raise OSError(errno.EADDRNOTAVAIL, "no listener could be opened")
    return sockets


class CapabilityCache:
    """The extensions the upstream offered last time we talked to it (shared by sessions)."""

    def __init__(self) -> None:
        self.extensions: Mapping[str, str] = {}  # keyword -> parameters ("SIZE": "10240000")
        self.checked_at = 0.0

    def get(self) -> Mapping[str, str]:
        return self.extensions

    def update(self, up: Upstream) -> None:
        self.extensions = dict(up.capabilities.extensions)
        self.checked_at = time.monotonic()


async def probe_upstream(policy: Policy, caps: CapabilityCache | None = None) -> str | None:
    """Connect, EHLO, QUIT; return None if the upstream answers, else the problem."""
    up = new_upstream(policy, caps)
    try:
        await up.open(None, None)
    except UpstreamError as exc:
        return f"upstream {policy.upstream.address}: {exc.detail}"
    await up.quit()
    return None


def new_upstream(policy: Policy, caps: CapabilityCache | None) -> Upstream:
    u = policy.upstream
    return Upstream(
        u.address.host,
        u.address.port,
        policy.server.effective_hostname,
        u.timeout,
        u.connect_timeout,
        on_capabilities=caps.update if caps else None,
    )


async def probe_store(policy: Policy, store: Store | None = None) -> str | None:
    """PING the store (any URL form: standalone, Sentinel, Cluster); None when it answers."""
    own = store is None
    client = Store.from_policy(policy.redis) if store is None else store
    try:
        if await client.ping():
            return None
        return f"store: {redacted_url(policy.redis.url)} not answering"
    finally:
        if own:
            await client.aclose()


def redacted_url(url: str) -> str:
    """A store URL fit for a log line or /readyz: no user, password or query string."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class Server:
    """The serving process: listeners, sessions, reload and graceful shutdown."""

    def __init__(
        self,
        loaded: LoadedPolicy,
        config: Path,
        metrics: Metrics,
        worker: int | None = None,
        parent_watch: int | None = None,
        generation: int = 1,
        shared_counts: SharedColumn | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.worker = worker
        # A worker's end of the supervisor's pipe: end of file means the supervisor died.
        self.parent_watch = parent_watch
        self.runtime = build_runtime(loaded.policy, metrics, generation)
        self.limiter = ConnectionLimiter(*worker_limits(loaded.policy), shared=shared_counts)
        self.caps = CapabilityCache()
        self.frontend = Frontend(
            lambda: self.runtime,
            metrics,
            self.limiter,
            lambda policy: new_upstream(policy, self.caps),
            self.caps.get,
        )
        self.servers: list[asyncio.Server] = []
        self.http: asyncio.Server | None = None
        self.stopping = asyncio.Event()
        self.background: list[asyncio.Task[None]] = []
        bind_dnsbl_metrics(metrics)
        prepare_metrics(metrics, self.runtime)  # after the binding: it sets zone health

    @property
    def policy(self) -> Policy:
        return self.runtime.policy

    async def start(self, sockets: list[socket.socket], http: socket.socket | None) -> None:
        """Serve SMTP on ``sockets`` and, when given, metrics and health on ``http``."""
        loop = asyncio.get_running_loop()
        for sock in sockets:
            server = await loop.create_server(self.frontend.protocol_factory, sock=sock)
            self.servers.append(server)
        if http is not None:
            self.http = await start_http_api(http, self.metrics, self.readiness)
        self.metrics.policy_generation.set(self.runtime.generation)
        self.background.append(asyncio.create_task(_flush_logs_periodically()))
        # RFC 5782 zone health probes; they follow reloads (policy and resolver re-read).
        self.background.append(
            asyncio.create_task(run_prober(lambda: self.policy, lambda: self.runtime.resolver))
        )
        problem = await probe_upstream(self.policy, self.caps)
        if problem:
            log.warning("upstream not answering at start: %s", problem)

    async def readiness(self) -> list[str]:
        """/readyz: the upstream answers, the store answers, we are not draining.

        While draining the answer is known without probing: a balancer must stop
        sending at once, and the probes would only open upstream sessions.
        """
        if self.frontend.draining:
            return [SHUTTING_DOWN]
        found = await asyncio.gather(
            probe_upstream(self.policy, self.caps), probe_store(self.policy, self.runtime.store)
        )
        return [p for p in found if p]

    def reload(self) -> bool:
        """SIGHUP: load and validate the policy; keep the old one on any error."""
        try:
            loaded = load_policy(self.config)
            runtime = build_runtime(
                loaded.policy, self.metrics, self.runtime.generation + 1, self.runtime
            )
        except RELOAD_ERRORS as exc:
            log_reload_refused(exc, worker=self.worker)
            if self.worker is None:  # a worker's SIGHUP is counted by its supervisor
                self.metrics.count_reload(False)
            return False
        old = self.runtime.policy
        for key in ("listen", "workers"):
            if getattr(old.server, key) != getattr(runtime.policy.server, key):
                log.warning("server.%s changed: takes effect after a restart", key)
        if old.metrics != runtime.policy.metrics:
            log.warning("metrics.listen changed: takes effect after a restart")
        self.limiter.resize(*worker_limits(runtime.policy))
        self.runtime = runtime
        prepare_metrics(self.metrics, runtime)
        if self.worker is None:
            self.metrics.count_reload(True, runtime.generation)
        event(
            log, "policy_reload", outcome="ok", generation=runtime.generation, **_who(self.worker)
        )
        return True

    async def drain(self) -> None:
        """Stop accepting SMTP, let sessions finish up to shutdown_grace, then end them.

        The health/metrics listener stays open until the sessions are done: the
        process still serves (/healthz 200), /readyz says "shutting down" so a
        balancer stops sending, and /metrics shows the drain. Background tasks
        (log flushing among them) also run to the end.
        """
        for server in self.servers:
            server.close()
        self.frontend.interrupt_idle()
        tasks = set(self.frontend.tasks)
        event(log, "shutdown", sessions=len(tasks), grace=self.policy.server.shutdown_grace)
        began = time.monotonic()
        cut = 0
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.policy.server.shutdown_grace)
            cut = len(pending)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self.http is not None:
            self.http.close()
        # The last line of a clean stop: its absence in the log means a crash or a kill.
        # sessions_cut counts sessions still open when shutdown_grace ran out.
        level = logging.WARNING if cut else logging.INFO
        event(
            log,
            "stopped",
            level=level,
            sessions_cut=cut,
            seconds=round(time.monotonic() - began, 3),
        )
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)

    def _supervisor_gone(self) -> None:
        """The supervisor's pipe became readable: end of file means it died (even by
        SIGKILL, which it cannot forward). A worker left alone would serve on forever
        with nobody to reload, stop or restart it, so it drains and exits."""
        assert self.parent_watch is not None
        try:
            data = os.read(self.parent_watch, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return  # nothing is ever written; ignore rather than spin
        asyncio.get_running_loop().remove_reader(self.parent_watch)
        event(
            log,
            "supervisor_gone",
            level=logging.ERROR,
            worker=self.worker if self.worker is not None else "",
            pid=os.getpid(),
        )
        self.stopping.set()

    async def serve(self, sockets: list[socket.socket], http: socket.socket | None) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        if self.parent_watch is not None:
            loop.add_reader(self.parent_watch, self._supervisor_gone)
        # serve() and _supervise() start a process with HANDLED_SIGNALS blocked: one that
        # came while it started is delivered now, to its handler.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        await self.start(sockets, http)
        addrs = ", ".join(str(a) for a in self.policy.server.listen)
        event(
            log,
            "started",
            version=__version__,
            listen=addrs,
            upstream=str(self.policy.upstream.address),
            metrics=str(self.policy.metrics.listen) if http is not None else "",
            worker=self.worker if self.worker is not None else "",
            pid=os.getpid(),
            generation=self.runtime.generation,
        )
        await self.stopping.wait()
        await self.drain()
        # Closing the loop puts the default actions back; a late SIGTERM must not turn
        # a clean exit into death by signal.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)


SHUTTING_DOWN = "shutting down"
# What a refused reload can raise: policy errors, unreadable files (TLS keys, lists),
# a TLS key that does not load, a value the runtime cannot build from.
RELOAD_ERRORS = (PolicyError, OSError, ssl.SSLError, ValueError)


def _who(worker: int | None) -> dict[str, Any]:
    """A ``worker`` log field in worker processes, so N copies of a line can be told apart."""
    return {} if worker is None else {"worker": worker}


def log_reload_refused(exc: Exception, worker: int | None = None) -> None:
    """One ``event=policy_reload outcome=error`` line per problem, the old policy stays.

    The ``policy reload refused`` wording stays as ``msg=``: admins grep for it.
    """
    issues = exc.issues if isinstance(exc, PolicyError) else [exc]
    for issue in issues:
        event(
            log,
            "policy_reload",
            logging.ERROR,
            message="policy reload refused",
            outcome="error",
            issue=str(issue) or type(issue).__name__,
            **_who(worker),
        )


async def _flush_logs_periodically(interval: float = 0.25) -> None:
    """Log lines are written in batches (filter.logs); never let them lag behind long."""
    try:
        while True:
            await asyncio.sleep(interval)
            flush_logs()
    finally:
        flush_logs()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()


def _quiet_gc() -> None:
    """Keep the garbage collector's pauses out of the message latency tail.

    Everything imported and built at start-up lives as long as the process; freezing it
    keeps full collections from walking it again and again, and a larger first
    generation makes collections rarer (per-message objects are short-lived and
    freed by reference counting anyway).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


# Descriptors one session may hold at once: the client, the upstream, a DNS socket.
FDS_PER_SESSION = 3
FDS_SPARE = 64  # listeners, Redis pool, metrics, logs


def raise_open_files_limit(max_connections: int) -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one; warn when it cannot cover the sessions.

    Debian's default soft limit is 1024, below what ``max_connections`` (1000) needs;
    out of descriptors, the event loop accepts and at once closes connections, with no
    reply and no log line. Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d: %s", soft, exc)
    need = max_connections * FDS_PER_SESSION + FDS_SPARE
    if soft < need:
        log.warning(
            "open files limit %d is below the %d that server.max_connections = %d needs: "
            "connections past it are dropped without a reply (raise LimitNOFILE / ulimit -n)",
            soft,
            need,
            max_connections,
        )
    return soft


def _run(coro_factory: Callable[[], object]) -> None:
    _quiet_gc()
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(coro_factory())  # type: ignore[arg-type]


def serve(loaded: LoadedPolicy, config: Path) -> int:
    """``mailgate serve``: bind, then run one process or a parent with workers.

    ``HANDLED_SIGNALS`` are blocked until the process has its handlers (``Server.serve``,
    or the supervisor's loop): a SIGHUP sent while mailgate starts is then a reload once
    it runs, and a SIGTERM a graceful stop, instead of their default action, which is to
    kill the process (a supervisor killed while forking would orphan its workers).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    policy = loaded.policy
    setup_logging(policy.logging.format, policy.logging.level)
    raise_open_files_limit(policy.server.max_connections)
    workers = policy.server.workers
    try:
        sockets = open_listeners(policy.server.listen, reuse_port=workers > 1)
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 1
    try:
        # Bound here, like the SMTP listeners, so a taken metrics port is one clear
        # log line and exit 1 instead of a traceback from inside the event loop.
        http = open_listeners([policy.metrics.listen], reuse_port=False)[0]
    except OSError as exc:
        for sock in sockets:
            sock.close()
        log.error("cannot listen for metrics and health checks: %s", exc)
        return 1
    metrics = default_metrics()
    metrics.build_info.labels(version=__version__).set(1)
    if workers == 1:
        server = Server(loaded, config, metrics)
        _run(lambda: server.serve(sockets, http=http))
        return 0
    # The parent's sockets only proved the addresses are free; each worker binds its
    # own SO_REUSEPORT listener so the kernel balances connections between them.
    for sock in sockets:
        sock.close()
    return _supervise(loaded, config, metrics, http)


class RestartBackoff:
    """When to restart a worker that died: at once, unless it keeps dying young.

    A worker that cannot start (a certificate file deleted after the reload that named
    it, a full disk) would otherwise be forked again five times a second, forever,
    burning a core and flooding the log, as Postfix's master avoids with its
    ``service_throttle_time``. A death within ``FAST`` seconds of the start doubles
    the delay (1, 2, 4 … ``LONGEST`` s); a worker that lived longer resets it.
    """

    FAST = 10.0
    LONGEST = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.born: dict[int, float] = {}
        self.fast_deaths: dict[int, int] = {}

    def started(self, index: int) -> None:
        self.born[index] = self.clock()

    def delay(self, index: int) -> float:
        """Seconds to wait before restarting worker ``index``, which just died."""
        lived = self.clock() - self.born.get(index, float("-inf"))
        if lived >= self.FAST:
            self.fast_deaths[index] = 0
            return 0.0
        deaths = self.fast_deaths[index] = self.fast_deaths.get(index, 0) + 1
        return min(self.LONGEST, 2.0 ** (deaths - 1))


@dataclass
class _Current:
    """What the supervisor hands a worker it (re)starts: the last good policy, its generation."""

    loaded: LoadedPolicy
    generation: int = 1


def _with_listen(loaded: LoadedPolicy, listen: tuple[Address, ...]) -> LoadedPolicy:
    """``loaded`` with ``server.listen`` as bound: the worker logs and compares what it serves."""
    if loaded.policy.server.listen == listen:
        return loaded
    server = dataclasses.replace(loaded.policy.server, listen=listen)
    return dataclasses.replace(loaded, policy=dataclasses.replace(loaded.policy, server=server))


def _supervise(loaded: LoadedPolicy, config: Path, metrics: Metrics, http: socket.socket) -> int:
    """Parent of ``server.workers`` processes: fork, forward signals, restart, aggregate.

    ``HANDLED_SIGNALS`` stay blocked (see ``serve``) until a process has its handlers:
    their default action would kill a supervisor or worker that is still starting. A
    blocked signal is kept pending and delivered (a reload, a stop) once the handler is
    in place. A worker restarted after a crash starts with the policy of the last good
    reload, not the first one.

    Every worker holds the read end of a pipe whose write end only the supervisor
    keeps: when the supervisor dies, however it dies, the workers read end of file and
    drain and exit instead of serving on as orphans (``Server._supervisor_gone``).
    """
    children: dict[int, int] = {}
    current = _Current(loaded)
    # A restarted worker serves the ports its siblings serve: server.listen changes
    # take effect when mailgate restarts, not one worker at a time.
    listen = loaded.policy.server.listen
    # The connection limits hold for the whole server, not per worker.
    counts = SharedCounts(loaded.policy.server.workers)
    restarts = RestartBackoff()
    watch_read, watch_write = os.pipe()
    os.set_blocking(watch_read, False)

    def spawn(index: int) -> None:
        flush_logs()  # a child must not inherit (and repeat) buffered lines
        counts.clear(index)  # what a dead worker of this index counted died with it
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        else:  # child: its own loop, no HTTP listener; signals blocked until it serves
            code = 0
            http.close()  # the parent's: metrics and health are served there
            os.close(watch_write)  # only the supervisor may keep the pipe open
            try:
                policy = _with_listen(current.loaded, listen)
                sockets = open_listeners(listen, reuse_port=True)
                server = Server(
                    policy,
                    config,
                    metrics,
                    worker=index,
                    parent_watch=watch_read,
                    generation=current.generation,
                    shared_counts=counts.column(index),
                )
                _run(lambda: server.serve(sockets, http=None))  # unblocks the signals
            except BaseException:
                log.exception("worker %d crashed", index)
                code = 1
            finally:
                flush_logs()  # os._exit skips atexit
                os._exit(code)
        children[pid] = index
        restarts.started(index)

    for i in range(loaded.policy.server.workers):
        spawn(i)

    async def parent() -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def forward(sig: signal.Signals) -> None:
            for pid in list(children):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

        def on_hup() -> None:
            # The supervisor counts the reload, once, as a single process does (its
            # workers log theirs but count none); it keeps /readyz current and the
            # policy a restarted worker starts with.
            try:
                fresh = load_policy(config)
                check_runtime(fresh.policy)
            except RELOAD_ERRORS as exc:
                log_reload_refused(exc)
                metrics.count_reload(False)
            else:
                current.loaded = fresh
                current.generation += 1
                metrics.count_reload(True, current.generation)
            forward(signal.SIGHUP)

        loop.add_signal_handler(signal.SIGHUP, on_hup)

        def on_stop(sig: signal.Signals) -> None:
            stopping.set()
            forward(sig)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop, sig)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

        async def readiness() -> list[str]:
            if stopping.is_set():  # as Server.readiness: known without probing
                return [SHUTTING_DOWN]
            if not children:  # every worker is waiting out a restart delay
                return ["no worker running"]
            policy = current.loaded.policy
            found = await asyncio.gather(probe_upstream(policy), probe_store(policy))
            return [p for p in found if p]

        waiting: dict[int, asyncio.TimerHandle] = {}

        def restart_later(index: int) -> None:
            del waiting[index]
            if not stopping.is_set():
                spawn(index)

        api = await start_http_api(http, metrics, readiness)
        event(log, "supervisor_started", workers=len(children), pid=os.getpid())
        while children or (waiting and not stopping.is_set()):
            await asyncio.sleep(0.2)
            while True:
                try:
                    pid, _status = os.waitpid(-1, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks
                except ChildProcessError:
                    pid = 0
                if pid == 0:
                    break
                index = children.pop(pid, None)
                mark_process_dead(pid)
                if index is not None and not stopping.is_set():
                    delay = restarts.delay(index)
                    if delay == 0:
                        log.error("worker %d (pid %d) died; restarting it", index, pid)
                        spawn(index)
                    else:
                        log.error(
                            "worker %d (pid %d) died; restarting it in %.0fs (%d death(s) in "
                            "a row within %.0fs of a start)",
                            index,
                            pid,
                            delay,
                            restarts.fast_deaths[index],
                            RestartBackoff.FAST,
                        )
                        waiting[index] = loop.call_later(delay, restart_later, index)
        for handle in waiting.values():
            handle.cancel()
        api.close()
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)  # as in Server.serve

    _run(parent)
    return 0


def main_serve(config: Path) -> int:
    try:
        loaded = load_policy(config)
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return serve(loaded, config)
