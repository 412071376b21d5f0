"""Message buses: how a publish on one worker reaches the Hubs of every worker.

- base.py      the Bus every bus implements, and the HubLink it talks back through
- factory.py   the bus the configuration names
- local.py     one worker: a publish is fanned out on the spot
- mesh/        several workers of one node (the embedded bus), over unix sockets
- redis.py     nodes sharing one Redis; sharded.py several; cluster.py a Redis Cluster
- commands.py  the server API's commands, applied by every worker
- gather.py    ask every worker or node, gather the answers with a deadline

Each feature's own parts for each bus live with the feature: fastfan.history,
fastfan.presence, fastfan.directory.
"""

from .base import DONE, PENDING, REFUSED, Acknowledger, Bus, BusHealth, Entries, HubLink
from .commands import COMMANDS, apply_command, encode_command

__all__ = ["COMMANDS", "DONE", "PENDING", "REFUSED", "Acknowledger", "Bus", "BusHealth",
           "Entries", "HubLink", "apply_command", "encode_command"]
