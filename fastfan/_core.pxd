# The compiled core's names, declared once: other Cython code can cimport the classes and
# call them at C speed, and the cpdef enums are Python enums too (`from fastfan._core import
# CloseCode`), so Python and Cython never keep a copy of a code of their own.

cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from fastfan._picows.picows cimport WSListener, WSTransport, WSFrame


cpdef enum CloseCode:
    # The contract's close codes that picows's WSCloseCode does not name.
    SERVER_API = 4000          # disconnected through the server API
    TOKEN_EXPIRED = 4001
    SLOW_CONSUMER = 4008
    RATE_LIMITED = 4029


cpdef enum BusResult:
    # What bus.publish answers.
    REFUSED = 0                # the bus is down: the client gets 503
    DONE = 1                   # handed on: a `published` reply may go at once
    PENDING = 2                # the bus calls session.acknowledge() once it knows


cpdef enum SlowConsumerPolicy:
    # --slow-consumer; config.SLOW_CONSUMER_POLICIES is these names, lower case.
    DISCONNECT = 0
    DROP = 1
    CONFLATE = 2


cdef struct ByteBuffer:
    # Bytes for one connection: what is framed and not yet handed to the kernel, or a
    # fragmented message being reassembled. A struct inside the session, not an object of
    # its own: one object touched per delivery.
    char*      data
    Py_ssize_t size
    Py_ssize_t capacity


cdef struct Reassembly:
    # A fragmented message being put together, allocated only while one is open: an idle
    # connection holds a NULL pointer, not the buffer.
    ByteBuffer buffer
    double     started             # monotonic seconds of its first frame
    bint       compressed          # its first frame had RSV1: inflated once complete


# zlib, for permessage-deflate (fastfan/_deflate.pxi)
cdef extern from "zlib.h" nogil:
    ctypedef struct z_stream:
        const unsigned char* next_in
        unsigned int avail_in
        unsigned char* next_out
        unsigned int avail_out
    int Z_OK, Z_STREAM_END, Z_BUF_ERROR, Z_SYNC_FLUSH, Z_DEFLATED, Z_DEFAULT_STRATEGY
    int Z_DEFAULT_COMPRESSION
    int deflateInit2(z_stream* stream, int level, int method, int window_bits, int mem_level,
                     int strategy)
    int deflate(z_stream* stream, int flush)
    int deflateReset(z_stream* stream)
    int deflateEnd(z_stream* stream)
    unsigned long deflateBound(z_stream* stream, unsigned long size)
    int inflateInit2(z_stream* stream, int window_bits)
    int inflate(z_stream* stream, int flush)
    int inflateReset(z_stream* stream)
    int inflateEnd(z_stream* stream)



cdef enum:
    # What Deflate.inflate answers instead of a size.
    INFLATED_TOO_BIG = -1          # more than the limit: close 1009
    INFLATE_FAILED = -2            # not deflate data: close 1007


cdef class Deflate:
    # permessage-deflate without context takeover: one compressor and one inflater per
    # worker, whatever the number of connections.
    cdef:
        z_stream            deflater
        z_stream            small_deflater  # --echo-path's, for clients that limit our window
        z_stream            inflater
        bint                deflater_ready
        bint                small_deflater_ready
        bint                inflater_ready
        readonly Py_ssize_t min_size        # --compression-min-size
        ByteBuffer          packed          # room for a header, then the compressed data
        char*               frame           # the last compressed frame, inside `packed`
        Py_ssize_t          frame_size
        ByteBuffer          inflated        # the last inflated message

    cdef bint compress(self, uint8_t opcode, const char* data, Py_ssize_t size) except -1
    cdef int compress_always(self, uint8_t opcode, const char* data, Py_ssize_t size,
                             bint small_window) except -1
    cdef bytes shared_frame(self)
    cdef Py_ssize_t inflate(self, const char* data, Py_ssize_t size,
                            Py_ssize_t limit) except -3


cdef class Histogram:
    cdef:
        double              bounds[15]
        unsigned long long  counts[16]
        readonly double     total
        readonly unsigned long long count

    cdef void observe(self, double value) noexcept


