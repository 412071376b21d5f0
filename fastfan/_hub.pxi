# Channel and Hub: the channel table, fan-out, the flush and the sweep. Included by
# _core.pyx.


@cython.final
cdef class Channel:
    def __cinit__(self, str name):
        self.name = name

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.count):
            Py_DECREF(<object>self.subscribers[i])
        free(self.subscribers)

    def __len__(self):
        return self.count

    cdef Py_ssize_t add(self, Outbox subscriber) except -1:
        cdef Py_ssize_t capacity
        cdef void** grown
        if self.count == self.capacity:
            capacity = max(8, 2 * self.capacity)
            grown = <void**>realloc(self.subscribers, capacity * sizeof(void*))
            if grown == NULL:
                raise MemoryError()
            self.subscribers = grown
            self.capacity = capacity
        Py_INCREF(subscriber)
        self.subscribers[self.count] = <void*>subscriber
        self.count += 1
        self.deflating += subscriber.deflate_out
        return self.count - 1

    cdef Outbox remove_at(self, Py_ssize_t index):
        """Remove the subscriber in `index` by moving the last one into it.

        Returns the subscriber that moved (its index is now `index`), or None.
        """
        cdef Outbox removed = <Outbox>self.subscribers[index]
        cdef Outbox moved = None
        self.count -= 1
        self.deflating -= removed.deflate_out
        if index != self.count:
            self.subscribers[index] = self.subscribers[self.count]
            moved = <Outbox>self.subscribers[index]
        Py_DECREF(removed)
        return moved


