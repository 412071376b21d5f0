"""The embedded bus of several workers (wire.py: its records; peers.py: its connections;
bus.py: MeshBus): every worker connected to every other one.

Each worker listens on a Unix socket `<sockets>/<worker index>`, and connects out to
every other worker. It sends on its outgoing connections (its publishes, and which
channels it has subscribers for) and receives on the incoming ones. A publish is fanned
out locally at once and sent, as the encoded `message`, only to the workers that said they
have subscribers for its channel: a worker subscribed to nothing receives nothing. One stream
per pair of workers keeps each publisher's order.

A server API command (COMMAND: `disconnect`, `unsubscribe`) goes to every connected
worker whatever its channels, and each applies it to its own clients. A presence query
(PRESENCE) and a channels query (CHANNELS, the API's `channels` and the status page) go to
every connected worker too, which answers on the same connection (PRESENCE_ANSWER,
CHANNELS_ANSWER); the asker waits for every one it asked, at most PRESENCE_TIMEOUT.

`subscribed` is a promise: a worker that gains its first subscriber of a channel sends
SUBSCRIBE to every other worker, and each answers SUBSCRIBED on the same connection once
it forwards that channel; the Hub holds the client's `subscribed` reply until every
connected worker has answered (a worker that goes away owes nothing).

join and leave travel as publishes on the join/leave channel `#C`. A worker that begins to
watch `#C` (its SUBSCRIBE) is told by each other worker, on that worker's stream of
publishes to it, which subscribers of C it has (PRESENT), and then hears their joins and
leaves: when that worker dies, the watcher's worker sends its watchers the leave of every
one it still has (a client that joined before anyone watched leaves too).

History (fastfan.history): each channel with history has one owner, `owner_of(channel)`,
whose HistoryStore numbers and keeps its messages. A publish on it goes to the owner
(SEQUENCE; its acknowledgement comes back as SEQUENCED), which numbers it, fans it out
and sends it to the interested workers like its own publish (to the publisher's worker as
PUBLISH_EXCLUDING when the publisher asked for no echo). A history read (HISTORY) is
answered (HISTORY_ANSWER) on the owner's stream of publishes to the reader, the same
stream as the channel's messages: after every message up to the read's position, before
every later one, which is what a subscription's seam needs (Hub.subscribe_history). A
worker's death costs its channels their history: its successor starts new epochs.

Only the server's own workers may reach the bus: a record on it is delivered to clients
with no token or rate limit checked. So the master creates the folder of sockets with
`tempfile.mkdtemp` before forking (mode 0700, a random name: no other user can connect
into it, nobody can bind our names first), and every accepted connection must come, by
its SO_PEERCRED, from our uid and from a child of our master; anything else is closed
before a byte is read. (Abstract sockets, used before, have no permissions at all.
Socketpairs made before the fork would need the master to hand new ones to every worker
over a control channel each time one restarts; a path the restarted worker binds again
needs nothing.) Records from an accepted worker are still checked: one longer than the
largest message, an unknown kind, a channel that is not ASCII or a bad HELLO drops that
connection with one warning line, never an exception in the loop or memory the size of
what the header claims.

Cost per message: one record (6 bytes + channel + payload) appended to the outgoing buffer
of each interested worker, written once per loop turn, and a parse plus `Hub.fanout` on
the receiving side. A restarted worker binds the same path, the others reconnect to it
(and it to them) and tell it their channels again; what was published to it meanwhile is
lost for its clients, who were disconnected anyway.
"""

from .bus import MeshBus

__all__ = ["MeshBus"]
