// Socket.IO, as its users scale it out: the Redis adapter (ioredis clients) carries every
// room broadcast to the other nodes. Socket.IO has its own framing (Engine.IO packets,
// Socket.IO events), so the seed protocol rides in it: each seed message is an event named
// by its type, e.g. 42["subscribe",{"type":"subscribe","channel":"news"}]; a channel is a
// room; a broadcast is encoded once and written to every member (Socket.IO's own fast path).
// The load generator speaks this with --protocol socketio.
// Usage: node socketio.js PORT [REDIS_PORT]
const http = require('http')
const { Server } = require('socket.io')

const port = Number(process.argv[2] || 8080)
const redisPort = process.argv[3] ? Number(process.argv[3]) : null

const httpServer = http.createServer()
// WebSocket only: no long-polling first and upgrade after, as a benchmark client would ask.
const io = new Server(httpServer, { transports: ['websocket'], serveClient: false })
if (redisPort) {
  const { createAdapter } = require('@socket.io/redis-adapter')
  const Redis = require('ioredis')
  const pub = new Redis(redisPort, '127.0.0.1')
  io.adapter(createAdapter(pub, pub.duplicate()))
}

io.on('connection', (socket) => {
  socket.emit('welcome', { type: 'welcome', data: { clientId: socket.id, timestamp: Date.now() } })
  socket.on('subscribe', (message) => {
    socket.join(message.channel)
    socket.emit('subscribed', { type: 'subscribed', channel: message.channel })
  })
  socket.on('publish', (message) => {
    io.to(message.channel).emit('message', {
      type: 'message', channel: message.channel, data: message.data, from: socket.id, timestamp: Date.now()
    })
  })
})

httpServer.listen(port, '127.0.0.1')
