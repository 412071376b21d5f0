// A client written the way the seed article writes one: Node's `ws`, the token in an
// Authorization header, JSON messages. It subscribes, publishes COUNT messages, and prints
// what it saw as one JSON line. Usage: node seed_client.js URL TOKEN CHANNEL COUNT
const WebSocket = require('ws')

const [url, token, channel, countText] = process.argv.slice(2)
const count = Number(countText)
const seen = { welcome: null, subscribed: null, published: 0, messages: [] }

const ws = new WebSocket(url, { headers: { Authorization: `Bearer ${token}` } })
const timer = setTimeout(() => { console.log(JSON.stringify({ error: 'timeout', seen })); process.exit(1) }, 10000)

ws.on('message', (raw) => {
  const message = JSON.parse(raw)
  switch (message.type) {
    case 'welcome':
      seen.welcome = message
      ws.send(JSON.stringify({ type: 'subscribe', channel }))
      break
    case 'subscribed':
      seen.subscribed = message
      for (let i = 0; i < count; i++) {
        ws.send(JSON.stringify({ type: 'publish', channel, data: { i, text: 'héllo' }, id: i }))
      }
      break
    case 'published':
      seen.published++
      break
    case 'message':
      seen.messages.push(message.data)
      if (seen.messages.length === count) ws.close(1000, 'done')
      break
    default:
      seen.unexpected = message
  }
})

ws.on('close', (code) => {
  clearTimeout(timer)
  console.log(JSON.stringify({ closeCode: code, seen }))
})
ws.on('error', (err) => { console.log(JSON.stringify({ error: String(err) })); process.exit(1) })
