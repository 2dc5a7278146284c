"""Redis clients for the state URLs, and scripts run per key, pipelined per node.

    redis://[[user]:password@]host[:port][/db]       one Redis server (``redis.Redis``);
    rediss://...                                     the same over TLS
    redis-cluster://[[user]:password@]host:port[,host:port...][?options]
                                                     a Redis Cluster
                                                     (``redis.cluster.RedisCluster``); the
                                                     nodes named are where discovery starts
    rediss-cluster://...                             the same over TLS

Credentials and options are read as redis-py reads a ``redis://`` or ``rediss://`` URL (the
user name and password percent-encoded; options such as ``ssl_ca_certs=<path>`` or
``ssl_cert_reqs=none`` in the query string), and apply to every node of the cluster.

The stores (``fraudflow.serve.state``, ``fraudflow.serve.spec_redis``) hash each key by what
it belongs to (one entity key's events, one transaction's record), so a cluster spreads them
over its masters; a group of decisions becomes one script call per key, which the client's
pipeline splits by slot and sends as one pipeline per node (one round trip per node), not one
script over all keys. Every script a store runs this way is idempotent, so a call that failed
half-way can be run again whole.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fraudflow.errors import ConfigError
from fraudflow.serve.database import redact_url

if TYPE_CHECKING:
    import redis

__all__ = [
    "CLUSTER_SCHEME",
    "CLUSTER_SCHEMES",
    "REDIS_SCHEMES",
    "URL_FORMS",
    "Shards",
    "cluster_nodes",
    "cluster_options",
    "is_cluster",
    "is_redis_url",
    "redis_client",
]

CLUSTER_SCHEME = "redis-cluster"
# Cluster URL schemes -> the one-node scheme whose form they follow (TLS or not).
CLUSTER_SCHEMES = {CLUSTER_SCHEME: "redis", "rediss-cluster": "rediss"}
REDIS_SCHEMES = ("redis", "rediss", *CLUSTER_SCHEMES)
URL_FORMS = (
    "redis://<host>[:<port>][/<db>] or redis-cluster://<host>:<port>[,<host>:<port>...] "
    "(rediss:// and rediss-cluster:// for TLS; [<user>]:<password>@ before the host)"
)


def is_redis_url(url: str | None) -> bool:
    return url is not None and url.partition("://")[0] in REDIS_SCHEMES and "://" in url


def is_cluster(client: Any) -> bool:
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def redis_client(url: str, **options: Any) -> redis.Redis:
    """The client a state URL names; ``options`` go to the client (timeouts)."""
    try:
        import redis
        from redis.cluster import ClusterNode, RedisCluster
    except ImportError:
        raise ConfigError(
            "a redis:// state store needs the `redis` package, however it is not installed"
        ) from None
    if url.partition("://")[0] not in CLUSTER_SCHEMES:
        return redis.Redis.from_url(url, **options)
    nodes = [ClusterNode(host, port) for host, port in cluster_nodes(url)]
    # A cluster client is not a ``redis.Redis``, but offers the commands the stores use.
    cluster: Any = RedisCluster(startup_nodes=nodes, **cluster_options(url), **options)
    return cluster


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The (host, port) pairs of a ``redis-cluster://`` or ``rediss-cluster://`` URL."""
    nodes = []
    for part in _split_cluster_url(url)[2].rstrip("/").split(","):
        host, sep, port = part.rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(
                f"a redis-cluster URL must be redis[s]-cluster://[[<user>]:<password>@]<host>:"
                f"<port>[,<host>:<port>...], however got {redact_url(url)!r}"
            )
        nodes.append((host, int(port)))
    return nodes


def cluster_options(url: str) -> dict[str, Any]:
    """The client options of a cluster URL: credentials, TLS and the query's options, read
    by redis-py as for a one-node URL of the same form."""
    from redis.connection import SSLConnection, parse_url

    one, credentials, hosts, query = _split_cluster_url(url)
    first = hosts.split(",")[0].rstrip("/")
    try:
        options = parse_url(f"{one}://{credentials}{first}{query}")
    except ValueError as exc:
        raise ConfigError(f"state store URL {redact_url(url)!r}: {exc}") from None
    for name in ("host", "port", "db", "path"):
        options.pop(name, None)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    return options


