// The seed article's server, as the article writes it: Node's `ws`, a Map of clients and
// a Map of channel -> Set of client ids, and one JSON.stringify per subscriber per message.
// The article publishes through Redis (ioredis) and fans out on Redis's `message` event:
// given REDIS_PORT, so does this. Without it (one node) the benchmark short-cuts that hop
// and fans out directly, which only flatters it.
// Usage: node seed.js PORT [REDIS_PORT]
const WebSocket = require('ws')

const port = Number(process.argv[2] || 8080)
const redisPort = process.argv[3] ? Number(process.argv[3]) : null
let pub = null
let sub = null
if (redisPort) {
  const Redis = require('ioredis')
  pub = new Redis(redisPort, '127.0.0.1')
  sub = new Redis(redisPort, '127.0.0.1')
  sub.on('message', (channel, raw) => {
    const message = JSON.parse(raw)
    fanOut(channel, message.data, message.from)
  })
}
const clients = new Map()
const channels = new Map()
let nextId = 0

const wss = new WebSocket.Server({ port, host: '127.0.0.1', clientTracking: true })
wss.on('connection', (ws) => {
  const clientId = `seed-${++nextId}`
  clients.set(clientId, { ws, channels: new Set() })
  send(ws, { type: 'welcome', data: { clientId, timestamp: Date.now() } })
  ws.on('message', (raw) => {
    let message
    try { message = JSON.parse(raw) } catch (e) { return send(ws, { type: 'error', message: 'Invalid message format' }) }
    const client = clients.get(clientId)
    if (message.type === 'subscribe') {
      client.channels.add(message.channel)
      if (!channels.has(message.channel)) {
        channels.set(message.channel, new Set())
        if (sub) sub.subscribe(message.channel)
      }
      channels.get(message.channel).add(clientId)
      send(ws, { type: 'subscribed', channel: message.channel })
    } else if (message.type === 'publish') {
      if (pub) pub.publish(message.channel, JSON.stringify({ data: message.data, from: clientId }))
      else fanOut(message.channel, message.data, clientId)
    }
  })
  ws.on('close', () => {
    for (const channel of clients.get(clientId).channels) {
      const subscribers = channels.get(channel)
      if (subscribers) subscribers.delete(clientId)
    }
    clients.delete(clientId)
  })
})

function fanOut (channel, data, from) {
  const subscribers = channels.get(channel)
  if (!subscribers) return
  for (const id of subscribers) {
    const subscriber = clients.get(id)
    if (subscriber) send(subscriber.ws, { type: 'message', channel, data, from, timestamp: Date.now() })
  }
}

function send (ws, data) {
  if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(data))
}
