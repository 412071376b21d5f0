"""The bus the configuration names: the one place that tells the buses apart."""

from __future__ import annotations

from ..config import Config
from ..directory import Node
from .base import Bus, HubLink
from .cluster import SCHEME as CLUSTER_SCHEME
from .cluster import ClusterBus
from .local import LocalBus
from .mesh import MeshBus
from .redis import RedisBus
from .sharded import ShardedBus, redis_urls


def make_bus(config: Config, hub: HubLink, node: Node, *, worker: int, master_pid: int,
             mesh_sockets: str, predecessor: str) -> Bus:
    """`worker`: this worker's index among the master's; `mesh_sockets`: the folder of the
    embedded bus's sockets; `predecessor`: the clientId prefix of the worker this one
    replaces (its presence entries are forgotten), if any."""
    redis = config.redis
    if redis is not None and redis.startswith(CLUSTER_SCHEME):
        return ClusterBus(hub, redis, config.redis_prefix, presence_ttl=config.presence_ttl,
                          predecessor=predecessor, history_ttl=config.history_ttl, node=node,
                          worker=worker)
    if redis is not None and len(redis_urls(redis)) > 1:
        return ShardedBus(hub, redis_urls(redis), config.redis_prefix,
                          presence_ttl=config.presence_ttl, predecessor=predecessor,
                          history_ttl=config.history_ttl, node=node, worker=worker)
    if redis is not None:
        return RedisBus(hub, redis, config.redis_prefix, presence_ttl=config.presence_ttl,
                        node=node, worker=worker, history_ttl=config.history_ttl,
                        predecessor=predecessor)
    if config.workers == 1:
        return LocalBus(hub, node, history_ttl=config.history_ttl)
    return MeshBus(hub, node, worker, config.workers, sockets=mesh_sockets,
                   master_pid=master_pid, max_message_size=config.max_message_size,
                   history_ttl=config.history_ttl)
