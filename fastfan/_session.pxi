# Session: what comes in from one connection. Included by _core.pyx.
#
# picows hands each frame to on_ws_frame; the RFC 6455 rules picows leaves to us (RSV
# bits, control frames, fragments, UTF-8) are applied here, a whole message goes to
# _handle as JSON, and each request type has its method. Replies go out through the
# Outbox this class extends.


# What one connection may inflate a second, per publish a second of --publish-rate: 4 MiB
# by default, well within what a worker inflates in a few ms; a 108-byte frame inflating
# to 64 KiB, sent at 350 KB/s, kept a core busy without it (issue #25, finding 11).
cdef double INFLATED_PER_PUBLISH = 4096


cdef inline double inflate_rate(Hub hub):
    """Bytes a connection may inflate a second: INFLATED_PER_PUBLISH per publish a second,
    and at least one message of --max-message-size (an operator who allows 16 MiB
    messages allows inflating them)."""
    return max(hub.publish_rate * INFLATED_PER_PUBLISH, <double>hub.max_message_size)

# Replies the server sends often enough to build once.
cdef bytes PONG = b'{"type":"pong"}'
# A `recover` its namespace refuses: no epoch matches "", so the subscriber is told
# `"recovered":false` at the channel's position; its offset asks the store for nothing.
NO_RECOVERY = Recover(offset=MAX_POSITION, epoch="")
# A dialect's subscription that starts at the channel's latest message (Session.
# subscribe_to): Hub.subscribe_history's seam, told to the dialect (`latest`), not replied.
LATEST = Recover(offset=-1, epoch="")


cdef bytes _reply(bytes kind, str channel, bytes request_id):
    """`{"type":kind,"channel":channel[,"id":id]}`; channel names need no escaping."""
    cdef bytes body = b'{"type":"' + kind + b'","channel":"' + channel.encode("ascii") + b'"'
    if request_id:
        body += b',"id":' + request_id
    return body + b"}"


cdef dict _presence_client(list entry):
    """[clientId, user, info(, metadata)] as a presence answer lists it; no `info` without
    one, no `metadata` when it is empty."""
    client = {"clientId": entry[0], "user": entry[1]}
    if entry[2]:
        client["info"] = msgspec.Raw(entry[2].encode())
    if len(entry) > 3 and entry[3]:
        client["metadata"] = msgspec.Raw(entry[3].encode())
    return client


cdef list presence_entry(Session session):
    """A subscriber as presence lists it (fastfan.bus.base.Entries): [clientId, user, info],
    and the metadata hooks gave it, if any."""
    entry = [session.client_id.decode("ascii"), session.identity.user, session.identity.info]
    if session.connection is not None:
        metadata = session.metadata_text()
        if metadata:
            entry.append(metadata)
    return entry


cdef double refilled(double* tokens, double* refill_at, double rate, double burst) noexcept:
    """A token bucket (`rate` tokens a second, at most `burst` kept), refilled to now: what
    it holds."""
    cdef double now = monotonic()
    tokens[0] = min(burst, tokens[0] + (now - refill_at[0]) * rate)
    refill_at[0] = now
    return tokens[0]


cdef bint take_token(double* tokens, double* refill_at, double rate, double burst,
                     double cost=1) noexcept:
    """True when the bucket had `cost` tokens to take (and they are taken)."""
    if refilled(tokens, refill_at, rate, burst) >= cost:
        tokens[0] -= cost
        return True
    return False


cdef bytes _ended(str channel, bytes reason):
    """The unasked `unsubscribed`: the server ended a subscription, and says why."""
    return b'{"type":"unsubscribed","channel":"%s","reason":"%s"}' % (channel.encode("ascii"),
                                                                      reason)


cdef bytes _with_id(bytes body, bytes request_id):
    """A reply object encoded as `body`, with the request's `id` added when it had one."""
    if not request_id:
        return body
    return body[:-1] + b',"id":' + request_id + b"}"


cdef bytes _error(int code, str message, bytes request_id):
    cdef bytes body = b'{"type":"error","code":%d,"message":%s' % (code, encode_json(message))
    if request_id:
        body += b',"id":' + request_id
    return body + b"}"