cdef class Samples:
    cdef:
        list                values
        unsigned long long  count
        double              total
        double              minimum
        double              maximum

    cdef void record(self, double value) noexcept


cdef class Hub
cdef class Channel


cdef class Outbox(WSListener):
    # What goes out to one connection: the queue, the slow-consumer decision, the writes,
    # the closing handshake. Session adds what comes in.
    cdef:
        Hub                 hub
        WSTransport         transport
        int                 fd              # -1 with TLS: written through the transport
        # permessage-deflate: RSV1 frames are inflated (in), and it gets compressed frames
        # (out; not a client that limits our window). Bytes, in the padding after `fd`:
        # the fields the per-delivery loop touches keep their offsets.
        uint8_t             deflate_in
        uint8_t             deflate_out
        # the first CLOSE either side sent (0: none, the connection dropped), for the
        # connection_closed webhook; its reason waits in Hub.close_reasons
        uint16_t            close_code

        ByteBuffer          out             # small frames, copied in
        list                shared          # large frames by reference, ahead of `out`
        Py_ssize_t          shared_size     # their bytes (the list is None when empty)
        Py_ssize_t          backlog         # bytes last left with the transport (paused)
        dict                conflated       # `conflate`: channel -> newest undelivered frame
        bint                scheduled       # in hub.pending
        bint                paused          # the transport holds unsent bytes
        bint                closing         # our CLOSE is sent; only the peer's CLOSE matters now
        bint                overflowing     # past --max-buffer: the policy applies until drained

        # the seed's per-connection figures, for the `stats` request: data messages and
        # their WebSocket payload bytes queued for the peer
        readonly unsigned long long messages_sent
        readonly unsigned long long bytes_sent

    @cython.final
    cdef Py_ssize_t queued(self) noexcept
    @cython.final
    cdef bint exceeds(self, Py_ssize_t size) noexcept
    @cython.final
    cdef void _queued_more(self, Py_ssize_t size) noexcept
    @cython.final
    cdef void _unqueue(self) noexcept
    @cython.final
    cdef bint refuses(self, Py_ssize_t size) noexcept
    @cython.final
    cdef int deliver(self, Channel channel, const char* frame, Py_ssize_t size) except -1
    @cython.final
    cdef int deliver_shared(self, Channel channel, bytes frame) except -1
    @cython.final
    cdef void _count_sent(self, Py_ssize_t frame_size) noexcept
    @cython.final
    cdef int _append_shared(self, bytes frame) except -1
    cdef int _overflow(self, Channel channel, const char* frame, Py_ssize_t size,
                       bytes shared) except -1
    cdef int _conflate(self, str channel, bytes frame) except -1
    cdef int queue_frame(self, int opcode, const char* payload, Py_ssize_t size) except -1
    cdef int queue_compressed(self, int opcode, const char* payload, Py_ssize_t size) except -1
    cdef int _queue_own(self, const char* head, Py_ssize_t head_size, const char* payload,
                        Py_ssize_t size, bint data) except -1
    cdef int queue_bytes(self, bytes payload) except -1
    cdef int discard_output(self) except -1
    cdef int write_out(self) except -1
    cdef bint _send_queued(self) except -1
    cdef int _write_through(self) except -1
    cdef int _drained(self) except -1
    cdef int _write_all(self) except -1
    cdef int _send_close(self, int code, str reason) except -1
    cpdef close(self, int code, str reason)


