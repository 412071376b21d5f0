# Outbox: what goes out to one connection. Included by _core.pyx.
#
# Every frame for a connection, a delivery or a reply, enters through `deliver`,
# `deliver_shared` or `queue_frame`, and each asks `refuses()` whether it fits; what does
# not goes to the slow-consumer policy, decided in `_overflow` alone. At the end of the
# loop turn the Hub calls `write_out`: one send() or sendmsg() of everything queued.


cdef class Outbox(WSListener):
    """The per-connection queue, the slow-consumer decision, the writes and the close."""

    def __dealloc__(self):
        buffer_release(&self.out)

    # Queueing --------------------------------------------------------------------------

    @cython.final
    cdef inline Py_ssize_t queued(self) noexcept:
        """Bytes queued for this connection: copied, by reference, and left with the transport."""
        return self.out.size + self.shared_size + self.backlog

    @cython.final
    cdef inline bint exceeds(self, Py_ssize_t size) noexcept:
        """Whether queueing `size` more bytes would pass --max-buffer.

        Only a client the kernel has refused bytes (`paused`: a write did not take
        everything) can: it does not read. Bytes queued because the server has not reached
        this connection yet in its pass are the server's backlog (Hub.backlog_bytes, bounded
        by taking less input), not the client's slowness: counted as such, a server behind
        closed 960 of 1000 subscribers that were reading as fast as they could (issue #31).
        The bound applies to a backlog, not to one message in flight: a frame always fits
        an empty queue, however large, so a client that keeps up is never cut off (with
        --max-message-size above --max-buffer, every large message would otherwise be).
        """
        cdef Py_ssize_t queued
        if not self.paused:
            return False
        queued = self.queued()
        return queued > 0 and queued + size > self.hub.max_buffer

    @cython.final
    cdef inline void _queued_more(self, Py_ssize_t size) noexcept:
        """`size` bytes queued: the server's backlog while the kernel takes our writes."""
        if not self.paused:
            self.hub.backlog_bytes += size

    @cython.final
    cdef inline void _unqueue(self) noexcept:
        """Everything queued leaves the queue (written, handed on, or dropped)."""
        if not self.paused:
            self.hub.backlog_bytes -= self.out.size + self.shared_size

    @cython.final
    cdef inline bint refuses(self, Py_ssize_t size) noexcept:
        """Whether a delivery of `size` bytes must go to the slow-consumer policy instead."""
        return self.overflowing or self.closing or self.exceeds(size)

    @cython.final
    cdef inline int deliver(self, Channel channel, const char* frame, Py_ssize_t size) except -1:
        """Queue a framed message of `channel` (copied); the policy decides if it does not fit."""
        if self.refuses(size):
            return self._overflow(channel, frame, size, None)
        buffer_append(&self.out, frame, size)
        self._queued_more(size)
        self._count_sent(size)
        if not self.scheduled:
            self.hub.schedule(self)
        return 0

    @cython.final
    cdef inline int deliver_shared(self, Channel channel, bytes frame) except -1:
        """deliver() for a large frame: a reference to it, after whatever is queued already."""
        cdef Py_ssize_t size = PyBytes_GET_SIZE(frame)
        if self.refuses(size):
            return self._overflow(channel, PyBytes_AS_STRING(frame), size, frame)
        self._append_shared(frame)
        self._queued_more(size)
        self._count_sent(size)
        if not self.scheduled:
            self.hub.schedule(self)
        return 0

    @cython.final
    cdef inline void _count_sent(self, Py_ssize_t frame_size) noexcept:
        """Count one data message of `frame_size` bytes, header included, as sent."""
        self.messages_sent += 1
        self.bytes_sent += frame_size - header_size(frame_size)

    @cython.final
    cdef inline int _append_shared(self, bytes frame) except -1:
        """Queue a reference to `frame`, behind what `out` holds (the order on the wire)."""
        if self.shared is None:
            self.shared = []
        if self.out.size:
            self.shared.append(PyBytes_FromStringAndSize(self.out.data, self.out.size))
            self.shared_size += self.out.size
            buffer_clear(&self.out)
        self.shared.append(frame)
        self.shared_size += PyBytes_GET_SIZE(frame)
        return 0

    cdef int _overflow(self, Channel channel, const char* frame, Py_ssize_t size,
                       bytes shared) except -1:
        """A delivery that does not fit: the slow-consumer policy, in this one place."""
        cdef Hub hub = self.hub
        hub.deliveries_total -= 1  # counted for the whole channel by Hub._deliver
        if self.closing:
            return 0
        if hub.slow_consumer == SlowConsumerPolicy.DISCONNECT:
            hub.slow_consumers_disconnected_total += 1
            self.discard_output()
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
        elif hub.slow_consumer == SlowConsumerPolicy.DROP:
            self.overflowing = True
            hub.dropped_slow_total += 1
        else:
            self.overflowing = True
            self._conflate(channel.name,
                           shared if shared is not None else PyBytes_FromStringAndSize(frame, size))
        return 0

    cdef int _conflate(self, str channel, bytes frame) except -1:
        """Keep `frame` as the channel's newest undelivered message. What is kept counts
        against --max-buffer too: past it, the oldest kept frames are dropped."""
        cdef Hub hub = self.hub
        cdef bytes kept
        cdef Py_ssize_t size = PyBytes_GET_SIZE(frame), kept_size = 0
        if self.conflated is None:
            self.conflated = {}
        if self.conflated.pop(channel, None) is not None:
            hub.dropped_conflated_total += 1
        for kept in self.conflated.values():
            kept_size += PyBytes_GET_SIZE(kept)
        while self.conflated and kept_size + size > hub.max_buffer:
            oldest = next(iter(self.conflated))
            kept_size -= PyBytes_GET_SIZE(self.conflated.pop(oldest))
            hub.dropped_conflated_total += 1
        self.conflated[channel] = frame  # at the end: dicts keep insertion order
        return 0

    cdef int queue_frame(self, int opcode, const char* payload, Py_ssize_t size) except -1:
        """Queue one frame of our own (a reply, a ping) behind whatever is already queued;
        a data message compressed if the client negotiated permessage-deflate."""
        cdef char header[10]  # MAX_HEADER
        cdef Deflate deflate = self.hub.deflate
        cdef bint data = opcode == WSMsgType.TEXT or opcode == WSMsgType.BINARY
        if data and self.deflate_out and deflate.compress(opcode, payload, size):
            return self._queue_own(deflate.frame, deflate.frame_size, NULL, 0, True)
        return self._queue_own(header, write_header(header, opcode, size), payload, size, data)

    cdef int queue_compressed(self, int opcode, const char* payload, Py_ssize_t size) except -1:
        """queue_frame() of a data message for --echo-path with permessage-deflate: always
        compressed, as conformance suites expect, in the small window for a client that
        limited ours."""
        cdef Deflate deflate = self.hub.deflate
        deflate.compress_always(opcode, payload, size, not self.deflate_out)
        return self._queue_own(deflate.frame, deflate.frame_size, NULL, 0, True)

    cdef int _queue_own(self, const char* head, Py_ssize_t head_size, const char* payload,
                        Py_ssize_t size, bint data) except -1:
        """Queue `head` then `payload`, one frame of ours; `data`: a message (counted)."""
        if self.closing:
            return 0
        if self.exceeds(head_size + size):
            # The client sends requests but does not read the answers: dropping a reply
            # would leave it waiting, so whatever the policy, it is closed.
            self.hub.slow_consumers_disconnected_total += 1
            self.discard_output()
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
            return 0
        buffer_append(&self.out, head, head_size)
        buffer_append(&self.out, payload, size)
        self._queued_more(head_size + size)
        if data:
            self._count_sent(head_size + size)
        if not self.scheduled:
            self.hub.schedule(self)
        return 0

    cdef int queue_bytes(self, bytes payload) except -1:
        """Queue a text message of ours (a reply): JSON, ASCII or UTF-8."""
        return self.queue_frame(WSMsgType.TEXT, PyBytes_AS_STRING(payload),
                                PyBytes_GET_SIZE(payload))

    cdef int discard_output(self) except -1:
        self._unqueue()
        if self.hub.held_inputs or self.hub.shed is not None:
            self.hub.schedule_flush()  # (which releases them if that was enough)
        buffer_release(&self.out)
        self.shared = None
        self.shared_size = 0
        return 0

    # Writing ---------------------------------------------------------------------------

    cdef int write_out(self) except -1:
        """Hand the queued frames to the kernel: one send; the rest goes to the transport."""
        if self.paused or self.closing or self.transport is None:
            return 0
        if self.transport.is_close_frame_sent:
            # picows sent CLOSE itself, for a protocol error it found parsing one frame
            # ahead of us. Nothing may follow a CLOSE (RFC 6455 5.5.1), not even the replies
            # to the good frames before the bad one.
            self.closing = True
            self.discard_output()
            return 0
        if (self.shared is not None or self.out.size) and self._send_queued():
            return 0  # the peer is gone
        if self.overflowing and not self.paused:
            self._drained()
        return 0

    cdef bint _send_queued(self) except -1:
        """One send of the large frames queued by reference, then `out`. What the kernel
        does not take goes to the transport (the frames still by reference), which pauses
        us until it is written. 1 when the peer is gone."""
        cdef iovec iov[SHARED_IOV_MAX]
        cdef msghdr message
        cdef list shared = self.shared
        cdef Py_ssize_t count = 0, total = self.shared_size + self.out.size, size
        cdef bint out_included = True
        cdef ssize_t sent
        cdef bytes segment
        if self.fd < 0:
            return self._write_through()  # TLS: the transport encrypts
        self._unqueue()  # all of it: sent, or left with the transport
        if shared is not None:
            for segment in shared:
                if count == SHARED_IOV_MAX - 1:
                    out_included = False
                    break
                iov[count].iov_base = PyBytes_AS_STRING(segment)
                iov[count].iov_len = PyBytes_GET_SIZE(segment)
                count += 1
        if out_included and self.out.size:
            iov[count].iov_base = self.out.data
            iov[count].iov_len = self.out.size
            count += 1
        # One buffer (the usual case) goes by send(): sendmsg() has the kernel copy in a
        # msghdr and an iovec first, 1.5-2% of the core at 1M deliveries/s (perf).
        if count > 1:
            memset(&message, 0, sizeof(message))
            message.msg_iov = iov
            message.msg_iovlen = count
        while True:
            if count == 1:
                sent = send(self.fd, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL)
            else:
                sent = sendmsg(self.fd, &message, MSG_NOSIGNAL)
            if sent >= 0 or errno != EINTR:
                break
        if sent < 0 and errno != EAGAIN:  # EWOULDBLOCK is EAGAIN on Linux
            self.discard_output()  # the transport reports the loss and we clean up
            self.transport.disconnect(False)
            return 1
        self.hub.bytes_sent_total += total
        if sent < 0:
            sent = 0
        self.shared = None
        self.shared_size = 0
        if sent < total:
            rest = []
            if shared is not None:
                for segment in shared:
                    size = PyBytes_GET_SIZE(segment)
                    if sent >= size:
                        sent -= size
                        continue
                    rest.append(memoryview(segment)[sent:] if sent else segment)
                    sent = 0
            if self.out.size > sent:  # `out` was not in this sendmsg() or only part of it
                rest.append(PyBytes_FromStringAndSize(self.out.data + sent, self.out.size - sent))
            buffer_clear(&self.out)  # (copied to `rest`: empty before the transport pauses us)
            tcp = self.transport.underlying_transport
            tcp.writelines(rest)
            self.backlog = tcp.get_write_buffer_size()
            self.paused = self.backlog > 0
        buffer_clear(&self.out)
        return 0

    cdef int _write_through(self) except -1:
        """Hand everything queued to the transport (large frames still by reference): the
        write path of TLS connections, and of the last frames before a CLOSE."""
        tcp = self.transport.underlying_transport
        self._unqueue()
        if self.shared is not None:
            self.hub.bytes_sent_total += self.shared_size
            tcp.writelines(self.shared)
            self.shared = None
            self.shared_size = 0
        if self.out.size:
            self.hub.bytes_sent_total += self.out.size
            tcp.write(PyBytes_FromStringAndSize(self.out.data, self.out.size))
            buffer_clear(&self.out)
        self.backlog = tcp.get_write_buffer_size()
        return 0

    cdef int _drained(self) except -1:
        """Everything queued is written: end the policy, send what `conflate` kept."""
        cdef bytes frame
        self.overflowing = False
        if self.conflated:
            for frame in self.conflated.values():
                if PyBytes_GET_SIZE(frame) >= SHARED_FRAME_BYTES:
                    self._append_shared(frame)
                else:
                    buffer_append(&self.out, PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
                self._queued_more(PyBytes_GET_SIZE(frame))
                self._count_sent(PyBytes_GET_SIZE(frame))
            self.hub.deliveries_total += len(self.conflated)
            self.conflated = None
            if not self.scheduled:
                self.hub.schedule(self)
        return 0

    cpdef pause_writing(self):
        # (only ever from inside our own write of everything queued, already unqueued:
        # from now on what is queued is the client's to take, `exceeds`)
        self.paused = True

    cpdef resume_writing(self):
        if self.paused:  # the server's backlog again
            self.hub.backlog_bytes += self.out.size + self.shared_size
        self.paused = False
        self.backlog = 0
        if (self.out.size or self.shared is not None or self.overflowing) and \
                not self.scheduled and not self.closing:
            self.hub.schedule(self)

    # Closing ---------------------------------------------------------------------------

    cdef int _write_all(self) except -1:
        """Before a CLOSE: everything queued goes out, paused or not (bounded by --max-buffer)."""
        if self.transport is not None and not self.transport.is_close_frame_sent:
            self._write_through()
        self.discard_output()
        return 0

    cdef int _send_close(self, int code, str reason) except -1:
        """Flush what is queued, then CLOSE; from here on only the peer's CLOSE matters."""
        self._write_all()
        self.closing = True
        if not self.close_code:
            self.hub.note_close(self, code, reason)
        self.transport.send_close(<WSCloseCode>code, reason.encode())
        return 0

    cpdef close(self, int code, str reason):
        """Start the closing handshake; disconnect if the peer does not answer in time."""
        if self.closing or self.transport is None:
            return
        self._send_close(code, reason)
        self.hub.loop.call_later(CLOSE_TIMEOUT, (<object>self.transport).disconnect)