@cython.final
cdef class Hub:
    """One worker's channels and connections; the bus calls `fanout` for every message."""

    def __cinit__(self, loop, *, Py_ssize_t max_message_size, Py_ssize_t max_subscriptions,
                  Py_ssize_t max_subscription_bytes, Py_ssize_t max_buffer,
                  double publish_rate, SlowConsumerPolicy slow_consumer,
                  presence_channels, Py_ssize_t presence_limit, str client_id_prefix="",
                  Py_ssize_t history_size=0, history_channels=None,
                  Py_ssize_t compression_min_size=256,
                  Py_ssize_t history_max_bytes=DEFAULT_HISTORY_MAX_BYTES,
                  double subscribe_rate=20, Py_ssize_t max_backlog=DEFAULT_MAX_BACKLOG):
        self.loop = loop
        self.max_backlog = max_backlog
        self.held_inputs = []
        self.channels = {}
        self.sessions = set()
        self.users = {}
        self.unconfirmed = {}
        self.held_events = {}
        self.held_joins = {}
        self.presence_answers = {}
        self.close_reasons = {}
        self.subscribe_rate = subscribe_rate
        self.max_message_size = max_message_size
        self.max_subscriptions = max_subscriptions
        self.max_subscription_bytes = max_subscription_bytes
        self.max_buffer = max_buffer
        self.publish_rate = publish_rate
        self.slow_consumer = slow_consumer
        self.presence_channels = presence_channels
        self.presence_limit = presence_limit
        self.history_size = history_size
        self.history_channels = history_channels
        self.history_max_bytes = history_max_bytes
        self.recoveries = {}
        self.reading = set()
        self.recovering = {}
        self.client_id_prefix = (client_id_prefix or secrets.token_hex(6)).encode() + b"-"
        self.publish_latency = Histogram()
        self.handling = Samples()
        self.deflate = Deflate(compression_min_size)

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.pending_count):
            Py_DECREF(<object>self.pending[(self.pending_head + i) & (self.pending_capacity - 1)])
        free(self.pending)
        free(self.frame)
        free(self.fanout_started)
        free(self.fanout_written_at)

    @property
    def connections(self):
        return len(self.sessions)

    def connections_of(self, str user):
        """Open connections of `user` on this worker."""
        return self.users.get(user, 0)

    def subscriber_counts(self):
        """The clients' channels of this worker and their subscribers (the seed's groups);
        not the join/leave channels."""
        cdef Channel channel
        return {name: channel.count for name, channel in self.channels.items()
                if not name.startswith(WATCH_PREFIX)}

    def presence_of(self, str channel):
        """This worker's subscribers of `channel`: [clientId, user, info] each (the seed's
        getGroupMembers; info the token's `info` claim as JSON text, or ""), read from the
        subscriber array: nothing is kept for it."""
        cdef Channel target = self.channels.get(channel)
        cdef Py_ssize_t i
        cdef list entries = []
        if target is not None:
            for i in range(target.count):
                entries.append(presence_entry(<Session>target.subscribers[i]))
        return entries

    cdef double subscribe_burst(self) noexcept:
        """The subscribes a connection may make at once: all its channels, and at least
        twice --subscribe-rate."""
        return max(<double>self.max_subscriptions, 2 * self.subscribe_rate)

    def presence_part(self, str channel, Py_ssize_t limit):
        """This worker's part of `channel`'s presence (fastfan.bus.base.Presence): its
        subscribers counted, their users' keys, and at most `limit` of them listed."""
        cdef Channel target = self.channels.get(channel)
        cdef Session session
        cdef Py_ssize_t i
        cdef set users = set()
        cdef list clients = []
        if target is None:
            return (0, [], clients)
        for i in range(target.count):
            session = <Session>target.subscribers[i]
            users.add(session.identity.user)
            if i < limit:
                clients.append(presence_entry(session))
        return (target.count, [user_key(user) for user in users], clients)

    def gather_presence(self, str channel, answer):
        """`answer(Presence)` with every worker's and node's subscribers of `channel` (or
        None: one did not answer). One gather per channel at a time, and its answer serves
        again for PRESENCE_FRESH seconds (a local subscribe or unsubscribe ends that): a
        request costs the channel's size once, not each time."""
        known = self.presence_answers.get(channel)
        if type(known) is list:  # a gather is out: its answer is this one's too
            known.append(answer)
            return
        if known is not None and monotonic() - known[0] < PRESENCE_FRESH:
            answer(known[1])
            return
        waiting = self.presence_answers[channel] = [answer]
        self.bus.gather_presence(channel, functools.partial(self._presence_gathered, channel,
                                                            waiting))

    def _presence_gathered(self, str channel, list waiting, presence):
        if self.presence_answers.get(channel) is waiting:
            if presence is None:
                del self.presence_answers[channel]
            else:
                known = self.presence_answers[channel] = (monotonic(), presence)
                self.loop.call_later(PRESENCE_FRESH, self._forget_presence, channel, known)
        for answer in waiting:
            answer(presence)

    def _forget_presence(self, str channel, tuple known):
        if self.presence_answers.get(channel) is known:
            del self.presence_answers[channel]

    cpdef bytes new_client_id(self):
        self.next_client_number += 1
        return self.client_id_prefix + (b"%x" % self.next_client_number)

    cpdef bytes encode_message(self, str channel, object data, bytes sender):
        """The `message` object subscribers receive: `data` (any bytes-like object) is
        copied byte for byte. One allocation and seven copies: it runs for every publish."""
        cdef bytes name = channel.encode("ascii")
        cdef char stamp[24]
        cdef int stamp_size = snprintf(stamp, sizeof(stamp), b"%lld}", <long long>now_ms())
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        cdef bytes out
        cdef char *at
        try:
            out = PyBytes_FromStringAndSize(
                NULL, PyBytes_GET_SIZE(MESSAGE_PREFIX) + PyBytes_GET_SIZE(name)
                + PyBytes_GET_SIZE(DATA_PART) + view.len + PyBytes_GET_SIZE(FROM_PART)
                + PyBytes_GET_SIZE(sender) + PyBytes_GET_SIZE(TIMESTAMP_PART) + stamp_size)
            at = _put(PyBytes_AS_STRING(out), MESSAGE_PREFIX)
            at = _put(at, name)
            at = _put(at, DATA_PART)
            memcpy(at, view.buf, view.len)
            at = _put(at + view.len, FROM_PART)
            at = _put(at, sender)
            at = _put(at, TIMESTAMP_PART)
            memcpy(at, stamp, stamp_size)
        finally:
            PyBuffer_Release(&view)
        return out

    # Fan-out ---------------------------------------------------------------------------

    cpdef Py_ssize_t fanout(self, str channel, object payload, Outbox exclude=None) except -1:
        """Deliver an encoded `message` to this worker's subscribers of `channel`, but
        `exclude` (the publisher of an "echo":false message, the subject of a join/leave).
        A payload that begins with EXCEPTING_PREFIX goes to `excepting` (when set).

        The payload is framed once into a scratch buffer; each subscriber gets a memcpy.
        With subscribers that negotiated permessage-deflate, it is also compressed once.
        Returns the number of subscribers it was queued for.
        """
        cdef Channel target = self.channels.get(channel)
        cdef Py_buffer view
        cdef bytes shared
        if target is None or target.count == 0:
            return 0
        if channel[0] == WATCH_MARK:
            return self._hold_event(target, payload, exclude)
        if self.excepting is not None and is_excepting(payload):
            return self.excepting(channel, payload)
        self._note_fanout(monotonic())
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            if target.deflating and self.deflate.compress(WSMsgType.TEXT, <const char*>view.buf,
                                                          view.len):
                shared = None
                if target.deflating < target.count:
                    shared = self._frame(<const char*>view.buf, view.len)
                return self._deliver_compressed(target, shared, exclude)
            shared = self._frame(<const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        if shared is not None:
            return self._deliver_shared(target, shared, exclude)
        return self._deliver(target, self.frame, self.frame_size, exclude)

    cdef bytes _frame(self, const char* data, Py_ssize_t size):
        """Frame `data` as one text message: from SHARED_FRAME_BYTES on, a bytes object to
        queue by reference; below, None, and the frame in `frame` (`frame_size` bytes)."""
        cdef Py_ssize_t header, needed = size + MAX_HEADER
        cdef char* grown
        cdef bytes shared
        cdef char shared_header[10]  # MAX_HEADER
        if size >= SHARED_FRAME_BYTES:
            header = write_header(shared_header, WSMsgType.TEXT, size)
            shared = PyBytes_FromStringAndSize(NULL, header + size)
            memcpy(PyBytes_AS_STRING(shared), shared_header, header)
            memcpy(PyBytes_AS_STRING(shared) + header, data, size)
            return shared
        if needed > self.frame_capacity:
            grown = <char*>realloc(self.frame, needed)
            if grown == NULL:
                raise MemoryError()
            self.frame = grown
            self.frame_capacity = needed
        header = write_header(self.frame, WSMsgType.TEXT, size)
        memcpy(self.frame + header, data, size)
        self.frame_size = header + size
        return None

    cdef int _note_fanout(self, double started) except -1:
        """Remember when a fan-out began; the flush that writes it measures the latency."""
        cdef double* started_grown
        cdef unsigned long long* mark_grown
        cdef Py_ssize_t capacity
        if self.fanout_count == self.fanout_capacity:
            capacity = max(64, 2 * self.fanout_capacity)
            started_grown = <double*>realloc(self.fanout_started, capacity * sizeof(double))
            if started_grown == NULL:
                raise MemoryError()
            self.fanout_started = started_grown
            mark_grown = <unsigned long long*>realloc(
                self.fanout_written_at, capacity * sizeof(unsigned long long))
            if mark_grown == NULL:
                raise MemoryError()
            self.fanout_written_at = mark_grown
            self.fanout_capacity = capacity
        self.fanout_started[self.fanout_count] = started
        self.fanout_written_at[self.fanout_count] = 0  # Hub._flush says
        self.fanout_count += 1
        return 0

    cdef int _deliver(self, Channel channel, const char* frame, Py_ssize_t size,
                      Outbox exclude) except -1:
        cdef Py_ssize_t i, count = channel.count
        cdef void* excluded = <void*>exclude
        self.deliveries_total += count  # Outbox._overflow takes back what it refuses
        for i in range(count):
            if channel.subscribers[i] != excluded:
                (<Outbox>channel.subscribers[i]).deliver(channel, frame, size)
            else:
                self.deliveries_total -= 1
        return count

    cdef int _deliver_shared(self, Channel channel, bytes frame, Outbox exclude) except -1:
        cdef Py_ssize_t i, count = channel.count
        cdef void* excluded = <void*>exclude
        self.deliveries_total += count
        for i in range(count):
            if channel.subscribers[i] != excluded:
                (<Outbox>channel.subscribers[i]).deliver_shared(channel, frame)
            else:
                self.deliveries_total -= 1
        return count

    cdef Py_ssize_t _hold_event(self, Channel channel, object payload,
                                Outbox subject) except -1:
        """A join or leave (of `subject`, if it is on this worker), for the end of the loop
        turn (see _deliver_events). A leave of a client whose join is held too cancels it:
        the watchers hear of neither (a client toggling its subscription sends them
        nothing)."""
        cdef list events = self.held_events.get(channel)
        cdef bytes event = bytes(payload)
        cdef Py_ssize_t start = event.find(b'"clientId":"') + 12
        cdef Py_ssize_t end = event.find(b'"', start) if start >= 12 else -1
        if events is None:
            if not self.held_events:
                self.loop.call_soon(self._deliver_held_events)
            events = self.held_events[channel] = []
        if end > 0:
            client = (channel, event[start:end])
            if event.startswith(b'{"type":"join"'):
                self.held_joins[client] = len(events)
            elif event.startswith(b'{"type":"leave"'):
                joined = self.held_joins.pop(client, None)
                if joined is not None:
                    events[joined] = None
                    return channel.count
        events.append((event, subject))
        return channel.count

    def _deliver_held_events(self):
        held, self.held_events = self.held_events, {}
        self.held_joins = {}
        for channel, events in held.items():
            self._deliver_events(channel, [event for event in events if event is not None])

    cdef int _deliver_events(self, Channel channel, list events) except -1:
        """A loop turn's join and leave events of one channel, to each of its watchers.

        The contract keeps one `join` or `leave` object per frame, so a burst of K events to
        W watchers is K x W frames whatever we do; but the K frames are built once, one
        after the other, and each watcher gets them as one piece: one delivery (a reference
        to the bytes when they are large, a memcpy else) instead of K. A watcher that is
        itself the subject of some of the events (its own join) gets the pieces between
        them.
        """
        cdef Py_ssize_t i, first, header, size, count = channel.count
        cdef double started = monotonic()
        cdef char header_bytes[10]  # MAX_HEADER
        cdef bytes frames, payload
        cdef Outbox watcher
        cdef list pieces = []
        cdef list starts = [0]  # where each frame begins, and the end
        cdef list headers = [0]  # the header bytes before each frame, and in all
        cdef dict skipped = {}  # the watchers some events are about -> those events
        if count == 0 or not events:
            return 0
        for i, (payload, subject) in enumerate(events):
            header = write_header(header_bytes, WSMsgType.TEXT, len(payload))
            pieces.append(header_bytes[:header])
            pieces.append(payload)
            starts.append(starts[i] + header + len(payload))
            headers.append(headers[i] + header)
            if subject is not None:
                skipped.setdefault(subject, []).append(i)
            self._note_fanout(started)
        frames = b"".join(pieces)
        size = len(frames)
        self.deliveries_total += count * len(events)
        for i in range(count):
            watcher = <Outbox>channel.subscribers[i]
            if skipped and watcher in skipped:
                first = 0
                for own in skipped[watcher]:
                    self.deliveries_total -= 1
                    self._deliver_frames(watcher, channel, frames, starts, headers, first, own)
                    first = own + 1
                self._deliver_frames(watcher, channel, frames, starts, headers, first,
                                     len(events))
            else:
                self._deliver_frames(watcher, channel, frames, starts, headers, 0, len(events))
        return 0

    cdef int _deliver_frames(self, Outbox watcher, Channel channel, bytes frames, list starts,
                             list headers, Py_ssize_t first, Py_ssize_t end) except -1:
        """Frames [first, end) of `frames` to `watcher` in one delivery, counted on its
        figures as the end - first messages they are (a delivery counts one)."""
        cdef Py_ssize_t start = starts[first], size = <Py_ssize_t>starts[end] - start
        cdef unsigned long long sent = watcher.messages_sent
        if size == 0:
            return 0
        if start == 0 and size == len(frames) and size >= SHARED_FRAME_BYTES:
            watcher.deliver_shared(channel, frames)
        else:
            watcher.deliver(channel, PyBytes_AS_STRING(frames) + start, size)
        if watcher.messages_sent != sent:  # taken, not refused
            watcher.messages_sent += end - first - 1
            watcher.bytes_sent += header_size(size) - (<Py_ssize_t>headers[end] - headers[first])
        else:  # the slow-consumer policy took back (and dropped) one delivery: all of them
            self.deliveries_total -= end - first - 1
            if self.slow_consumer == SlowConsumerPolicy.DROP:
                self.dropped_slow_total += end - first - 1
        return 0

    cdef int _deliver_compressed(self, Channel channel, bytes shared,
                                 Outbox exclude) except -1:
        """The fan-out of a channel with subscribers that negotiated permessage-deflate:
        they get the frame `deflate` compressed, the others the plain one (`shared`, or
        `frame` when None)."""
        cdef Py_ssize_t i, count = channel.count
        cdef void* excluded = <void*>exclude
        cdef Deflate deflate = self.deflate
        cdef bytes packed = deflate.shared_frame()
        cdef void* subscriber  # not an Outbox variable: no reference counting per delivery
        self.deliveries_total += count
        for i in range(count):
            subscriber = channel.subscribers[i]
            if subscriber == excluded:
                self.deliveries_total -= 1
            elif (<Outbox>subscriber).deflate_out:
                if packed is not None:
                    (<Outbox>subscriber).deliver_shared(channel, packed)
                else:
                    (<Outbox>subscriber).deliver(channel, deflate.frame, deflate.frame_size)
            elif shared is not None:
                (<Outbox>subscriber).deliver_shared(channel, shared)
            else:
                (<Outbox>subscriber).deliver(channel, self.frame, self.frame_size)
        return count

    cdef int schedule(self, Outbox outbox) except -1:
        """Write `outbox` at the end of this loop turn (behind those already waiting)."""
        cdef void** grown
        cdef Py_ssize_t i, capacity
        if self.pending_count == self.pending_capacity:
            capacity = max(64, 2 * self.pending_capacity)  # a power of two: & wraps
            grown = <void**>malloc(capacity * sizeof(void*))
            if grown == NULL:
                raise MemoryError()
            for i in range(self.pending_count):
                grown[i] = self.pending[(self.pending_head + i) & (self.pending_capacity - 1)]
            free(self.pending)
            self.pending = grown
            self.pending_capacity = capacity
            self.pending_head = 0
        Py_INCREF(outbox)
        self.pending[(self.pending_head + self.pending_count) & (self.pending_capacity - 1)] = \
            <void*>outbox
        self.pending_count += 1
        self.pending_added += 1
        outbox.scheduled = True
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        return 0

    cdef int schedule_flush(self) except -1:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        return 0

    def _flush(self):
        """End of the loop turn: write the waiting connections, each in one send, in the
        order they were scheduled, for about FLUSH_SLICE_SECONDS; then the loop reads again
        and the next turn goes on where this one stopped. A connection written here and
        given a message meanwhile is scheduled again, behind those not written yet."""
        cdef Outbox outbox
        cdef Py_ssize_t i, written = 0
        cdef double deadline = monotonic() + FLUSH_SLICE_SECONDS
        self.flush_scheduled = False
        # The fan-outs since the last slice have put all their subscribers in the ring: each
        # is written once the ring is emptied up to where it ends now.
        i = self.fanout_count - 1
        while i >= 0 and self.fanout_written_at[i] == 0:
            self.fanout_written_at[i] = self.pending_added + 1  # + 1: never 0
            i -= 1
        while self.pending_count:
            outbox = <Outbox>self.pending[self.pending_head]
            Py_DECREF(outbox)  # the ring's reference; `outbox` holds its own
            self.pending_head = (self.pending_head + 1) & (self.pending_capacity - 1)
            self.pending_count -= 1
            self.pending_written += 1
            outbox.scheduled = False
            outbox.write_out()
            written += 1
            if written % FLUSH_CLOCK_EVERY == 0 and monotonic() >= deadline:
                break
        self._observe_written()
        if (self.held_inputs or self.shed is not None) and \
                self.backlog_bytes <= self.max_backlog // 2:
            self._release_inputs()
        if self.pending_count and not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    @property
    def overloaded(self):
        """The server is behind: past --max-backlog of output it has not written yet."""
        return self.backlog_bytes > self.max_backlog

    def hold_input(self, transport):
        """Stop reading `transport` (a publisher's, a peer worker's) while overloaded: the
        server takes less input rather than grow, or count its own backlog as its
        subscribers' slowness. Read again once half the backlog is written."""
        if self.backlog_bytes > self.max_backlog and not transport.is_closing():
            transport.pause_reading()
            self.held_inputs.append(transport)
            self.inputs_held_total += 1
            self.schedule_flush()  # the flush that releases it

    cpdef Py_ssize_t fanout_or_shed(self, str channel, object payload,
                                    Outbox exclude=None) except -1:
        """fanout() of input the server cannot hold back (Redis pub/sub: Redis disconnects
        a subscriber that stops reading). While the server is behind (past --max-backlog,
        until half of it is written) a channel's newest message is kept instead, the ones
        it replaces dropped and counted; once caught up, the channel's subscribers are told
        how many they missed, `{"type":"lagged","channel":C,"missed":N}`, then get it (a
        client with history recovers the gap from the offset it holds). Joins and leaves
        are never shed."""
        cdef list kept
        if self.shed is None and self.backlog_bytes <= self.max_backlog:
            return self.fanout(channel, payload, exclude)
        if channel.startswith(WATCH_PREFIX):
            return self.fanout(channel, payload, exclude)
        if self.shed is None:
            self.shed = {}
        kept = self.shed.get(channel)
        if kept is None:
            self.shed[channel] = [bytes(payload), exclude, 0]
        else:
            kept[0] = bytes(payload)
            kept[1] = exclude
            kept[2] += 1
            self.dropped_overload_total += 1
        return 0

    cdef int _release_inputs(self) except -1:
        """Caught up: read the held inputs again, and deliver what was shed meanwhile."""
        held, self.held_inputs = self.held_inputs, []
        for transport in held:
            if not transport.is_closing():
                transport.resume_reading()
        if self.shed is not None:
            shed, self.shed = self.shed, None
            for channel, (payload, exclude, missed) in shed.items():
                if missed:
                    self.fanout(channel, b'{"type":"lagged","channel":"%s","missed":%d}' % (
                        channel.encode("ascii"), missed))
                self.fanout(channel, payload, exclude)
        return 0

    cdef int _observe_written(self) except -1:
        """The latency of each fan-out whose subscribers are all written now."""
        cdef Py_ssize_t i = 0, count = self.fanout_count
        cdef double now = monotonic()
        while i < count and self.fanout_written_at[i] != 0 and \
                self.fanout_written_at[i] <= self.pending_written + 1:
            self.publish_latency.observe(now - self.fanout_started[i])
            i += 1
        if i:
            memmove(self.fanout_started, self.fanout_started + i, (count - i) * sizeof(double))
            memmove(self.fanout_written_at, self.fanout_written_at + i,
                    (count - i) * sizeof(unsigned long long))
            self.fanout_count = count - i
        return 0

    # Figures, heartbeat, shutdown ----------------------------------------------------------

    def stats(self):
        """This worker's figures, by the keys of fastfan.metrics.METRICS."""
        counts = self.subscriber_counts()  # the join/leave channels are not the clients'
        return {
            "connections": len(self.sessions),
            "connections_total": self.connections_total,
            "channels": len(counts),
            "subscriptions": sum(counts.values()),
            "messages_received_total": self.messages_received_total,
            "deliveries_total": self.deliveries_total,
            "bytes_sent_total": self.bytes_sent_total,
            "dropped_slow_total": self.dropped_slow_total,
            "dropped_conflated_total": self.dropped_conflated_total,
            "slow_consumers_disconnected_total": self.slow_consumers_disconnected_total,
            "publish_refused_total": self.publish_refused_total,
            "backlog_bytes": self.backlog_bytes,
            "inputs_held_total": self.inputs_held_total,
            "dropped_overload_total": self.dropped_overload_total,
        }

    def sweep(self, double ping_interval, double ping_timeout):
        """The periodic heartbeat, one pass over every connection (no timer per connection):
        see Session.check_deadlines."""
        cdef Session session
        cdef double now = monotonic()
        cdef double wall = now_ms() / 1000.0
        for session in list(self.sessions):
            session.check_deadlines(now, wall, ping_interval, ping_timeout)

    def close_all(self, int code, str reason):
        """Send every connection a CLOSE (shutdown); they disconnect as peers answer."""
        cdef Session session
        for session in list(self.sessions):
            session.close(code, reason)

    # Connections and the channel table -----------------------------------------------------

    cdef int attach(self, Session session) except -1:
        cdef str user
        self.sessions.add(session)
        self.connections_total += 1
        user = session.identity.user
        self.users[user] = self.users.get(user, 0) + 1
        return 0

    cdef int note_close(self, Outbox outbox, int code, str reason) except -1:
        """The first CLOSE of a connection, sent or received: for connection_closed."""
        outbox.close_code = code
        if reason and self.close_webhook is not None:
            self.close_reasons[outbox] = reason
        return 0

    cdef int detach(self, Session session) except -1:
        cdef str name, user
        if session not in self.sessions:
            return 0
        self.sessions.discard(session)
        user = session.identity.user
        if self.users[user] == 1:
            del self.users[user]
        else:
            self.users[user] -= 1
        for name in list(session.subscriptions):
            self.unsubscribe(session, name)
        return 0

    cdef int subscribe(self, Session session, str name) except -1:
        cdef Channel channel = self._open(name)
        session.subscriptions[name] = channel.add(session)
        return self._joined(session, name)

    cdef Channel _open(self, str name):
        """The channel `name`, created (and subscribed on the bus) if it is new here."""
        cdef Channel channel = self.channels.get(name)
        if channel is None:
            channel = Channel(name)
            self.channels[name] = channel
            if self.bus.subscribe(name) and name not in self.unconfirmed:
                self.unconfirmed[name] = {}
        return channel

    cdef int _joined(self, Session session, str name) except -1:
        """`session` is a subscriber of `name` now (or will be once its history is read):
        presence and join/leave hear of it."""
        session.subscription_bytes += len(name)
        if not name.startswith(WATCH_PREFIX) and self.presence_channels.allows(name):
            self.presence_answers.pop(name, None)
            self.bus.joined(name, session.client_id, session.identity.user,
                            session.identity.info,
                            "" if session.connection is None else session.metadata_text())
            self._announce(b"join", name, session)
        return 0

    cdef int _announce(self, bytes kind, str channel, Session session) except -1:
        """`join` or `leave` of `session` to the clients that watch `channel`, on every
        worker and node: a message of the watch channel, skipping `session` itself."""
        payload = join_leave_event(kind, channel, session.client_id, session.identity.user,
                                   session.identity.info)
        self.bus.publish(WATCH_PREFIX + channel, payload, None, b"", session)
        return 0

    def confirm(self, str channel):
        """The bus has the subscription: every message published from now on, anywhere,
        reaches this worker. The `subscribed` replies that waited for it go out."""
        cdef Session session
        for session, request_id in self.unconfirmed.pop(channel, {}).items():
            session.held_bytes -= len(request_id)
            if session.dialect is not None:
                session.dialect.confirmed(session, channel)
            else:
                session.queue_bytes(_reply(b"subscribed", channel, request_id))
        self._schedule_read(channel)  # the history subscriptions that waited for it

    cdef bint awaits_confirmation(self, Session session, str channel,
                                  bytes request_id) except -1:
        """Whether `channel`'s subscription is not confirmed yet: then `session`'s
        `subscribed` reply waits for Hub.confirm."""
        cdef dict waiting = self.unconfirmed.get(channel)
        if waiting is None:
            return False
        waiting[session] = request_id
        session.held_bytes += len(request_id)
        return True

    cdef bint holds_reply(self, Session session, str channel) except -1:
        """Whether `session`'s `subscribed` to `channel` waits for Hub.confirm: one per
        session and channel, however often it asks."""
        cdef dict waiting = self.unconfirmed.get(channel)
        return waiting is not None and session in waiting

    cdef int unsubscribe(self, Session session, str name) except -1:
        cdef Channel channel = self.channels[name]
        cdef Py_ssize_t index = session.subscriptions.pop(name)
        cdef Session moved
        if index == WAITING:
            self.recovering.pop((session, name), None)  # its history read, when it comes,
                                                     # skips it
            channel.recovering -= 1
        else:
            moved = <Session>channel.remove_at(index)
            if moved is not None:
                moved.subscriptions[name] = index
        session.subscription_bytes -= len(name)
        if not name.startswith(WATCH_PREFIX) and self.presence_channels.allows(name):
            self.presence_answers.pop(name, None)
            self.bus.left(name, session.client_id)
            self._announce(b"leave", name, session)
        waiting = self.unconfirmed.get(name)
        if waiting and session in waiting:
            session.held_bytes -= len(waiting.pop(session))
        if channel.count == 0 and channel.recovering == 0:
            del self.channels[name]
            self.recoveries.pop(name, None)  # nobody is left to wait for a read
            self.bus.unsubscribe(name)
        return 0

    # History: the subscriptions that start from a position ----------------------------

    cpdef bint keeps_history(self, str channel):
        """Whether `channel` keeps history: its messages are numbered (offset, epoch)."""
        return (self.history_size > 0 and not channel.startswith(WATCH_PREFIX)
                and self.history_channels.allows(channel))

    cdef int subscribe_history(self, Session session, str name, bytes request_id,
                               object recover) except -1:
        """Subscribe `session` to a channel with history, from a position.

        The session joins the channel's array only once its history is read: the read goes
        out once the bus has the channel (so that every message after the position it
        answers comes live), and its answer arrives in the stream of the channel's
        messages, behind every message up to its position and ahead of every later one
        (the buses see to that: `read_history`). So at that moment the `subscribed` reply
        (with the position), the missed messages, then the session's place in the array
        make a seam without a gap or a duplicate, and the fan-out loop checks nothing.
        """
        cdef Channel channel = self._open(name)
        recovery = (session, request_id, recover)
        channel.recovering += 1
        session.subscriptions[name] = WAITING
        self.recovering[(session, name)] = recovery
        self.recoveries.setdefault(name, []).append(recovery)
        self._joined(session, name)
        if name not in self.unconfirmed:
            self._schedule_read(name)
        return 0

    cdef int _schedule_read(self, str name) except -1:
        """One read per channel at a time, for every recovery waiting when it goes out (a
        reconnect storm reads once per loop turn, not once per client)."""
        if name not in self.reading and name in self.recoveries:
            self.reading.add(name)
            self.loop.call_soon(self._read, name)
        return 0

    def _read(self, str name):
        batch = self.recoveries.pop(name, None)
        if not batch or name not in self.channels:
            self.reading.discard(name)
            return
        # Those that recover need every kept message after the lowest position; the
        # others only the position itself; a dialect's that start at the latest, that.
        wanted = [recover.offset for _, _, recover in batch
                  if recover is not None and recover is not LATEST]
        # A cache channel's subscribers get its latest message, and recover only that.
        cache = self.namespaces is not None and self.namespaces.caches(name)
        answer = functools.partial(self._history_read, name, batch, cache)
        try:
            if cache or not wanted and any(recover is LATEST for _, _, recover in batch):
                self.bus.read_history(name, -1, 1, answer)
            else:
                self.bus.read_history(name, min(wanted) if wanted else -1,
                                      self.history_size if wanted else 0, answer)
        except Exception:
            # Whatever failed, the read ends: else the channel stays in `reading` and no
            # later subscriber of it on this worker would ever be answered.
            log.exception("history read of %s failed", name)
            answer(None)

    def _history_read(self, str name, list batch, bint cache, answer):
        """The channel's history, read for `batch`: each still waiting gets its seam."""
        cdef Session session
        cdef Channel channel
        self.reading.discard(name)
        for recovery in batch:
            session = recovery[0]
            if self.recovering.get((session, name)) is not recovery:
                continue  # unsubscribed or disconnected meanwhile
            del self.recovering[(session, name)]
            if recovery[2] is LATEST:  # a dialect's: no reply of ours, whatever the read
                channel = self.channels[name]
                channel.recovering -= 1
                self._resume_latest(session, channel, answer)
                session.subscriptions[name] = channel.add(session)
                continue
            if answer is None:
                session._queue_error(503, "history unavailable: its store did not answer, "
                                     "try again", recovery[1])
                session._leave(name)
                continue
            channel = self.channels[name]
            channel.recovering -= 1
            if cache:
                self._resume_cached(session, channel, recovery[1], recovery[2], answer)
            else:
                self._resume(session, channel, recovery[1], recovery[2], answer)
            session.subscriptions[name] = channel.add(session)
        if name in self.channels and name not in self.unconfirmed:
            self._schedule_read(name)  # those who came while this read was out

    def _resume(self, Session session, Channel channel, bytes request_id, recover, answer):
        """The `subscribed` reply at the channel's position, then, if the client asked to
        recover and everything after its position is still kept (in the same epoch, and
        within what --max-buffer lets it queue), the messages it missed."""
        cdef Py_ssize_t room = self.max_buffer - session.queued()
        cdef list missed = []
        top, epoch, messages = answer
        reply = _reply(b"subscribed", channel.name, request_id)[:-1] + position(top, epoch)
        if recover is not None:
            recovered = (recover.epoch == epoch and 0 <= recover.offset <= top
                         and (recover.offset == top
                              or (messages and messages[0][0] <= recover.offset + 1
                                  and messages[len(messages) - 1][0] == top)))  # not cut short
            if recovered:
                missed = [message for offset, message in messages if offset > recover.offset]
                recovered = sum(len(message) for message in missed) + len(reply) < room // 2
            reply += b',"recovered":true}' if recovered else b',"recovered":false}'
            if not recovered:
                missed = []
        else:
            reply += b"}"
        session.queue_bytes(reply)
        for message in missed:
            session.queue_bytes(message)
        self.deliveries_total += len(missed)
        return 0

    def _resume_latest(self, Session session, Channel channel, answer):
        """A dialect's subscription from the channel's latest message (Session.
        subscribe_to): the dialect queues what its protocol says, before the session takes
        its place in the channel's array. A read that failed, or that stopped short of
        the channel's top (read with others that recover), gives no latest message."""
        latest = None
        if answer is not None:
            top, _, messages = answer
            if messages and messages[len(messages) - 1][0] == top:
                latest = messages[len(messages) - 1][1]
        session.dialect.latest(session, channel.name, latest)
        if latest is not None:
            self.deliveries_total += 1
        return 0

    def _resume_cached(self, Session session, Channel channel, bytes request_id, recover,
                       answer):
        """A cache channel's `subscribed` at its position, then its latest message marked
        `"cached":true`, unless the client holds it already (it recovers from the offset
        of the latest). `recovered`: whether it holds the latest message now (never when
        its namespace refuses recovery)."""
        top, epoch, messages = answer
        reply = _reply(b"subscribed", channel.name, request_id)[:-1] + position(top, epoch)
        holds = recover is not None and recover.epoch == epoch and recover.offset == top
        latest = None
        if messages and not holds:
            message = messages[len(messages) - 1][1]
            latest = message[:len(message) - 1] + b',"cached":true}'
        if recover is not None:
            recovered = (holds or latest is not None) and recover is not NO_RECOVERY
            reply += b',"recovered":true}' if recovered else b',"recovered":false}'
        else:
            reply += b"}"
        session.queue_bytes(reply)
        if latest is not None:
            session.queue_bytes(latest)
            self.deliveries_total += 1
        return 0

    # The server API's commands (a bus brings each to every worker) ---------------------

    def disconnect_user(self, str user):
        """Close every connection of `user` on this worker with 4000 (the API's
        `disconnect`). Returns how many were open."""
        cdef Session session
        cdef list closing
        if user not in self.users:
            return 0
        closing = [session for session in self.sessions if session.identity.user == user]
        for session in closing:
            session.close(CloseCode.SERVER_API, "disconnected by the server")
        return len(closing)

    def unsubscribe_user(self, str user, str channel):
        """End `user`'s subscriptions to `channel` on this worker (and their join/leave
        watch), each connection told `unsubscribed` with reason "server" (the API's
        `unsubscribe`). Returns how many ended."""
        cdef Channel target = self.channels.get(channel)
        cdef Session session
        cdef Py_ssize_t i
        cdef list ended = []
        if target is None or user not in self.users:
            return 0
        for i in range(target.count):
            session = <Session>target.subscribers[i]
            if session.identity.user == user:
                ended.append(session)
        for session, name in list(self.recovering):  # subscribing from a position
            if name == channel and session.identity.user == user:
                ended.append(session)
        for session in ended:
            session._leave(channel)
            session.queue_bytes(_ended(channel, b"server"))
        return len(ended)

    def presence_data(self, presence, bint stats_only):
        """The `data` of a presence (or presence_stats) answer from every worker's and
        node's subscribers (fastfan.bus.base.Presence): for the WebSocket and the API."""
        count, users, clients = presence
        data = {"count": count, "users": len(users)}
        if not stats_only:
            data["clients"] = [_presence_client(entry)
                               for entry in clients[:self.presence_limit]]
            if count > self.presence_limit:
                data["truncated"] = True
        return data