cdef class Session(Outbox):
    # One WebSocket connection as the client sees it: frames in, RFC 6455 rules,
    # reassembly, requests, permissions and limits.
    cdef:
        readonly object     identity        # auth.Identity, replaced by a `refresh`
        readonly bytes      client_id
        bint                echo            # --echo-path: echo frames, no pub/sub protocol
        readonly dict       subscriptions   # channel name -> its index in Channel.subscribers
        readonly long long  connected_at    # epoch milliseconds
        readonly unsigned long long messages_received
        readonly unsigned long long bytes_received
        Py_ssize_t          subscription_bytes  # the names' length, against the bound
        Py_ssize_t          held_bytes      # the ids of its replies in Hub.unconfirmed

        # a fragmented message being reassembled
        int                 fragment_type   # 0 when none is open, else WSMsgType
        Reassembly*         fragments       # NULL when none is open
        uint32_t            utf8_state

        # publish rate limit: a token bucket, and when its refusals began
        double              tokens
        double              refill_at
        double              refused_since
        # permessage-deflate: the bytes it may still inflate (INFLATED_PER_PUBLISH a second
        # per publish a second of --publish-rate), below 0 after a message that took more
        double              inflate_tokens
        double              inflate_refill_at
        # history: `history` requests (a token bucket, READ_RATE a second), and the bytes
        # the connection may still add to history (history.BYTES_PER_PUBLISH)
        double              read_tokens
        double              read_refill_at
        double              history_quota
        double              history_quota_at
        # --subscribe-rate: token buckets for subscribes that change something, and for
        # presence requests
        double              subscribe_tokens
        double              subscribe_refill_at
        double              presence_tokens
        double              presence_refill_at

        readonly double     last_seen       # monotonic seconds of the last frame from the peer
        double              pinged_at       # monotonic seconds of our last heartbeat ping
        double              expires_at      # the token's exp, epoch seconds; 0 = never
        # another protocol on this connection (fastfan.pusher.protocol), None for fastfan's:
        # it gets each whole text message (handle) instead of _handle, and says its own
        # welcome (connected); fastfan's frames, RFC 6455 rules and fan-out stay as they are
        public object       dialect

        # --app (fastfan.hooks): how hooks see this connection (fastfan.app.Connection;
        # None without an App), and whether a hook of its runs: then its later requests
        # wait behind it in fastfan.hooks, so that they keep their order
        public object       connection
        public bint         hooks_pending

    cdef int _on_continuation(self, WSFrame frame) except -1
    cdef int _on_close_frame(self, WSFrame frame) except -1
    cdef int _send_close(self, int code, str reason) except -1
    cdef int _on_message(self, int kind, const char* payload, Py_ssize_t size) except -1
    cdef int _on_compressed(self, int kind, const char* payload, Py_ssize_t size) except -1
    cdef int _handle(self, const char* payload, Py_ssize_t size) except -1
    cdef int _check_channel(self, object channel, bytes request_id) except -1
    cdef int _subscribe(self, object channel, bytes request_id, bint join_leave,
                        object recover, bint hooked=*, bint admitted=*) except -1
    cdef int _history(self, object request, bytes request_id) except -1
    cdef int _leave(self, str channel) except -1
    cdef int _unsubscribe(self, object channel, bytes request_id) except -1
    cdef int _publish(self, object request, bytes request_id) except -1
    cdef int _publish_hooked(self, object request, str channel, bytes request_id) except -1
    cdef int _publish_allowed(self, str channel, object data, bytes request_id, bint echo,
                              bint history) except -1
    cdef int _dispatch(self, object request, bytes request_id) except -1
    cdef int _rpc(self, object request, bytes request_id) except -1
    cdef int _stats(self, bytes request_id) except -1
    cdef int _refresh(self, object token, bytes request_id) except -1
    cdef int _presence(self, object channel, bytes request_id, bint stats_only) except -1
    cdef bint _take_token(self)
    cdef bint _take_read_token(self)
    cdef bint _take_history_quota(self, Py_ssize_t size)
    cdef bint _may_subscribe(self)
    cdef bint _may_ask_presence(self)
    cdef int _refuse(self, tuple refusal, bytes request_id) except -1
    cdef int _queue_error(self, int code, str message, bytes request_id) except -1
    cdef int _forget_fragments(self) except -1
    cdef int check_deadlines(self, double now, double wall, double ping_interval,
                             double ping_timeout) except -1


