# The compiled core's cdef classes, so that other Cython code (benchmarks, a future
# transport) can cimport them and call them at C speed.

from libc.stdint cimport uint32_t, int64_t
from picows.picows cimport WSListener, WSTransport, WSFrame


cdef class OutputBuffer:
    # Bytes framed for one connection and not yet handed to the kernel.
    cdef:
        char*      data
        Py_ssize_t size
        Py_ssize_t capacity

    cdef int append(self, const char* ptr, Py_ssize_t n) except -1
    cdef void clear(self) noexcept
    cdef void release(self) noexcept


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


cdef class Channel:
    # One channel's local subscribers, a contiguous array of strong references: fan-out
    # walks it in C, and add/remove are O(1) (the session remembers its slot).
    cdef:
        readonly str name
        void**      subscribers
        Py_ssize_t  count
        Py_ssize_t  capacity

    cdef Py_ssize_t add(self, Session session) except -1
    cdef Session remove_at(self, Py_ssize_t slot)


cdef class Hub:
    cdef:
        readonly dict       channels        # name -> Channel with local subscribers
        readonly set        sessions        # every open Session of this worker
        list                pending         # sessions with output to write this loop turn
        bint                flush_scheduled
        object              loop
        public object       bus             # .publish(channel, payload) -> bool, .subscribe, .unsubscribe
        object              ready_callback

        # limits and policy, copied from Config once
        readonly Py_ssize_t max_message_size
        readonly Py_ssize_t max_subscriptions
        readonly Py_ssize_t max_buffer
        readonly double     publish_rate
        readonly int        slow_consumer   # SLOW_DISCONNECT, SLOW_DROP, SLOW_CONFLATE

        # a scratch buffer where each message is framed once, then copied to every subscriber
        char*               frame
        Py_ssize_t          frame_capacity

        # when each fan-out of this loop turn began, for the latency histogram
        double*             fanout_started
        Py_ssize_t          fanout_count
        Py_ssize_t          fanout_capacity
        readonly Histogram  publish_latency # fan-out begun -> written, per message
        readonly Samples    handling        # time to handle one client message

        bytes               client_id_prefix
        unsigned long long  next_client_number

        # counters for /metrics; "_total" figures only grow
        readonly unsigned long long connections_total
        readonly unsigned long long messages_received_total
        readonly unsigned long long deliveries_total
        readonly unsigned long long bytes_sent_total
        readonly unsigned long long dropped_slow_total
        readonly unsigned long long dropped_conflated_total
        readonly unsigned long long slow_consumers_disconnected_total
        readonly unsigned long long publish_refused_total

    cpdef Py_ssize_t fanout(self, str channel, object payload) except -1
    cdef int _note_fanout(self, double started) except -1
    cdef int _deliver(self, Channel channel, const char* frame, Py_ssize_t size) except -1
    cdef int _deliver_shared(self, Channel channel, bytes frame) except -1
    cdef int _overflow(self, Session session, Channel channel, const char* frame,
                       Py_ssize_t size) except -1
    cdef int _schedule(self, Session session) except -1
    cdef int _subscribe(self, Session session, str name) except -1
    cdef int _unsubscribe(self, Session session, str name) except -1
    cdef bytes _new_client_id(self)


cdef class Session(WSListener):
    cdef:
        Hub                 hub
        WSTransport         transport
        readonly object     identity        # auth.Identity
        readonly bytes      client_id
        bytes               user_json
        bint                echo            # --echo-path: echo frames, no pub/sub protocol
        int                 fd

        OutputBuffer        out
        list                shared          # large frames queued by reference, ahead of `out`
        Py_ssize_t          shared_size     # their bytes (the list is None when empty)
        bint                scheduled       # in hub.pending
        bint                paused          # the transport holds unsent bytes
        bint                closing         # our CLOSE is sent; only the peer's CLOSE matters now
        bint                overflowing     # past --max-buffer: the policy applies until drained
        Py_ssize_t          backlog         # bytes last left with the transport (paused)
        dict                conflated       # `conflate`: channel -> newest undelivered frame
        readonly dict       subscriptions   # channel name -> slot in Channel.subscribers

        # a fragmented message being reassembled
        int                 fragment_type   # 0 when none is open, else WSMsgType
        OutputBuffer        fragments
        uint32_t            utf8_state

        # publish rate limit: a token bucket, and when its refusals began
        double              tokens
        double              refill_at
        double              refused_since

        readonly double     last_seen       # monotonic seconds of the last frame from the peer
        double              pinged_at       # monotonic seconds of our last heartbeat ping
        double              expires_at      # the token's exp, epoch seconds; 0 = never

    cdef int _on_continuation(self, WSFrame frame) except -1
    cdef int _on_close_frame(self, WSFrame frame) except -1
    cdef int _on_message(self, int kind, const char* payload, Py_ssize_t size) except -1
    cdef int _handle(self, const char* payload, Py_ssize_t size) except -1
    cdef int _check_channel(self, object channel, bytes request_id) except -1
    cdef int _subscribe(self, object channel, bytes request_id) except -1
    cdef int _unsubscribe(self, object channel, bytes request_id) except -1
    cdef int _publish(self, object request, bytes request_id) except -1
    cdef bint _take_token(self)
    cdef int _send_error(self, int code, str message, bytes request_id) except -1
    cdef int _send_bytes(self, bytes payload) except -1
    cdef Py_ssize_t _queued(self) noexcept
    cdef bint _refuses(self, Py_ssize_t size, Py_ssize_t limit) noexcept
    cdef bint queue(self, const char* frame, Py_ssize_t size, Py_ssize_t limit) except -1
    cdef bint queue_shared(self, bytes frame, Py_ssize_t limit) except -1
    cdef int _discard_output(self) except -1
    cdef int send_text(self, const char* payload, Py_ssize_t size) except -1
    cdef int _queue_frame(self, int opcode, const char* payload, Py_ssize_t size) except -1
    cdef int write_out(self) except -1
    cdef bint _send_queued(self) except -1
    cdef int _drained(self) except -1
    cdef int _write_all(self) except -1
    cdef int _send_close(self, int code, str reason) except -1
    cpdef close(self, int code, str reason)
