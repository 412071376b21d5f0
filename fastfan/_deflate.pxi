# Deflate: permessage-deflate (RFC 7692) for one worker. Included by _core.pyx.
#
# Every client that negotiated the extension did so with server_no_context_takeover and
# client_no_context_takeover: each message is compressed on its own, so one compressed
# frame is valid for every subscriber, and one inflater serves every client. A connection
# keeps no zlib state, only two bits (Outbox.deflate_in, Outbox.deflate_out).


# Raw deflate (no zlib header, RFC 7692 7.2.1) with the largest window: what a client
# that says nothing of client_max_window_bits may use.
cdef int DEFLATE_WINDOW_BITS = -15
cdef int DEFLATE_MEM_LEVEL = 8
# The smallest window zlib makes (it turns 8 into 9), for the clients that limit ours: the
# handshake declines server_max_window_bits=8.
cdef int SMALL_WINDOW_BITS = -9
# The 4 bytes a sync flush ends with, which RFC 7692 7.2.1 takes off every message and a
# receiver appends again before inflating.
cdef const char* DEFLATE_TAIL = b"\x00\x00\xff\xff"


@cython.final
cdef class Deflate:
    """One worker's compressor and inflater, and the scratch buffers they fill."""

    def __cinit__(self, Py_ssize_t min_size):
        self.min_size = min_size

    def __dealloc__(self):
        if self.deflater_ready:
            deflateEnd(&self.deflater)
        if self.small_deflater_ready:
            deflateEnd(&self.small_deflater)
        if self.inflater_ready:
            inflateEnd(&self.inflater)
        buffer_release(&self.packed)
        buffer_release(&self.inflated)

    cdef bint compress(self, uint8_t opcode, const char* data, Py_ssize_t size) except -1:
        """Frame `data` compressed (RSV1 set) at `frame`, `frame_size` bytes: 1. 0 when the
        message is below --compression-min-size or would not be smaller compressed (then
        it goes out as it is: RFC 7692 compresses per message, by choice)."""
        if size < self.min_size or size == 0:
            return 0
        self.compress_always(opcode, data, size, False)
        return self.frame_size - header_size(self.frame_size) < size

    cdef int compress_always(self, uint8_t opcode, const char* data, Py_ssize_t size,
                             bint small_window) except -1:
        """compress() whatever the size and the result; `small_window`: for a client that
        limited ours (server_max_window_bits 9 to 14), in a window of 512 bytes."""
        cdef z_stream* stream = &self.small_deflater if small_window else &self.deflater
        cdef bint* ready = &self.small_deflater_ready if small_window else &self.deflater_ready
        cdef Py_ssize_t capacity, produced, header
        cdef char header_bytes[10]  # MAX_HEADER
        if not ready[0]:
            memset(stream, 0, sizeof(z_stream))
            if deflateInit2(stream, Z_DEFAULT_COMPRESSION, Z_DEFLATED,
                            SMALL_WINDOW_BITS if small_window else DEFLATE_WINDOW_BITS,
                            DEFLATE_MEM_LEVEL, Z_DEFAULT_STRATEGY) != Z_OK:
                raise MemoryError()
            ready[0] = True
        else:
            deflateReset(stream)
        # Room for the header in front, the compressed data, a sync flush's few bytes.
        capacity = MAX_HEADER + <Py_ssize_t>deflateBound(stream, size) + 16
        if capacity > self.packed.capacity:
            buffer_release(&self.packed)
            self.packed.data = <char*>malloc(capacity)
            if self.packed.data == NULL:
                raise MemoryError()
            self.packed.capacity = capacity
        stream.next_in = <const unsigned char*>data
        stream.avail_in = <unsigned int>size
        stream.next_out = <unsigned char*>self.packed.data + MAX_HEADER
        stream.avail_out = <unsigned int>(capacity - MAX_HEADER)
        if deflate(stream, Z_SYNC_FLUSH) != Z_OK or stream.avail_in or stream.avail_out == 0:
            raise RuntimeError("deflate failed within deflateBound's room")  # never seen
        produced = capacity - MAX_HEADER - stream.avail_out - 4  # less DEFLATE_TAIL
        header = write_header(header_bytes, opcode | RSV1, produced)
        self.frame = self.packed.data + MAX_HEADER - header
        memcpy(self.frame, header_bytes, header)
        self.frame_size = header + produced
        return 0

    cdef bytes shared_frame(self):
        """The compressed frame as a bytes object to queue by reference, if it is large
        enough to be (SHARED_FRAME_BYTES); else None."""
        if self.frame_size < SHARED_FRAME_BYTES:
            return None
        return PyBytes_FromStringAndSize(self.frame, self.frame_size)

    cdef Py_ssize_t inflate(self, const char* data, Py_ssize_t size,
                            Py_ssize_t limit) except -3:
        """Inflate one message into `inflated`: its size, or INFLATED_TOO_BIG past `limit`
        bytes (a zip bomb stops there), or INFLATE_FAILED for data that is not deflate."""
        cdef int status
        if not self.inflater_ready:
            memset(&self.inflater, 0, sizeof(z_stream))
            if inflateInit2(&self.inflater, DEFLATE_WINDOW_BITS) != Z_OK:
                raise MemoryError()
            self.inflater_ready = True
        else:
            inflateReset(&self.inflater)
        if limit + 1 > self.inflated.capacity:  # one byte more than allowed: "too big"
            buffer_release(&self.inflated)
            self.inflated.data = <char*>malloc(limit + 1)
            if self.inflated.data == NULL:
                raise MemoryError()
            self.inflated.capacity = limit + 1
        self.inflater.next_out = <unsigned char*>self.inflated.data
        self.inflater.avail_out = <unsigned int>(limit + 1)
        self.inflater.next_in = <const unsigned char*>data
        self.inflater.avail_in = <unsigned int>size
        status = inflate(&self.inflater, Z_SYNC_FLUSH)
        if status == Z_OK or status == Z_BUF_ERROR:
            if self.inflater.avail_out == 0:
                return INFLATED_TOO_BIG
            self.inflater.next_in = <const unsigned char*>DEFLATE_TAIL
            self.inflater.avail_in = 4
            status = inflate(&self.inflater, Z_SYNC_FLUSH)
        if status != Z_OK and status != Z_STREAM_END and status != Z_BUF_ERROR:
            return INFLATE_FAILED
        if self.inflater.avail_out == 0:
            return INFLATED_TOO_BIG
        return limit + 1 - self.inflater.avail_out
