// Node's `ws` with permessage-deflate (its default, asked for explicitly here): subscribes,
// publishes COUNT messages of SIZE characters (ws compresses them past its threshold),
// prints the negotiated extensions and what came back as one JSON line.
// Usage: node deflate_client.js URL TOKEN CHANNEL COUNT SIZE
const WebSocket = require('ws')

const [url, token, channel, countText, sizeText] = process.argv.slice(2)
const count = Number(countText)
const text = 'fan-out '.repeat(Number(sizeText) / 8)
const seen = { extensions: null, messages: [] }

const ws = new WebSocket(url, {
  headers: { Authorization: `Bearer ${token}` },
  perMessageDeflate: { threshold: 0 },
})
const timer = setTimeout(() => { console.log(JSON.stringify({ error: 'timeout', seen })); process.exit(1) }, 10000)

ws.on('upgrade', (response) => { seen.extensions = response.headers['sec-websocket-extensions'] })
ws.on('message', (raw) => {
  const message = JSON.parse(raw)
  if (message.type === 'welcome') {
    ws.send(JSON.stringify({ type: 'subscribe', channel }))
  } else if (message.type === 'subscribed') {
    for (let i = 0; i < count; i++) {
      ws.send(JSON.stringify({ type: 'publish', channel, data: { i, text } }))
    }
  } else if (message.type === 'message') {
    seen.messages.push(message.data.i === seen.messages.length && message.data.text === text)
    if (seen.messages.length === count) ws.close(1000)
  }
})
ws.on('close', (code) => {
  clearTimeout(timer)
  console.log(JSON.stringify({ ...seen, closeCode: code }))
})