cdef class Channel:
    # One channel's local subscribers, a contiguous array of strong references: fan-out
    # walks it in C, and add/remove are O(1) (the session remembers its index).
    cdef:
        readonly str name
        void**      subscribers
        Py_ssize_t  count
        Py_ssize_t  capacity
        Py_ssize_t  recovering  # subscribers not in the array yet: their history read is
                                # on its way (Hub.subscribe_history)
        Py_ssize_t  deflating   # subscribers that get compressed frames: 0, today's fan-out

    cdef Py_ssize_t add(self, Outbox subscriber) except -1
    cdef Outbox remove_at(self, Py_ssize_t index)


cdef class Hub:
    cdef:
        readonly dict       channels        # name -> Channel with local subscribers
        readonly set        sessions        # every open Session of this worker
        readonly dict       users           # user -> how many sessions of theirs are open
        dict                unconfirmed     # channel the bus has not confirmed -> {session:
                                            # request id whose `subscribed` waits for it}
        # the outboxes with output to write, in order: a ring of strong references, each
        # outbox in it at most once (Outbox.scheduled); Hub._flush writes from its head
        void**              pending
        Py_ssize_t          pending_capacity
        Py_ssize_t          pending_head
        Py_ssize_t          pending_count
        unsigned long long  pending_written  # outboxes taken from the ring and written, ever
        unsigned long long  pending_added    # outboxes put in the ring, ever
        bint                flush_scheduled
        object              loop
        public object       bus             # fastfan.bus.Bus
        # webhooks (fastfan.webhooks.Webhooks), None when off: (channel, user, clientId,
        # data) of a client's publish, and (user, clientId, code, reason) of a closed
        # connection
        public object       publish_webhook
        public object       close_webhook
        # (channel, payload) of a message that begins with EXCEPTING_PREFIX, None when no
        # dialect sends any (fastfan.pusher): fans out what it wraps, leaving out whom it names
        public object       excepting
        dict                close_reasons   # Session -> its first CLOSE's reason, kept only
                                            # for close_webhook (no field in every Session)
        public object       verify_token    # token -> auth.Identity, or AuthError; None:
                                            # --insecure, no token is checked
        object              ready_callback

        # limits and policy, copied from Config (the public ones again on a reload)
        readonly Py_ssize_t max_message_size
        public Py_ssize_t   max_subscriptions
        public Py_ssize_t   max_subscription_bytes
        public Py_ssize_t   max_buffer
        public double       publish_rate
        readonly SlowConsumerPolicy slow_consumer
        public object       presence_channels  # auth.ChannelPatterns: channels with presence
                                               # (with namespaces, NamespaceTable.presence)
        readonly Py_ssize_t presence_limit
        readonly Py_ssize_t history_size    # 0: no channel keeps history; else the most
                                            # any keeps
        public object       history_channels  # auth.ChannelPatterns: channels with history
                                              # (with namespaces, NamespaceTable.history)
        readonly Py_ssize_t history_max_bytes  # what history keeps per worker at most
        dict                recoveries      # channel -> [Recovery] waiting for its next read
        set                 reading         # channels with a history read scheduled or out
        dict                recovering      # (session, channel) -> its Recovery, until read

        # a scratch buffer where each message is framed once, then copied to every subscriber
        char*               frame
        Py_ssize_t          frame_capacity

        # the join/leave events of this loop turn, by watch channel: delivered together at
        # its end, each watcher receiving them all in one piece (Hub._deliver_events)
        dict                held_events     # Channel -> [(payload, Outbox it is about)]

        # when each fan-out not yet written began, for the latency histogram, and 1 + the
        # value of pending_added after it (0: not known yet): written when pending_written
        # reaches that value - 1
        double*             fanout_started
        unsigned long long* fanout_written_at
        Py_ssize_t          fanout_count
        Py_ssize_t          fanout_capacity
        readonly Histogram  publish_latency # fan-out begun -> written, per message
        readonly Samples    handling        # time to handle one client message

        bytes               client_id_prefix
        unsigned long long  next_client_number

        # counters for /metrics (fastfan.metrics.METRICS names them); "_total" only grow
        readonly unsigned long long connections_total
        readonly unsigned long long messages_received_total
        readonly unsigned long long deliveries_total
        readonly unsigned long long bytes_sent_total
        readonly unsigned long long dropped_slow_total
        # The server's own backlog: bytes queued for connections it has not written yet
        # (not those the kernel refused, which count against each one's --max-buffer).
        # Past max_backlog it takes less input (hold_input) until half of it is written.
        readonly Py_ssize_t backlog_bytes
        Py_ssize_t          max_backlog
        list                held_inputs     # transports whose reading is paused meanwhile
        readonly unsigned long long inputs_held_total
        # input that cannot be held back, meanwhile (fanout_or_shed): channel ->
        # [its newest message, the publisher to leave out, how many it replaced]
        dict                shed
        readonly unsigned long long dropped_overload_total
        readonly unsigned long long dropped_conflated_total
        readonly unsigned long long slow_consumers_disconnected_total
        readonly unsigned long long publish_refused_total

        # (last: the fields above keep their offsets)
        Py_ssize_t          frame_size      # of the frame in `frame`
        readonly Deflate    deflate         # compresses each message once for every client
                                            # that negotiated permessage-deflate
        public double       subscribe_rate  # --subscribe-rate
        # the joins held in held_events, to cancel against a leave of the same client in
        # the same loop turn: (Channel, clientId) -> its index in the channel's events
        dict                held_joins
        # channel -> (monotonic time, Presence) gathered, or [answer...] while a gather is out
        dict                presence_answers
        # --app: the worker's fastfan.hooks.Hooks (None without an App), and whether its
        # App has the hooks a subscribe or a publish asks (else they cost nothing)
        public object       hooks
        public bint         hook_subscribe
        public object       hook_publish  # the App's can_publish, or None
        # fastfan.namespaces.NamespaceTable when namespaces are configured, else None:
        # then nothing of them is looked at; and the same table for the worker's life,
        # whether or not any are (the history stores ask it what a channel keeps)
        public object       namespaces
        public object       namespace_table

    cpdef Py_ssize_t fanout(self, str channel, object payload, Outbox exclude=*) except -1
    cpdef Py_ssize_t fanout_or_shed(self, str channel, object payload,
                                    Outbox exclude=*) except -1
    cdef int _note_fanout(self, double started) except -1
    cdef int _deliver(self, Channel channel, const char* frame, Py_ssize_t size,
                      Outbox exclude) except -1
    cdef int _deliver_shared(self, Channel channel, bytes frame, Outbox exclude) except -1
    cdef Py_ssize_t _hold_event(self, Channel channel, object payload,
                                Outbox subject) except -1
    cdef int _deliver_events(self, Channel channel, list events) except -1
    cdef int _deliver_frames(self, Outbox watcher, Channel channel, bytes frames, list starts,
                             list headers, Py_ssize_t first, Py_ssize_t end) except -1
    cdef bytes _frame(self, const char* data, Py_ssize_t size)
    cdef int _deliver_compressed(self, Channel channel, bytes shared,
                                 Outbox exclude) except -1
    cdef int schedule(self, Outbox outbox) except -1
    cdef int schedule_flush(self) except -1
    cdef int _release_inputs(self) except -1
    cdef int _observe_written(self) except -1
    cpdef bint keeps_history(self, str channel)
    cdef int subscribe(self, Session session, str name) except -1
    cdef Channel _open(self, str name)
    cdef int _joined(self, Session session, str name) except -1
    cdef int subscribe_history(self, Session session, str name, bytes request_id,
                               object recover) except -1
    cdef int _schedule_read(self, str name) except -1
    cdef int unsubscribe(self, Session session, str name) except -1
    cdef bint awaits_confirmation(self, Session session, str channel,
                                  bytes request_id) except -1
    cdef bint holds_reply(self, Session session, str channel) except -1
    cdef double subscribe_burst(self) noexcept
    cdef int _announce(self, bytes kind, str channel, Session session) except -1
    cdef int attach(self, Session session) except -1
    cdef int note_close(self, Outbox outbox, int code, str reason) except -1
    cdef int detach(self, Session session) except -1
    cpdef bytes new_client_id(self)
    cpdef bytes encode_message(self, str channel, object data, bytes sender)
