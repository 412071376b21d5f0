"""Message buses: how a publish on one worker reaches the Hubs of every worker.

A bus has `publish(channel, payload) -> bool` (False: the bus is down, answer 503),
`subscribe(channel)` and `unsubscribe(channel)` (a Hub calls them when a channel gains its
first or loses its last local subscriber), and `up` for /ready.
"""