def _split_cluster_url(url: str) -> tuple[str, str, str, str]:
    """(the one-node scheme, "credentials@" or "", the host list, "?query" or "")."""
    scheme, _, rest = url.partition("://")
    head, at, hosts = rest.rpartition("@")
    hosts, question, query = hosts.partition("?")
    return CLUSTER_SCHEMES[scheme], head + at, hosts, question + query


# A cluster master's writes are acknowledged once a replica holds them (WAIT), so that a
# failover loses no acknowledged decision; a master with no replica connected waits for none.
_WAIT_REPLICA_MS = 1_000
_REPLICAS_KNOWN_SECONDS = 1.0

Command = tuple[str, tuple[Any, ...]]  # (the key it routes by, the command's words)


class Shards:
    """Commands routed by key and pipelined per node: one pipeline for a single server; on a
    cluster, one per master holding their slots, each ended by a WAIT for a replica.

    Lua scripts run by SHA, loaded again where a node lacks them (a replica promoted after a
    failover, a restarted node). A command refused with MOVED (the slots moved: a failover)
    is sent again after the client relearns the slots; any other error is raised (commands
    of other nodes may have run: the callers' commands are idempotent).
    """

    def __init__(self, client: redis.Redis, *sources: str) -> None:
        self.client = client
        self._scripts = [client.register_script(source) for source in sources]
        self._cluster: Any = client if is_cluster(client) else None
        self._replicas: dict[str, tuple[float, int]] = {}  # node -> (when asked, connected)

    def script(self, index: int, keys: Sequence[Any], args: Sequence[Any]) -> Command:
        sha = self._scripts[index].sha
        return keys[0], ("EVALSHA", sha, len(keys), *keys, *args)

    def run(self, commands: Sequence[Command]) -> list[Any]:
        """The commands' replies, in order."""
        from redis.exceptions import MovedError, NoScriptError, RedisError

        results: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        for attempt in range(3):
            retry = []
            for node, positions in self._by_node(commands, todo).items():
                try:
                    replies = self._pipeline(node, [commands[i][1] for i in positions])
                except RedisError:
                    # A node down, or no longer a master: the next call asks the cluster
                    # where the slots are now (its replica may have taken over).
                    with contextlib.suppress(RedisError):
                        self._relearn()
                    raise
                for i, reply in zip(positions, replies, strict=True):
                    if isinstance(reply, NoScriptError | MovedError) and attempt < 2:
                        retry.append(i)
                    elif isinstance(reply, Exception):
                        raise reply
                    else:
                        results[i] = reply
            if not retry:
                break
            self._relearn()
            todo = sorted(retry)
        return results

    def _by_node(self, commands: Sequence[Command], todo: Sequence[int]) -> dict[Any, list[int]]:
        if self._cluster is None:
            return {None: list(todo)}
        manager = self._cluster.nodes_manager
        groups: dict[str, tuple[Any, list[int]]] = {}
        slot_of = self._cluster.keyslot
        for i in todo:
            node = manager.get_node_from_slot(slot_of(commands[i][0]))
            groups.setdefault(node.name, (node, []))[1].append(i)
        return dict(groups.values())

    def _pipeline(self, node: Any, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        client = self.client if node is None else self._cluster.get_redis_connection(node)
        with client.pipeline(transaction=False) as pipe:
            for words in commands:
                pipe.execute_command(*words)
            if node is not None:
                pipe.execute_command("WAIT", 1, _WAIT_REPLICA_MS)
            replies = pipe.execute(raise_on_error=False)
        if node is not None:
            self._check_replicated(node, client, replies.pop())
        return list(replies)

    def _check_replicated(self, node: Any, client: redis.Redis, acked: Any) -> None:
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if isinstance(acked, Exception):
            raise acked
        if int(acked) >= 1:
            return
        asked, connected = self._replicas.get(node.name, (0.0, 1))
        if time.monotonic() - asked > _REPLICAS_KNOWN_SECONDS:
            connected = int(client.info("replication").get("connected_slaves", 0))
            self._replicas[node.name] = (time.monotonic(), connected)
        if connected:
            raise RedisTimeoutError(
                f"Redis node {node.name}: no replica acknowledged the writes within "
                f"{_WAIT_REPLICA_MS} ms"
            )

    def _relearn(self) -> None:
        """Load the scripts everywhere and relearn a cluster's slots."""
        if self._cluster is not None:
            self._cluster.nodes_manager.initialize()
        for script in self._scripts:
            self.client.script_load(script.script)
