"""gunicorn settings for the model server, read from SERVING_* environment variables.

Loaded by the top-level ``gunicorn.conf.py`` (which gunicorn reads by default from the working
directory, so `gunicorn flask_server:app -w 4` uses it too) and by ``serving serve`` as
``-c python:serving.host.conf``, so an installed package and a checkout run the same settings.
Command-line flags (-w, -b, --threads, ...) override what is set here. Every SERVING_* variable is
described in docs/settings.md and by `serving config`.
"""

import os
import sys

from serving.config import Settings
from serving.errors import ConfigError

try:
    settings = Settings.from_env()
except ConfigError as exc:
    sys.exit(f"error: {exc}")

# Metrics from every worker are merged through files in one directory (prometheus_client's
# multiprocess mode). It must be known before anything imports prometheus_client.
from serving.observability import multiprocess  # noqa: E402

try:
    multiprocess.prepare_metrics_dir(settings, os.environ)
except ConfigError as exc:
    sys.exit(f"error: {exc}")

from serving.host import affinity, balance, daemon_report, hooks, sharing  # noqa: E402
from serving.host import pool_dir as pool  # noqa: E402
from serving.host import workers as worker_classes  # noqa: E402
from serving.observability.logging import gunicorn_logger_class  # noqa: E402

# SERVING_MODEL_POOL=auto (the default) becomes a number here, once, for every process: one pool
# process when a served model runs on TensorFlow (serving/host/pool_dir.py).
try:
    settings = pool.resolve_auto_pool(settings, os.environ)
except ConfigError as exc:
    sys.exit(f"error: {exc}")

# Where and how many. Default: one worker per core, each with its share of the math threads.
bind = [settings.bind]
workers = settings.workers
backlog = settings.backlog
# Files gunicorn creates get no permission for others: a unix:PATH socket is srwxrwx--- (gunicorn's
# default umask 0 makes it 0777, so any local user could send requests). Only the socket and the
# workers' heartbeat files (unlinked at once) are made under it; a daemon sets its own umask (022).
umask = 0o007

# TLS: with SERVING_CERTFILE and SERVING_KEYFILE gunicorn serves HTTPS itself (a proxy in front may
# terminate TLS instead: see the #tls lines of deploy/nginx.conf). Its TLS sockets bound how long a
# silent client holds a worker, as the plain ones do (serving/host/workers.py).
if settings.certfile:
    try:
        worker_classes.check_tls_files(settings.certfile, settings.keyfile)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    certfile = settings.certfile
    keyfile = settings.keyfile
    ssl_context = worker_classes.tls_context

# process mode: sync workers, one request at a time per process (the only direct mode for PyTorch).
# threaded mode: gthread workers, `threads` request threads sharing one model (TensorFlow, ONNX).
# batched mode: gthread workers whose request threads queue work for one model thread per worker.
# Both are gunicorn's own workers with JSON error pages and a bound on a silent client's hold on a
# worker (serving/host/workers.py); `-k sync` or `-k gthread` on the command line runs gunicorn's.
# With the model pool the HTTP workers hold no model, so they are threaded in every mode: their
# request threads only wait for the pool, which batches them.
worker_class = (
    "serving.host.workers.SyncWorker"
    if settings.mode == "process" and not settings.pool_processes
    else "serving.host.workers.ThreadWorker"
)
threads = settings.threads_per_worker
# SERVING_FRONT=asgi: asgi_server:app under an ASGI worker, one event loop per worker holding the
# connections; the mode's request threads become the app's bounded pool
# (serving/fronts/asgi_pool.py), so gunicorn's own `threads` is 1. uvicorn-worker's worker measured
# faster than gunicorn's native one (docs/modes.md); `-k asgi` runs gunicorn's
# (serving.host.asgi_workers.AsgiWorker adds the app check).
if settings.front == "asgi":
    wsgi_app = "asgi_server:app"
    worker_class = "serving.host.asgi_workers.UvicornWorker"
    threads = 1

# Keep-alive connections spread evenly over the gthread workers (serving/host/balance.py): the
# shared array of connection counts is mapped here, before the first fork. A `-k` on the command
# line that picks another worker class simply never reads it.
if settings.balance_connections and worker_class.endswith(".ThreadWorker"):
    balance.prepare()

# SERVING_MODEL_POOL=N: N model processes hold the models for every HTTP worker; they are
# gunicorn's dirty workers, supervised by its dirty arbiter (serving/host/model_pool.py). Their
# sockets live in a directory of this server's own, which the HTTP workers find through
# SERVING_POOL_DIR.
if settings.pool_processes:
    try:
        pool_directory = pool.prepare_pool_dir(settings, os.environ)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    settings = Settings.from_env()
    dirty_apps = ["serving.host.model_pool:ModelPoolApp"]
    dirty_workers = settings.pool_processes
    dirty_timeout = settings.timeout
    dirty_graceful_timeout = settings.graceful_timeout

