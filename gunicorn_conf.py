"""gunicorn settings for ``gunicorn -c gunicorn_conf.py tfwsgi:app``: values and one-line hooks.

Command-line flags (``-b``, ``-w``, ``-k`` …) override these values. Model settings come from
``TFWSGI_*`` environment variables (see docs/settings.md).
"""

import os

_environ = dict(os.environ)  # as the master was started (before the env file is applied)

from tfwsgi import hooks  # noqa: E402
from tfwsgi.allocator import use_jemalloc  # noqa: E402

_settings = hooks.config_settings()  # TFWSGI_* variables, and TFWSGI_ENV_FILE (re-read on SIGHUP)
if __name__ == "__config__":  # gunicorn reading it: may start the master again, with jemalloc
    use_jemalloc(_settings.memory_allocator, _environ)

bind = hooks.bind_addresses(_settings)  # a socket passed by systemd wins (tfwsgi.socket)
workers = _settings.workers or os.cpu_count() or 1
# An epoll loop holds every keep-alive connection; `threads` request threads serve complete
# requests in arrival order (see tfwsgi/worker.py). Concurrent requests in one worker are what the
# dynamic batcher merges. `worker_connections` caps the connections one worker holds.
worker_class = "tfwsgi.worker.EventWorker"
threads = 64
worker_connections = 10_000
backlog = 4096  # a burst of thousands of new connections waits here (the kernel caps it at somaxconn)
preload_app = False  # the app (and TensorFlow) load in each worker, after fork
# A worker whose request thread is on one request longer than this is replaced (its heartbeat
# stops); keep it above TFWSGI_REST_API_TIMEOUT_IN_MS. Model loading keeps its own heartbeat.
timeout = 60
graceful_timeout = 30
keepalive = 5
# A backstop against slow leaks, not the fix: a restart reloads every model, so it is rare
# (minutes apart at thousands of requests/s); jitter keeps workers from cycling together.
max_requests = 1_000_000
max_requests_jitter = 100_000
limit_request_line = 8190
control_socket_disable = True  # gunicorn's default path is per user: two instances would collide
accesslog = None  # off, as in gunicorn and TF Serving; `--access-logfile -` turns it on
errorlog = "-"
loglevel = "info"
logger_class = hooks.logger_class(_settings)  # TFWSGI_LOG_FORMAT=json: JSON lines


def on_starting(server):
    hooks.on_starting(server)


def pre_fork(server, worker):
    hooks.pre_fork(server, worker)


def post_fork(server, worker):
    hooks.post_fork(server, worker)


def post_worker_init(worker):
    hooks.post_worker_init(worker)


def child_exit(server, worker):
    hooks.child_exit(server, worker)


def worker_exit(server, worker):
    hooks.worker_exit(server, worker)


def on_exit(server):
    hooks.on_exit(server)
