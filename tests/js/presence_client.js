// The seed's connection manager from Node's `ws`: a client watches a channel's join and
// leave, asks who is there once PEERS others have joined (and prints the count), then for
// its own stats once they have left, and prints what it saw as one JSON line. Usage: node presence_client.js URL TOKEN CHANNEL PEERS
const WebSocket = require('ws')

const [url, token, channel, peersText] = process.argv.slice(2)
const peers = Number(peersText)
const seen = { events: [], presence: null, stats: null }

const ws = new WebSocket(url, { headers: { Authorization: `Bearer ${token}` } })
const timer = setTimeout(() => { console.log(JSON.stringify({ error: 'timeout', seen })); process.exit(1) }, 15000)

ws.on('message', (raw) => {
  const message = JSON.parse(raw)
  switch (message.type) {
    case 'welcome':
      ws.send(JSON.stringify({ type: 'subscribe', channel, joinLeave: true }))
      break
    case 'subscribed':
      console.log(JSON.stringify({ ready: true }))  // the test starts the others now
      break
    case 'join':
      seen.events.push(['join', message.data.user])
      if (seen.events.filter(([kind]) => kind === 'join').length === peers) {
        ws.send(JSON.stringify({ type: 'presence', channel, id: 'p' }))
      }
      break
    case 'presence':
      seen.presence = message
      console.log(JSON.stringify({ presence: message.data.count }))  // the others leave now
      break
    case 'leave':
      seen.events.push(['leave', message.data.user])
      if (seen.events.length === 2 * peers) ws.send(JSON.stringify({ type: 'stats', id: 's' }))
      break
    case 'stats':
      seen.stats = message
      ws.close(1000, 'done')
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