# Timeouts: a worker silent for `timeout` s is killed and replaced; on reload or shutdown,
# in-flight requests get `graceful_timeout` s to finish.
timeout = settings.timeout
graceful_timeout = settings.graceful_timeout
keepalive = settings.keepalive

# Recycle workers after max_requests (+ random jitter so they do not all restart at once).
max_requests = settings.max_requests
max_requests_jitter = settings.max_requests_jitter

# Logs: the app writes one access line per request with its request id, so gunicorn's own access
# log stays off. With a log file, stray stdout/stderr output is captured into it too.
loglevel = settings.log_level
errorlog = settings.log_file or "-"
capture_output = bool(settings.log_file)
accesslog = None
# At start gunicorn stops a live dirty arbiter named in /tmp/gunicorn-dirty-<proc_name>.pid, as the
# orphan of a crashed run: with one name for every server, starting a second server on the machine
# stopped the first one's model pool. So a server with a pool has a name of its own; an arbiter
# whose master died stops by itself (it checks its parent every second).
proc_name = f"serving-{os.getpid()}" if settings.pool_processes else "serving"
# With SERVING_LOG_FORMAT=json, gunicorn's own lines (start, workers, timeouts) are JSON objects
# too.
json_logger = gunicorn_logger_class(settings)
if json_logger is not None:
    logger_class = json_logger

# Servers started side by side (tests, benchmarks) must not share gunicorn's control socket.
control_socket_disable = True

# --daemon: the command waits until a worker has loaded its models and says so, or prints why the
# server stopped and exits 1, instead of exiting 0 before anything is known
# (serving/host/daemon_report.py).
daemon_report.install(limit_s=max(120.0, 4.0 * settings.timeout), log_file=settings.log_file)


def on_starting(server):
    """Master, before forking: route daemon logs, wipe old metrics, fail fast on a bad model, and
    stop the model pool only after the HTTP workers."""
    hooks.route_daemon_logs(server)
    daemon_report.master_started(server)
    multiprocess.wipe_metrics_dir(server)
    try:
        hooks.check_before_fork(server, settings)
    except RuntimeError as exc:
        daemon_report.master_failed(str(exc))
        raise
    sharing.share_before_fork(server, settings)
    if settings.pool_processes:
        hooks.stop_pool_after_workers(server)


def on_dirty_starting(arbiter):
    """The model pool's arbiter, before forking the pool's processes: their frameworks, once; a
    reload that replaces its processes."""
    sharing.share_in_pool_arbiter(arbiter, settings)
    hooks.replace_pool_on_reload(arbiter, settings.pool_dir)


def pre_fork(server, worker):
    """Master, before each fork: what it allocated since is frozen too (shared, never collected);
    the worker's share of the cores and its slot for its connection count chosen."""
    if settings.share_memory:
        sharing.freeze_before_fork()
    if settings.cpu_affinity:
        affinity.assign(server, worker)
    balance.assign(server, worker)


def post_fork(server, worker):
    """Worker, right after fork, before any thread: pinned to its cores (SERVING_CPU_AFFINITY)."""
    affinity.pin(worker)


def on_reload(server):
    """Master, on SIGHUP: keep daemon logs in their file; the app built again for the new
    workers."""
    hooks.route_daemon_logs(server)
    sharing.rebuild_app(server, settings)


def post_worker_init(worker):
    """Worker, after fork: load the model here, never in the master."""
    # gunicorn's own asgi worker (-k asgi) keeps its app in worker.asgi
    if not hasattr(worker, "wsgi"):
        worker.wsgi = worker.asgi
    hooks.load_in_worker(worker)
    daemon_report.worker_ready()


def worker_exit(server, worker):
    """Worker, on its way out: answer everything still queued for the model thread, then end
    the process without the C++ static destructors that hang or abort after fork."""
    try:
        hooks.drain_worker(worker)
    finally:
        hooks.leave_worker()


def on_exit(server):
    """Master, at the very end: remove a temporary metrics (and model pool) directory."""
    multiprocess.remove_metrics_dir()
    pool.remove_pool_dir()


def dirty_worker_exit(arbiter, worker):
    """The model pool's arbiter: a pool process exited; its live gauges (queue depth) stop
    counting."""
    hooks.worker_exited(worker)


def child_exit(server, worker):
    """Master: a worker exited; stop counting its live metrics and its connections."""
    hooks.worker_exited(worker)
    balance.release(worker)
