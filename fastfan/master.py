"""The process that `fastfan run` starts: limits, logging, then the workers."""

from __future__ import annotations

import logging
import resource

from .config import Config
from .logs import configure
from .worker import run_worker

log = logging.getLogger("fastfan.master")


def raise_open_files_limit() -> int:
    """Each connection is a file descriptor: take every one the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def serve(config: Config) -> int:
    configure(config.log_level, config.log_format)
    limit = raise_open_files_limit()
    if config.jwt_secret is None:
        log.warning("--insecure: accepting every client without a token; never in production")
    log.info("fastfan on %s:%d, %d worker(s), open files limit %d",
             config.host, config.port, config.workers, limit)
    if config.workers > 1:
        log.error("--workers above 1 is not available yet; starting one worker")
    run_worker(config)
    return 0
