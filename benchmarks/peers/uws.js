// uWebSockets.js pub/sub speaking the seed protocol: each publish is encoded once and
// handed to app.publish, which frames it once and writes it to every subscriber in C++.
// The native build is required by path: if it cannot load, this fails rather than run the
// package's JavaScript fallback. Usage: node uws.js PORT
const path = require('path')
const uWS = require(path.join(__dirname, 'node_modules/@trufflesuite/uws-js-unofficial/binaries',
  `uws_${process.platform}_${process.arch}_${process.versions.modules}.node`))

const port = Number(process.argv[2] || 8080)
let nextId = 0
const decoder = new TextDecoder()

const app = uWS.App().ws('/*', {
  maxPayloadLength: 64 * 1024,
  idleTimeout: 0,
  maxBackpressure: 64 * 1024 * 1024,
  open: (ws) => {
    ws.clientId = `uws-${++nextId}`
    ws.send(JSON.stringify({ type: 'welcome', data: { clientId: ws.clientId, timestamp: Date.now() } }))
  },
  message: (ws, raw) => {
    let message
    try { message = JSON.parse(decoder.decode(raw)) } catch (e) { return }
    if (message.type === 'subscribe') {
      ws.subscribe(message.channel)
      ws.send(JSON.stringify({ type: 'subscribed', channel: message.channel }))
    } else if (message.type === 'publish') {
      app.publish(message.channel, JSON.stringify({ type: 'message', channel: message.channel, data: message.data, from: ws.clientId, timestamp: Date.now() }))
    }
  }
}).listen('127.0.0.1', port, (token) => { if (!token) { console.error('uws: cannot listen'); process.exit(1) } })