@cython.final
cdef class Session(Outbox):
    """One WebSocket connection: frames in, RFC 6455 rules and limits, requests."""

    def __cinit__(self, Hub hub, identity, bint echo=False, bint deflate_in=False,
                  bint deflate_out=False, bytes client_id=None):
        self.hub = hub
        self.client_id = client_id  # None: numbered once connected (hooks choose it earlier)
        self.identity = identity
        self.echo = echo
        self.deflate_in = deflate_in
        self.deflate_out = deflate_out
        self.subscriptions = {}
        self.tokens = 2 * hub.publish_rate
        self.inflate_tokens = 2 * inflate_rate(hub)
        self.read_tokens = 2 * READ_RATE
        self.history_quota = 2 * hub.publish_rate * BYTES_PER_PUBLISH
        self.subscribe_tokens = hub.subscribe_burst()  # all its channels at connect
        self.presence_tokens = 2 * hub.subscribe_rate
        self.fd = -1
        self.expires_at = identity.expires_at or 0

    def __dealloc__(self):
        self._forget_fragments()

    # picows callbacks -----------------------------------------------------------------

    cpdef on_ws_connected(self, WSTransport transport):
        cdef Hub hub = self.hub
        self.transport = transport
        # Memory per idle connection: the parsed upgrade request and response (header
        # dicts) are not needed once connected, and picows's framing buffer can start small.
        transport.request = None
        transport.response = None
        transport._write_buffer = MemoryBuffer(PICOWS_WRITE_BUFFER)
        tcp = transport.underlying_transport
        if not transport.is_secure:  # TLS: fd stays -1, every write goes through `tcp`
            # Any byte left unsent makes the transport pause us, and resume us once it has
            # written everything: so while not paused, our own sendmsg() cannot jump the queue.
            tcp.set_write_buffer_limits(0, 0)
            self.paused = tcp.get_write_buffer_size() > 0
            self.fd = tcp.get_extra_info("socket").fileno()
        if self.client_id is None:
            self.client_id = hub.new_client_id()
        self.connected_at = now_ms()
        self.last_seen = monotonic()
        self.refill_at = self.read_refill_at = self.history_quota_at = self.last_seen
        self.inflate_refill_at = self.last_seen
        self.subscribe_refill_at = self.presence_refill_at = self.last_seen
        hub.attach(self)
        if self.dialect is not None:
            self.dialect.connected(self)
        elif not self.echo:
            welcome = b'{"type":"welcome","data":{"clientId":"%s","user":%s,"timestamp":%d}}' % (
                self.client_id, encode_json(self.identity.user), now_ms())
            self.queue_bytes(welcome)
            if self.connection is not None:
                hub.hooks.connected(self)

    cpdef on_ws_disconnected(self, WSTransport transport):
        self.hub.detach(self)
        if self.dialect is not None:
            self.dialect.disconnected(self)
        if self.hub.close_webhook is not None:
            self.hub.close_webhook(self.identity.user, self.client_id,
                                   self.close_code or WSCloseCode.ABNORMAL_CLOSURE,
                                   self.hub.close_reasons.pop(self, ""))
        self.discard_output()
        self._forget_fragments()
        self.conflated = None
        self.closing = True
        if self.connection is not None and self.client_id is not None:
            self.hub.hooks.disconnected(self)

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef WSMsgType kind = frame.msg_type
        self.last_seen = monotonic()
        if frame.rsv2 or frame.rsv3 or (frame.rsv1 and not (
                self.deflate_in and (kind == WSMsgType.TEXT or kind == WSMsgType.BINARY))):
            # permessage-deflate sets RSV1 on the first frame of a data message only
            if not self.closing:
                self.close(WSCloseCode.PROTOCOL_ERROR, "reserved bits set without an extension")
            return
        if kind == WSMsgType.CLOSE:
            self._on_close_frame(frame)
            return
        if self.closing:
            return
        if kind == WSMsgType.PING:
            # Answered here, not by picows, so that the RSV check above applies and the
            # pong keeps its place behind the frames already queued.
            self.queue_frame(WSMsgType.PONG, frame.payload_ptr, frame.payload_size)
            return
        if kind == WSMsgType.PONG:
            return  # only proves the peer alive (last_seen)
        if kind == WSMsgType.CONTINUATION:
            self._on_continuation(frame)
            return
        if self.fragment_type:
            self.close(WSCloseCode.PROTOCOL_ERROR, "new message before the last one ended")
            return
        if kind == WSMsgType.BINARY and not self.echo:
            self.close(WSCloseCode.UNSUPPORTED_DATA, "binary frames are not accepted")
            return
        if frame.rsv1 and frame.fin:
            self._on_compressed(kind, frame.payload_ptr, frame.payload_size)
            return
        if kind == WSMsgType.TEXT and not frame.rsv1:  # compressed: checked once inflated
            self.utf8_state = utf8_validate(UTF8_ACCEPT, <uint8_t*>frame.payload_ptr,
                                            frame.payload_size)
            if self.utf8_state == UTF8_REJECT:
                self.close(WSCloseCode.INVALID_TEXT, "text is not valid UTF-8")
                return
        if frame.fin:
            if kind == WSMsgType.TEXT and self.utf8_state != UTF8_ACCEPT:
                self.close(WSCloseCode.INVALID_TEXT, "text is not valid UTF-8")
                return
            self._on_message(kind, frame.payload_ptr, frame.payload_size)
            return
        self.fragments = <Reassembly*>calloc(1, sizeof(Reassembly))
        if self.fragments == NULL:
            raise MemoryError()
        self.fragment_type = kind
        self.fragments.started = self.last_seen
        self.fragments.compressed = frame.rsv1
        buffer_append(&self.fragments.buffer, frame.payload_ptr, frame.payload_size)

    cdef int _on_continuation(self, WSFrame frame) except -1:
        cdef int kind
        if not self.fragment_type:
            self.close(WSCloseCode.PROTOCOL_ERROR, "continuation frame without a message")
            return 0
        if self.fragments.buffer.size + frame.payload_size > self.hub.max_message_size:
            self.close(WSCloseCode.MESSAGE_TOO_BIG, "message too big")
            return 0
        if self.fragment_type == WSMsgType.TEXT and not self.fragments.compressed:
            self.utf8_state = utf8_validate(self.utf8_state, <uint8_t*>frame.payload_ptr,
                                            frame.payload_size)
            if self.utf8_state == UTF8_REJECT or (frame.fin and self.utf8_state != UTF8_ACCEPT):
                self.close(WSCloseCode.INVALID_TEXT, "text is not valid UTF-8")
                return 0
        buffer_append(&self.fragments.buffer, frame.payload_ptr, frame.payload_size)
        if frame.fin:
            kind = self.fragment_type
            self.fragment_type = 0
            try:
                if self.fragments.compressed:
                    self._on_compressed(kind, self.fragments.buffer.data,
                                        self.fragments.buffer.size)
                else:
                    self._on_message(kind, self.fragments.buffer.data,
                                     self.fragments.buffer.size)
            finally:
                self._forget_fragments()
        return 0

    cdef int _forget_fragments(self) except -1:
        """Drop a message being reassembled, and its memory."""
        self.fragment_type = 0
        if self.fragments != NULL:
            buffer_release(&self.fragments.buffer)
            free(self.fragments)
            self.fragments = NULL
        return 0

    cdef int _on_close_frame(self, WSFrame frame) except -1:
        """Answer the peer's CLOSE with its own code, then hang up."""
        cdef int code = frame.get_close_code() if frame.payload_size >= 2 else WSCloseCode.OK
        reason = frame.get_close_message() or b""  # (None for a CLOSE without a body)
        if not self.close_code:  # the client's code and reason, for connection_closed
            self.hub.note_close(self, code, reason.decode("utf-8", "replace"))
        if self.connection is not None and not self.closing:
            self.connection.closed_with(code, reason)
        if not self.closing:
            if is_valid_close_code(code):
                self._send_close(code, "")
            else:
                self._send_close(WSCloseCode.PROTOCOL_ERROR, "invalid close code")
        self.transport.disconnect()
        return 0

    cdef int _send_close(self, int code, str reason) except -1:
        if self.connection is not None:
            self.connection.closed_with(code, reason)
        return Outbox._send_close(self, code, reason)

    cdef int check_deadlines(self, double now, double wall, double ping_interval,
                             double ping_timeout) except -1:
        """The heartbeat sweep's look at this connection: token expiry, a fragmented
        message left unfinished, silence (ping once, then close)."""
        cdef double silent
        if self.closing:
            return 0
        if self.expires_at and wall >= self.expires_at:
            if self.connection is not None and self.hub.hooks.app.refresh_hook is not None:
                self.expires_at = 0  # until the App's refresh answers (renew)
                self.hub.hooks.refresh(self)
                return 0
            self.close(CloseCode.TOKEN_EXPIRED, "token expired")
            return 0
        if self.fragment_type and now - self.fragments.started >= FRAGMENT_TIMEOUT:
            self._forget_fragments()
            self.close(WSCloseCode.POLICY_VIOLATION, "message not completed in time")
            return 0
        if self.out.size == 0:
            buffer_release(&self.out)  # empty now: an idle connection holds no buffer
                                       # (a busy one pays one malloc per sweep)
        silent = now - self.last_seen
        if silent >= ping_timeout:
            self.close(WSCloseCode.GOING_AWAY, "heartbeat timeout")
        elif silent >= ping_interval and self.pinged_at < self.last_seen:
            self.pinged_at = now
            self.queue_frame(WSMsgType.PING, NULL, 0)
        return 0

    # Messages --------------------------------------------------------------------------

    cdef int _on_message(self, int kind, const char* payload, Py_ssize_t size) except -1:
        cdef Hub hub = self.hub
        cdef double started
        if self.echo:
            if self.deflate_in:
                return self.queue_compressed(kind, payload, size)
            self.queue_frame(kind, payload, size)
            return 0
        started = monotonic()
        hub.messages_received_total += 1
        self.messages_received += 1
        self.bytes_received += size
        try:
            if self.dialect is None:
                self._handle(payload, size)
            else:
                self.dialect.handle(self, PyBytes_FromStringAndSize(payload, size))
        finally:
            hub.handling.record(monotonic() - started)
        if hub.backlog_bytes > hub.max_backlog and not self.closing:
            # The server is behind: this client's next messages wait in its socket (and
            # its publishes' `published` with them) until half the backlog is written.
            hub.hold_input(self.transport.underlying_transport)
        return 0

    cdef int _on_compressed(self, int kind, const char* payload, Py_ssize_t size) except -1:
        """A whole permessage-deflate message: inflated within --max-message-size (no
        state kept: the client has no context takeover), checked, then handled.

        Inflating is work the wire does not show (100 bytes inflate to 64 KiB): the bytes
        inflated count against a bucket of INFLATED_PER_PUBLISH a second per publish a
        second of --publish-rate; a message that comes while it is empty is refused (429)
        without being inflated. (Not on --echo-path, a test endpoint.)"""
        cdef Deflate deflate = self.hub.deflate
        cdef Py_ssize_t inflated
        cdef double rate = inflate_rate(self.hub)
        # (the bucket may owe: a message is charged once inflated, its size unknown before)
        if not self.echo and refilled(&self.inflate_tokens, &self.inflate_refill_at, rate,
                                      2 * rate) <= 0:
            return self._queue_error(
                429, f"compressed input rate limit exceeded: one connection may inflate "
                f"{rate:.0f} bytes a second (--publish-rate x {INFLATED_PER_PUBLISH:.0f}, or "
                "--max-message-size if more); the message was dropped", b"")
        inflated = deflate.inflate(payload, size, self.hub.max_message_size)
        if inflated > 0 and not self.echo:
            self.inflate_tokens -= inflated
        if inflated == INFLATED_TOO_BIG:
            self.close(WSCloseCode.MESSAGE_TOO_BIG, "message too big")
            return 0
        if inflated == INFLATE_FAILED:
            self.close(WSCloseCode.INVALID_TEXT, "compressed data does not inflate")
            return 0
        if kind == WSMsgType.TEXT and utf8_validate(
                UTF8_ACCEPT, <uint8_t*>deflate.inflated.data, inflated) != UTF8_ACCEPT:
            self.close(WSCloseCode.INVALID_TEXT, "text is not valid UTF-8")
            return 0
        return self._on_message(kind, deflate.inflated.data, inflated)

    cdef int _handle(self, const char* payload, Py_ssize_t size) except -1:
        cdef bytes request_id = b""
        try:
            request = decode_request(PyBytes_FromStringAndSize(payload, size))
        except msgspec.ValidationError as exc:
            return self._queue_error(400, f"invalid message: {exc}", b"")
        except msgspec.DecodeError as exc:
            return self._queue_error(400, f"invalid JSON: {exc}", b"")
        except RecursionError:
            return self._queue_error(400, "invalid JSON: nested too deeply", b"")
        if request.id:
            request_id = bytes(request.id)
        if self.hooks_pending:  # behind a hook of this connection's, in its order
            self.hub.hooks.later(self, request, request_id)
            return 0
        return self._dispatch(request, request_id)

    def dispatch(self, request, bytes request_id):
        """A request that waited behind a hook (fastfan.hooks), handled now."""
        if not self.closing:
            self._dispatch(request, request_id)

    cdef int _dispatch(self, request, bytes request_id) except -1:
        kind_name = request.type
        if kind_name == "publish":
            return self._publish(request, request_id)
        if kind_name == "ping":
            if request_id:
                return self.queue_bytes(b'{"type":"pong","id":' + request_id + b"}")
            return self.queue_bytes(PONG)
        if kind_name == "subscribe":
            return self._subscribe(request.channel, request_id, request.join_leave,
                                   request.recover)
        if kind_name == "unsubscribe":
            return self._unsubscribe(request.channel, request_id)
        if kind_name == "stats":
            return self._stats(request_id)
        if kind_name == "refresh":
            return self._refresh(request.token, request_id)
        if kind_name == "presence":
            return self._presence(request.channel, request_id, False)
        if kind_name == "presence_stats":
            return self._presence(request.channel, request_id, True)
        if kind_name == "history":
            return self._history(request, request_id)
        if kind_name == "rpc":
            return self._rpc(request, request_id)
        return self._queue_error(400, f"unknown message type {kind_name!r}", request_id)

    cdef int _check_channel(self, channel, bytes request_id) except -1:
        """1 when `channel` is a valid name; else an error is sent and 0 returned."""
        if channel is None:
            self._queue_error(400, "missing 'channel'", request_id)
            return 0
        if not is_valid_channel(channel):
            self._refuse(errors.invalid_channel(), request_id)
            return 0
        return 1

    cdef int _subscribe(self, channel, bytes request_id, bint join_leave,
                        recover, bint hooked=False, bint admitted=False) except -1:
        """A subscribe; `hooked`: the App's can_subscribe allowed it (the permission was
        checked before), or its authenticate named the channel (the server's decision);
        `admitted`: its namespace's subscriber bound let it in."""
        cdef Hub hub = self.hub
        cdef bint history
        rules = None
        if not self._check_channel(channel, request_id):
            return 0
        if not hooked and not self.identity.subscribe.allows(channel):
            return self._queue_error(403, f"not permitted to subscribe to {channel}", request_id)
        if recover is not None and recover.offset < 0:
            return self._queue_error(400, "'recover' needs an offset of 0 or more", request_id)
        if hub.namespaces is not None:
            rules = hub.namespaces.of(channel)
        if hub.hook_subscribe and not hooked and (rules is None or rules.ask_subscribe):
            # can_subscribe decides; subscribe_allowed goes on from here
            hub.hooks.can_subscribe(self, channel, request_id, join_leave, recover)
            return 0
        if rules is not None:
            if join_leave and not rules.join_leave:
                return self._queue_error(403, f"join and leave are off for {channel} (its "
                                         "namespace's join_leave)", request_id)
            if recover is not None and not rules.recover:
                recover = NO_RECOVERY  # subscribed at the channel's position, recovered:false
            if rules.max_subscribers and not admitted and channel not in self.subscriptions:
                # counted across the deployment first; subscribe_admitted goes on
                hub.namespaces.admit(self, channel, rules.max_subscribers, request_id,
                                     join_leave, recover)
                return 0
        history = hub.keeps_history(channel)
        new = channel not in self.subscriptions
        watch = join_leave and WATCH_PREFIX + channel not in self.subscriptions
        if new:
            if len(self.subscriptions) >= hub.max_subscriptions:
                return self._queue_error(
                    429, f"subscription limit reached ({hub.max_subscriptions})", request_id)
            if self.subscription_bytes + len(channel) > hub.max_subscription_bytes:
                return self._queue_error(
                    429, f"subscription limit reached: channel names add up to more than "
                    f"{hub.max_subscription_bytes} bytes", request_id)
        elif history:
            # Subscribed already: at a position it was told then, which stands.
            return self._queue_error(400, f"already subscribed to {channel}", request_id)
        elif hub.holds_reply(self, channel):
            # Its `subscribed` waits for the bus already: a repeat would hold one more
            # reply (and its id) for as long as the bus is down.
            return self._queue_error(400, f"already subscribing to {channel}: its "
                                     "'subscribed' follows once the bus has it", request_id)
        if self.held_bytes and self.held_bytes + len(request_id) > hub.max_buffer:
            # Replies held for the bus are output owed: within --max-buffer, as the rest.
            return self._refuse(errors.BUS_UNAVAILABLE, request_id)
        if (new or watch) and not self._may_subscribe():
            # Each change is a join or leave for every watcher, and bus traffic.
            return self._queue_error(429, f"subscribe rate limit ({hub.subscribe_rate:g}/s) "
                                     "exceeded", request_id)
        if watch:
            # First: the session's own join, announced next, then comes back (through
            # Redis) on a channel the bus knows it watches, and is kept from it.
            hub.subscribe(self, WATCH_PREFIX + channel)
        if new and history:
            hub.subscribe_history(self, channel, request_id, recover)
        elif new:
            hub.subscribe(self, channel)
        if history:
            return 0  # `subscribed`, with the position, once the history is read
        if hub.awaits_confirmation(self, channel, request_id):
            return 0  # `subscribed` is a promise: it goes once the bus has the subscription
        return self.queue_bytes(_reply(b"subscribed", channel, request_id))

    def subscribe_allowed(self, str channel, bytes request_id, bint join_leave, recover):
        """A subscribe its hook allowed (or a channel authenticate named: no hook asked)."""
        if not self.closing:
            self._subscribe(channel, request_id, join_leave, recover, True)

    def subscribe_admitted(self, str channel, bytes request_id, bint join_leave, recover):
        """A subscribe its namespace's subscriber bound let in (its permission and hook
        passed before)."""
        if not self.closing:
            self._subscribe(channel, request_id, join_leave, recover, True, True)

    def refuse(self, int code, str message, bytes request_id):
        """An `error` reply to a request decided outside the core."""
        if not self.closing:
            self._queue_error(code, message, request_id)

    cdef int _unsubscribe(self, channel, bytes request_id) except -1:
        if not self._check_channel(channel, request_id):
            return 0
        if channel in self.subscriptions:
            self._leave(channel)
        return self.queue_bytes(_reply(b"unsubscribed", channel, request_id))

    cdef int _leave(self, str channel) except -1:
        """Unsubscribe from `channel`, and from its join and leave if they were asked for.
        A `subscribed` still held for the bus goes first: the replies keep the order of the
        requests, whoever ends the subscription."""
        subscribe_id = self.hub.unconfirmed.get(channel, {}).get(self)
        if subscribe_id is not None:
            self.queue_bytes(_reply(b"subscribed", channel, subscribe_id))
        recovery = self.hub.recovering.get((self, channel))
        if recovery is not None:  # its history read is not back yet
            self.queue_bytes(_reply(b"subscribed", channel, recovery[1]))
        self.hub.unsubscribe(self, channel)
        if WATCH_PREFIX + channel in self.subscriptions:
            self.hub.unsubscribe(self, WATCH_PREFIX + channel)
        return 0

    cdef int _publish(self, request, bytes request_id) except -1:
        """A client's publish: checked, rate-limited (before any hook: a flood costs the
        application nothing), then decided by the App's can_publish if it has one."""
        cdef Hub hub = self.hub
        channel = request.channel
        if not self._check_channel(channel, request_id):
            return 0
        if not request.data:
            return self._queue_error(400, "publish needs 'data'", request_id)
        rules = None if hub.namespaces is None else hub.namespaces.of(channel)
        if rules is None or rules.publish == "token":
            if not self.identity.publish.allows(channel):
                return self._queue_error(403, f"not permitted to publish to {channel}",
                                         request_id)
        elif rules.publish == "subscribers":
            if channel not in self.subscriptions:
                return self._queue_error(403, f"only subscribers of {channel} may publish to "
                                         "it", request_id)
        else:
            return self._queue_error(403, f"{channel} takes publishes from the server API "
                                     "only", request_id)
        if not self._take_token():
            hub.publish_refused_total += 1
            if self.refused_since and monotonic() - self.refused_since > RATE_LIMIT_PATIENCE:
                self.close(CloseCode.RATE_LIMITED, "publish rate limit exceeded")
                return 0
            return self._queue_error(429, f"publish rate limit ({hub.publish_rate:g}/s) exceeded",
                                    request_id)
        if hub.hook_publish is not None and (rules is None or rules.ask_publish):
            return self._publish_hooked(request, channel, request_id)
        return self._publish_allowed(channel, request.data, request_id, request.echo, True)

    cdef int _publish_hooked(self, request, str channel, bytes request_id) except -1:
        """The App's can_publish decides. Its common answer, None at once, is carried out
        here: one call of the hook and one step of its coroutine, the per-publish cost of
        a hook. Any other answer, a wait or a fault goes to fastfan.hooks."""
        cdef PyObject* answer = NULL
        cdef int outcome = -1  # -1: not a coroutine, else PyIter_Send's
        result = None
        raw = request.data
        try:
            data = decode_json(raw)
        except msgspec.DecodeError:
            return self._queue_error(400, "invalid JSON in 'data'", request_id)
        try:
            coroutine = self.hub.hook_publish(self.connection, channel, data)
            if type(coroutine) is CoroutineType:
                outcome = PyIter_Send(coroutine, None, &answer)
                result = <object>answer
                Py_DECREF(result)  # PyIter_Send's new reference; `result` holds its own
        except BaseException as exc:  # whatever a hook raises is the hook's fault
            self.hub.hooks.can_publish_failed(self, request_id, exc)
            return 0
        if outcome == 0 and result is None:
            if not self.closing:  # (the hook may have closed it)
                self._publish_allowed(channel, raw, request_id, request.echo, True)
            return 0
        self.hub.hooks.can_publish(self, request, request_id, coroutine, outcome, result)
        return 0

    cdef int _publish_allowed(self, str channel, data, bytes request_id, bint echo,
                              bint history) except -1:
        """A publish checked and allowed: `data` (the JSON bytes) to the bus, kept in
        history (on a channel that has it) unless `history` is false."""
        cdef Hub hub = self.hub
        payload = hub.encode_message(channel, data, self.client_id)
        history = history and hub.keeps_history(channel)
        if history and not self._take_history_quota(len(payload) + CHANNEL_COST):
            return self._queue_error(
                429, f"history quota exceeded: one connection may add "
                f"{hub.publish_rate * BYTES_PER_PUBLISH:.0f} bytes a second to history "
                f"(--publish-rate x {BYTES_PER_PUBLISH})", request_id)
        # On a channel with history the bus numbers the message (and acknowledges it with
        # its position: PENDING, or REFUSED).
        publish = hub.bus.publish_history if history else hub.bus.publish
        # (a C int: compared with the C enum, not the Python one each time)
        cdef int outcome = publish(channel, payload, self if request_id else None, request_id,
                                   None if echo else self)
        if outcome == BusResult.REFUSED:
            return self._refuse(errors.BUS_UNAVAILABLE, request_id)
        if hub.publish_webhook is not None:
            hub.publish_webhook(channel, self.identity.user, self.client_id, data)
        if outcome == BusResult.DONE and request_id:
            return self.queue_bytes(_reply(b"published", channel, request_id))
        return 0  # PENDING: the bus calls acknowledge() once it knows

    def publish_allowed(self, request, bytes request_id, data, bint history):
        """A publish its hook allowed: `data` (JSON bytes) replaces the client's unless
        None; `history` false keeps it out of history."""
        if not self.closing:
            self._publish_allowed(request.channel, request.data if data is None else data,
                                  request_id, request.echo, history)

    cdef int _rpc(self, request, bytes request_id) except -1:
        """`{"type":"rpc","method":M,"data":D}`: the App's method answers, in fastfan.hooks."""
        if not isinstance(request.method, str) or not request.method:
            return self._queue_error(400, "rpc needs 'method'", request_id)
        if self.hub.hooks is None:
            return self._queue_error(404, f"unknown method {request.method!r}", request_id)
        self.hub.hooks.rpc(self, request, request_id)
        return 0

    def reply(self, bytes body):
        """A reply (an encoded JSON object) from fastfan.hooks."""
        if not self.closing:
            self.queue_bytes(body)

    def send_data(self, bytes data):
        """connection.send: a `message` to this connection alone."""
        if not self.closing:
            self.queue_bytes(b'{"type":"message","channel":null,"data":%s,"from":"server",'
                             b'"timestamp":%d}' % (data, now_ms()))

    def heartbeat(self):
        """The seed's HeartbeatManager.getStatus: (last heard, ms since the epoch; pings
        unanswered; alive)."""
        cdef double now = monotonic()
        return (now_ms() - <long long>((now - self.last_seen) * 1000),
                1 if self.pinged_at > self.last_seen else 0, not self.closing)

    @property
    def closed(self):
        return self.closing

    def pause_reading(self):
        """Read nothing more from the client for now (its requests wait for a hook)."""
        if not self.closing and self.transport is not None:
            self.transport.underlying_transport.pause_reading()

    def resume_reading(self):
        if not self.closing and self.transport is not None:
            self.transport.underlying_transport.resume_reading()

    def renew(self, double expires_at):
        """The App's refresh gave the connection a new expiry (epoch seconds)."""
        self.expires_at = expires_at

    def metadata_text(self):
        """connection.metadata as JSON text, "" when empty or without an App."""
        return "" if self.connection is None else self.connection.metadata_text()

    def metadata_changed(self):
        """connection.metadata changed: presence shows it from now on (a bus that keeps
        presence elsewhere writes it there again)."""
        cdef Hub hub = self.hub
        metadata = self.metadata_text()
        for channel in self.subscriptions:
            if not channel.startswith(WATCH_PREFIX) and hub.presence_channels.allows(channel):
                hub.presence_answers.pop(channel, None)
                hub.bus.joined(channel, self.client_id, self.identity.user,
                               self.identity.info, metadata)

    def acknowledge(self, str channel, bytes request_id, bint ok, bytes position=b"",
                    str refusal=None):
        """The bus's late answer to a publish that asked for one (an `id`); on a channel
        with history, with the message's `position` (history.position), or the
        `refusal` of a history store that is full (507)."""
        if ok:
            self.queue_bytes(_reply(b"published", channel, request_id)[:-1] + position + b"}")
        elif refusal is not None:
            self._queue_error(507, refusal, request_id)
        else:
            self._queue_error(503, "message bus unavailable; the message was not published",
                             request_id)

    cdef int _stats(self, bytes request_id) except -1:
        """The seed's getStats for this connection: its figures and its channels."""
        reply = {"type": "stats", "data": {
            "clientId": self.client_id.decode("ascii"), "user": self.identity.user,
            "connectedAt": self.connected_at, "messagesReceived": self.messages_received,
            "messagesSent": self.messages_sent, "bytesReceived": self.bytes_received,
            "bytesSent": self.bytes_sent,
            "channels": [c for c in self.subscriptions if not c.startswith(WATCH_PREFIX)]}}
        last_seen, unanswered, alive = self.heartbeat()
        reply["data"]["heartbeat"] = {"lastSeen": last_seen, "unanswered": unanswered,
                                      "alive": alive}
        return self.queue_bytes(_with_id(encode_json(reply), request_id))

    cdef int _refresh(self, token, bytes request_id) except -1:
        """A new token for the same user, before the old one expires: its permissions
        replace the old ones, and subscriptions they no longer allow end."""
        cdef Hub hub = self.hub
        if not token:
            return self._queue_error(400, "refresh needs 'token'", request_id)
        if hub.verify_token is None:
            return self._queue_error(401, "this server checks no tokens (--insecure)",
                                     request_id)
        try:
            identity = hub.verify_token(token)
        except AuthError as exc:
            return self._queue_error(401, f"refresh refused: {exc}", request_id)
        if identity.user != self.identity.user:
            return self._queue_error(401, "refresh refused: the token is for another user",
                                     request_id)
        self.identity = identity
        self.expires_at = identity.expires_at or 0
        for channel in list(self.subscriptions):
            if not channel.startswith(WATCH_PREFIX) and not identity.subscribe.allows(channel):
                self._leave(channel)
                self.queue_bytes(_ended(channel, b"permission"))
        expires = b"%d" % (identity.expires_at * 1000) if identity.expires_at else b"null"
        return self.queue_bytes(_with_id(b'{"type":"refreshed","expires":%s}' % expires,
                                         request_id))

    cdef int _presence(self, channel, bytes request_id, bint stats_only) except -1:
        """Who is subscribed to `channel` on every worker (the seed's group members)."""
        cdef Hub hub = self.hub
        if not self._check_channel(channel, request_id):
            return 0
        if not self.identity.subscribe.allows(channel):
            return self._queue_error(403, f"not permitted to see who is in {channel}",
                                     request_id)
        if not (hub.presence_channels if hub.namespaces is None
                else hub.namespaces.presence_asked).allows(channel):
            return self._refuse(errors.no_presence(channel), request_id)
        if not self._may_ask_presence():
            return self._queue_error(429, f"presence rate limit ({hub.subscribe_rate:g}/s) "
                                     "exceeded", request_id)
        hub.gather_presence(channel, functools.partial(self.answer_presence, channel,
                                                       request_id, stats_only))
        return 0

    cdef int _history(self, request, bytes request_id) except -1:
        """The kept messages of a channel: the last `limit`, or the first `limit` after
        offset `since` (a client paging forward, in the epoch it names)."""
        cdef Hub hub = self.hub
        channel = request.channel
        if not self._check_channel(channel, request_id):
            return 0
        if not self.identity.subscribe.allows(channel):
            return self._queue_error(403, f"not permitted to read the history of {channel}",
                                     request_id)
        limit = 100 if request.limit is None else request.limit
        if limit < 0 or (request.since is not None and request.since < 0):
            return self._refuse(errors.NEGATIVE_POSITION, request_id)
        if not self._take_read_token():
            return self._queue_error(429, f"history rate limit ({READ_RATE:g}/s) exceeded",
                                     request_id)
        if not hub.keeps_history(channel):
            return self.queue_bytes(_with_id(
                b'{"type":"history","channel":"%s","data":{"offset":0,"epoch":"",'
                b'"messages":[]}}' % channel.encode("ascii"), request_id))
        hub.bus.read_history(channel, -1 if request.since is None else request.since,
                             min(limit, hub.history_size),
                             functools.partial(self.answer_history, channel, request_id,
                                               request.since is not None, request.epoch))
        return 0

    def answer_history(self, str channel, bytes request_id, bint paging, epoch, answer):
        """The history reply, once the store answered (`answer`: a HistoryAnswer, or None
        when it could not)."""
        if self.closing:
            return
        if answer is None:
            self._refuse(errors.HISTORY_UNAVAILABLE, request_id)
            return
        top, current, messages = answer
        if paging and epoch is not None and epoch != current:
            self._refuse(errors.epoch_changed(channel, current), request_id)
            return
        size = sum([len(message) + 1 for _, message in messages]) + 128 + len(request_id)
        if self.queued() + size > self.hub.max_buffer:
            self._queue_error(413, f"history answer too large: {size} bytes would pass this "
                              f"connection's buffer ({self.hub.max_buffer} bytes, "
                              f"{self.queued()} queued): ask for a smaller 'limit' and page "
                              "with 'since'", request_id)
            return
        self.queue_bytes(_with_id(
            b'{"type":"history","channel":"%s","data":{"offset":%d,"epoch":"%s","messages":[%s]}}'
            % (channel.encode("ascii"), top, current.encode("ascii"),
               b",".join([message for _, message in messages])), request_id))

    def answer_presence(self, str channel, bytes request_id, bint stats_only, presence):
        """The presence reply, once every worker's and node's part is in (`presence`:
        fastfan.bus.base.Presence, or None if one could not answer)."""
        cdef Hub hub = self.hub
        if self.closing:
            return
        if presence is None:
            self._refuse(errors.PRESENCE_UNAVAILABLE, request_id)
            return
        reply = {"type": "presence_stats" if stats_only else "presence", "channel": channel,
                 "data": hub.presence_data(presence, stats_only)}
        self.queue_bytes(_with_id(encode_json(reply), request_id))

    cdef bint _take_token(self):
        """A publish's token: `publish_rate` per second, bursts of twice that."""
        cdef double burst = 2 * self.hub.publish_rate
        if take_token(&self.tokens, &self.refill_at, self.hub.publish_rate, burst):
            if self.tokens >= burst - 1:
                self.refused_since = 0  # the client slowed down: forgive past refusals
            return True
        if not self.refused_since:
            self.refused_since = self.refill_at
        return False

    cdef bint _take_read_token(self):
        """A `history` request's token: READ_RATE a second, bursts of twice that."""
        return take_token(&self.read_tokens, &self.read_refill_at, READ_RATE, 2 * READ_RATE)

    cdef bint _take_history_quota(self, Py_ssize_t size):
        """`size` bytes the connection adds to history: BYTES_PER_PUBLISH a second for
        each publish a second of `publish_rate` allows, bursts of twice that."""
        cdef double rate = self.hub.publish_rate * BYTES_PER_PUBLISH
        return take_token(&self.history_quota, &self.history_quota_at, rate, 2 * rate, size)

    cdef bint _may_subscribe(self):
        """A token for a subscribe that changes something: `subscribe_rate` per second,
        bursts of Hub.subscribe_burst (a client takes all its channels at connect)."""
        return take_token(&self.subscribe_tokens, &self.subscribe_refill_at,
                          self.hub.subscribe_rate, self.hub.subscribe_burst())

    cdef bint _may_ask_presence(self):
        """A token for a presence request: `subscribe_rate` per second, bursts of twice
        that."""
        return take_token(&self.presence_tokens, &self.presence_refill_at,
                          self.hub.subscribe_rate, 2 * self.hub.subscribe_rate)

    cdef int _refuse(self, tuple refusal, bytes request_id) except -1:
        """One of fastfan.errors' refusals, as an `error` reply."""
        return self._queue_error(refusal[0], refusal[1], request_id)

    cdef int _queue_error(self, int code, str message, bytes request_id) except -1:
        return self.queue_bytes(_error(code, message, request_id))

    # What a dialect (another protocol, Python) does with the connection --------------

    def send_text(self, bytes payload):
        """Queue `payload` as one text message, behind what is queued."""
        self.queue_bytes(payload)

    def subscribe_to(self, str channel, bint latest=False):
        """Subscribe to `channel` on the bus, unchecked (the dialect checked): its messages
        reach this connection by the core's fan-out, as they are; presence hears of it.
        True when the bus has yet to confirm it: dialect.confirmed(session, channel)
        follows once every message published anywhere reaches it.

        `latest`, on a channel with history: dialect.latest(session, channel, payload)
        follows instead, with the channel's latest message (None: none kept) at the
        moment the connection starts to receive the channel, as a recovery's seam: no
        message comes twice, none older after a newer one."""
        if channel in self.subscriptions:
            return False
        if latest and self.hub.keeps_history(channel):
            self.hub.subscribe_history(self, channel, b"", LATEST)
            return True
        self.hub.subscribe(self, channel)
        return self.hub.awaits_confirmation(self, channel, b"")

    def unsubscribe_from(self, str channel):
        if channel in self.subscriptions:
            self.hub.unsubscribe(self, channel)

    def take_identity(self, identity):
        """Who the connection is from now on (a dialect learns it after the upgrade): its
        next subscriptions show it in presence."""
        cdef dict users = self.hub.users
        old = self.identity.user
        if users[old] == 1:
            del users[old]
        else:
            users[old] -= 1
        self.identity = identity
        users[identity.user] = users.get(identity.user, 0) + 1

    def __repr__(self):
        return f"<Session {self.client_id!r} user={self.identity.user!r}>"
