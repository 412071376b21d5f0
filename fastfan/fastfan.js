// fastfan's browser client: one ES module, no build step, no dependency.
//
//   import { Client } from '/fastfan.js'
//   const client = new Client('ws://host:8080/', { token })   // or { getToken: async () => token }
//   const sub = client.subscribe('chat.lobby', { recover: true, joinLeave: true })
//   sub.on('message', (message) => {})
//   await client.publish('chat.lobby', { text: 'hi' })         // the `published` reply
//
// The same surface and rules as fastfan.client (Python): every request carries an `id` and
// settles by the reply with that id (an `error` reply rejects with a ServerError carrying
// .code); the client reconnects by itself (exponential backoff, full jitter), subscribes
// again to everything it holds (recovering history channels from the last offset seen),
// and refreshes its token through getToken before it expires. What the server would refuse
// (a bad channel name, a message over the size limit) is refused here, before it is sent.
// docs/clients.md is the guide, docs/protocol.md the protocol.

/** @typedef {Record<string, any>} Message  a JSON object as the server sent it */
/** @typedef {(...args: any[]) => void} Handler */

/**
 * @typedef {object} ClientOptions
 * @property {string} [token]  a JWT, sent as `?token=` (browsers cannot set headers)
 * @property {() => Promise<string>} [getToken]  called for every connection, and before
 *   the token's `exp` for a `refresh`
 * @property {number} [reconnectBase]  ms; the first reconnect waits up to this (500)
 * @property {number} [reconnectCap]  ms; no reconnect waits longer (30000)
 * @property {number} [maxMessageSize]  bytes, as the server's --max-message-size (65536)
 * @property {number} [requestTimeout]  ms before a request without a reply rejects (10000)
 * @property {number} [refreshMargin]  ms before `exp` to refresh the token (10000)
 * @property {number | null} [pingInterval]  ms of silence before a `ping` (15000; null: never)
 * @property {typeof WebSocket} [WebSocket]  the WebSocket class (the global one by default)
 * @property {() => number} [random]  uniform in [0, 1) (Math.random by default)
 */

/** The server's channel names: 1-255 characters from A-Z a-z 0-9 _ - . : @ / */
export const CHANNEL_NAME = /^[A-Za-z0-9_\-.:@/]{1,255}$/
/** The server's default --max-message-size, in bytes. */
export const MAX_MESSAGE_SIZE = 65536
// Longest a setTimeout may wait: past it, browsers fire at once.
const MAX_TIMER = 2 ** 31 - 1
const encoder = new TextEncoder()

/** The server answered a request with `{"type":"error","code":N,"message":TEXT}`. */
export class ServerError extends Error {
  /** @param {Message} reply */
  constructor (reply) {
    super(`${reply.code} ${reply.message}`)
    this.name = 'ServerError'
    /** @type {number} */
    this.code = reply.code
    /** @type {Message} the error object as the server sent it */
    this.reply = reply
  }
}

/**
 * @param {string} name  'ConnectionError' or 'TimeoutError'
 * @param {string} text
 */
function failure (name, text) {
  const error = new Error(text)
  error.name = name
  return error
}

/**
 * Milliseconds to wait before reconnect attempt `attempt` (0 first): full jitter, a uniform
 * draw from [0, min(cap, base * 2**attempt)], so clients cut off together come back spread
 * out instead of in one wave.
 * @param {number} attempt
 * @param {number} [base]
 * @param {number} [cap]
 * @param {() => number} [random]
 */
export function backoffDelay (attempt, base = 500, cap = 30000, random = Math.random) {
  return random() * Math.min(cap, base * 2 ** Math.min(attempt, 64))
}

/**
 * The `exp` claim of a JWT in seconds, read without verifying it (the server verifies; the
 * client only needs to know when to refresh), or null when it has none.
 * @param {string} token
 * @returns {number | null}
 */
export function tokenExpiry (token) {
  try {
    const payload = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')
    const claims = JSON.parse(atob(payload + '='.repeat(-payload.length & 3)))
    return typeof claims?.exp === 'number' ? claims.exp : null
  } catch {
    return null
  }
}

/** @param {string} channel */
function checkChannel (channel) {
  if (typeof channel !== 'string' || !CHANNEL_NAME.test(channel)) {
    throw new Error(`invalid channel name ${JSON.stringify(channel)}: use 1-255 characters ` +
                    'from A-Z a-z 0-9 _ - . : @ /')
  }
}

/** Named callbacks: `on(event, callback)`; a callback that throws is logged, not fatal. */
class Events {
  /** @param {string[]} events */
  constructor (events) {
    /** @type {Map<string, Handler[]>} */
    this._handlers = new Map(events.map((event) => [event, []]))
  }

  /**
   * Call `callback` on `event`.
   * @param {string} event
   * @param {Handler} callback
   * @returns {this}
   */
  on (event, callback) {
    const handlers = this._handlers.get(event)
    if (handlers === undefined) {
      throw new Error(`unknown event ${JSON.stringify(event)}: one of ` +
                      [...this._handlers.keys()].sort().join(', '))
    }
    handlers.push(callback)
    return this
  }

  /**
   * Stop calling `callback` on `event`.
   * @param {string} event
   * @param {Handler} callback
   * @returns {this}
   */
  off (event, callback) {
    const handlers = this._handlers.get(event) ?? []
    const at = handlers.indexOf(callback)
    if (at >= 0) handlers.splice(at, 1)
    return this
  }

  /**
   * @param {string} event
   * @param {...any} args
   */
  _emit (event, ...args) {
    for (const callback of /** @type {Handler[]} */ (this._handlers.get(event))) {
      try {
        callback(...args)
      } catch (error) {
        console.error(`fastfan: a ${JSON.stringify(event)} callback threw`, error)
      }
    }
  }
}

/**
 * One channel the client holds, across reconnects, until `unsubscribe()`.
 *
 * Events: `message` (the message object, offset and epoch included on history channels),
 * `join` and `leave` (the server's object; who in `.data`), `subscribed` (each
 * `subscribed` reply, the first and those after reconnects), `recovery_failed` (a
 * `subscribed` reply with `"recovered": false` after a reconnect: messages were missed and
 * the application must re-sync from its own source), and `unsubscribed` (the server ended
 * it: its reply with `reason`, or `reason: "error"` and the ServerError as `error`).
 * `ready` settles with the first `subscribed` reply, or the error that refused it.
 */
export class Subscription extends Events {
  /**
   * @param {Client} client
   * @param {string} channel
   * @param {boolean} recover
   * @param {boolean} joinLeave
   */
  constructor (client, channel, recover, joinLeave) {
    super(['message', 'join', 'leave', 'subscribed', 'recovery_failed', 'unsubscribed'])
    this.client = client
    this.channel = channel
    this.recover = recover
    this.joinLeave = joinLeave
    /** @type {number | null} the last seen, on channels with history */
    this.offset = null
    /** @type {string | null} */
    this.epoch = null
    this.confirmed = false // the server has answered `subscribed` at least once
    this.ended = false
    /** @type {(reply: Message) => void} */
    this._resolve = () => {}
    /** @type {(error: Error) => void} */
    this._reject = () => {}
    /** @type {Promise<Message>} */
    this.ready = new Promise((resolve, reject) => {
      this._resolve = resolve
      this._reject = reject
    })
    this.ready.catch(() => {}) // nobody awaiting it is no unhandled rejection
  }

  /**
   * The per-message path.
   * @param {Message} message
   */
  _deliver (message) {
    if ('offset' in message) {
      this.offset = message.offset
      this.epoch = message.epoch ?? null
    }
    this._emit('message', message)
  }

  /** @returns {Message} */
  _request () {
    /** @type {Message} */
    const request = { type: 'subscribe', channel: this.channel }
    if (this.joinLeave) request.joinLeave = true
    if (this.recover && this.epoch !== null && this.offset !== null) {
      request.recover = { offset: this.offset, epoch: this.epoch }
    }
    return request
  }

  /** @param {Message} reply */
  _subscribed (reply) {
    if ('epoch' in reply && 'offset' in reply &&
        (this.epoch !== reply.epoch || reply.recovered !== true)) {
      this.offset = reply.offset // live from here
      this.epoch = reply.epoch
    }
    const again = this.confirmed
    this.confirmed = true
    this._resolve(reply)
    this._emit('subscribed', reply)
    if (again && reply.recovered === false) this._emit('recovery_failed', reply)
  }

  /** @param {Error} error  why, for a `ready` still waiting */
  _end (error) {
    this.ended = true
    this._reject(error)
  }

  /**
   * Stop receiving the channel.
   * @returns {Promise<void>}
   */
  async unsubscribe () {
    if (this.ended) return
    this.client._forget(this, new Error('unsubscribed before the server answered'))
    if (this.client.connected) {
      try {
        await this.client._request({ type: 'unsubscribe', channel: this.channel })
      } catch (error) {
        if (!(error instanceof Error) || error.name !== 'ConnectionError') throw error
      } // gone with the connection anyway
    }
  }
}

/**
 * A connection to a fastfan server that outlives its WebSocket connections; it connects
 * at once, and again whenever the connection goes, until `close()`.
 *
 * Events: `connected` (the `welcome` object), `disconnected` (the close code; 1006 when
 * the connection just went), `error` (a ServerError the server sent unasked, a failed
 * token refresh, or a connection attempt that failed).
 */
export class Client extends Events {
  /**
   * @param {string} url  ws:// or wss://
   * @param {ClientOptions} [options]
   */
  constructor (url, options = {}) {
    super(['connected', 'disconnected', 'error'])
    if (options.token !== undefined && options.getToken !== undefined) {
      throw new Error('give token or getToken, not both')
    }
    if (!/^wss?:$/.test(new URL(url).protocol)) {
      throw new Error(`${JSON.stringify(url)} is not a ws:// or wss:// URL`)
    }
    this.url = url
    this.token = options.token ?? null
    this.getToken = options.getToken ?? null
    this.reconnectBase = options.reconnectBase ?? 500
    this.reconnectCap = options.reconnectCap ?? 30000
    this.maxMessageSize = options.maxMessageSize ?? MAX_MESSAGE_SIZE
    this.requestTimeout = options.requestTimeout ?? 10000
    this.refreshMargin = options.refreshMargin ?? 10000
    this.pingInterval = options.pingInterval === undefined ? 15000 : options.pingInterval
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket
    this.random = options.random ?? Math.random
    /** @type {Message | null} */
    this.welcome = null
    /** @type {Map<string, Subscription>} */
    this._subscriptions = new Map()
    /** @type {Map<number, {resolve: (reply: Message) => void, reject: (error: Error) => void}>} */
    this._pending = new Map()
    /** @type {Array<() => void>} requests made while not connected, sent once connected */
    this._waiting = []
    this._nextId = 0
    /** @type {WebSocket | null} the connection being opened or open */
    this._socket = null
    this.connected = false
    this._closing = false
    this._attempt = 0
    this._heard = 0 // frames received, read by the ping timer
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this._reconnectTimer = undefined
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this._refreshTimer = undefined
    /** @type {ReturnType<typeof setInterval> | undefined} */
    this._pingTimer = undefined
    this._open()
  }

  /**
   * Hold `channel` until `unsubscribe()`, across reconnects. `recover`: after a reconnect,
   * ask a history channel for what was missed since the last message seen. `joinLeave`:
   * also receive `join` and `leave` events. `sub.ready` settles with the server's answer.
   * @param {string} channel
   * @param {{recover?: boolean, joinLeave?: boolean}} [options]
   * @returns {Subscription}
   */
  subscribe (channel, { recover = false, joinLeave = false } = {}) {
    checkChannel(channel)
    if (this._closing) throw failure('ConnectionError', 'the client is closed')
    if (this._subscriptions.has(channel)) {
      throw new Error(`already subscribed to ${JSON.stringify(channel)}: use that Subscription`)
    }
    const subscription = new Subscription(this, channel, recover, joinLeave)
    this._subscriptions.set(channel, subscription) // before the reply: no message missed
    if (this.connected) this._sendSubscribe(subscription)
    return subscription
  }

  /**
   * Publish `data` (any JSON value); the `published` reply once the bus has it.
   * `echo: false`: this connection does not receive its own message.
   * @param {string} channel
   * @param {any} data
   * @param {{echo?: boolean}} [options]
   * @returns {Promise<Message>}
   */
  async publish (channel, data, { echo = true } = {}) {
    checkChannel(channel)
    if (data === undefined) {
      throw new Error('publish needs data: any JSON value (null included), not undefined')
    }
    /** @type {Message} */
    const request = { type: 'publish', channel, data }
    if (!echo) request.echo = false
    return this._request(request)
  }

  /**
   * This connection's figures: the `stats` reply.
   * @returns {Promise<Message>}
   */
  async stats () {
    return this._request({ type: 'stats' })
  }

  /**
   * Who is subscribed to `channel`: the `presence` reply.
   * @param {string} channel
   * @returns {Promise<Message>}
   */
  async presence (channel) {
    checkChannel(channel)
    return this._request({ type: 'presence', channel })
  }

  /**
   * How many are subscribed to `channel`: the `presence_stats` reply.
   * @param {string} channel
   * @returns {Promise<Message>}
   */
  async presenceStats (channel) {
    checkChannel(channel)
    return this._request({ type: 'presence_stats', channel })
  }

  /**
   * Kept messages of a history channel: the `history` reply (oldest first).
   * @param {string} channel
   * @param {{limit?: number, since?: number, epoch?: string}} [options]
   * @returns {Promise<Message>}
   */
  async history (channel, { limit, since, epoch } = {}) {
    checkChannel(channel)
    /** @type {Message} */
    const request = { type: 'history', channel }
    if (limit !== undefined) request.limit = limit
    if (since !== undefined) request.since = since
    if (epoch !== undefined) request.epoch = epoch
    return this._request(request)
  }

  /**
   * Call the server application's `method` (an `@app.rpc` of --app, or the rpc proxy) with
   * `data` (any JSON value): resolves with its answer, the `rpc_result`'s `data`, or rejects
   * with the ServerError (404 for a method nobody answers).
   * @param {string} method
   * @param {any} [data]
   * @returns {Promise<any>}
   */
  async rpc (method, data = null) {
    if (typeof method !== 'string' || method === '') throw new Error('rpc needs a method name')
    const reply = await this._request({ type: 'rpc', method, data })
    return reply.data
  }

  /** Close the connection, end every subscription, and stop reconnecting. */
  close () {
    if (this._closing) return
    this._closing = true
    clearTimeout(this._reconnectTimer)
    const closed = failure('ConnectionError', 'the client is closed')
    for (const subscription of [...this._subscriptions.values()]) this._forget(subscription, closed)
    const socket = this._socket
    if (socket !== null) {
      this._lost(socket, 1000) // ours, not the server's answer
      socket.close(1000)
    }
    for (const send of this._waiting.splice(0)) send() // each finds the client closed
  }

  /**
   * Send `request` with a fresh `id` once connected; its reply, or the ServerError.
   * @param {Message} request
   * @returns {Promise<Message>}
   */
  _request (request) {
    if (this._closing) return Promise.reject(failure('ConnectionError', 'the client is closed'))
    const id = request.id = ++this._nextId
    const payload = JSON.stringify(request)
    const size = payload.length * 3 <= this.maxMessageSize
      ? payload.length // no UTF-8 can be over the limit: no need to count
      : encoder.encode(payload).length
    if (size > this.maxMessageSize) {
      return Promise.reject(new Error(
        `${request.type} of ${size} bytes is over the ${this.maxMessageSize}-byte limit ` +
        '(maxMessageSize, as the server\'s --max-message-size)'))
    }
    return new Promise((resolve, reject) => {
      let expired = false
      const timer = setTimeout(() => {
        expired = true // and so never sent, if it still waits for a connection
        this._pending.delete(id)
        reject(failure('TimeoutError', `no reply to ${request.type} within ${this.requestTimeout} ms`))
      }, this.requestTimeout)
      const settle = {
        /** @param {Message} reply */
        resolve: (reply) => { clearTimeout(timer); resolve(reply) },
        /** @param {Error} error */
        reject: (error) => { clearTimeout(timer); reject(error) }
      }
      const send = () => {
        if (expired) return
        if (this._closing) settle.reject(failure('ConnectionError', 'the client is closed'))
        else this._send(id, payload, settle)
      }
      if (this.connected) send()
      else this._waiting.push(send)
    })
  }

  /**
   * @param {number} id
   * @param {string} payload
   * @param {{resolve: (reply: Message) => void, reject: (error: Error) => void}} settle
   */
  _send (id, payload, settle) {
    this._pending.set(id, settle);
    /** @type {WebSocket} */ (this._socket).send(payload)
  }

  /**
   * @param {Subscription} subscription
   * @param {number} [attempt]  asked again after this many 503s on one connection
   */
  _sendSubscribe (subscription, attempt = 0) {
    const request = subscription._request()
    const id = request.id = ++this._nextId
    const socket = this._socket
    this._send(id, JSON.stringify(request), {
      resolve: (reply) => { if (!subscription.ended) subscription._subscribed(reply) },
      reject: (error) => {
        if (subscription.ended || !(error instanceof ServerError)) return // sent again on reconnect
        if (subscription.confirmed && error.code === 503) {
          // The server is back but not its bus or history store yet (it has just started,
          // or Redis is away): ask again, backing off as reconnects do. A new connection
          // meanwhile asks anyway.
          const delay = backoffDelay(attempt, this.reconnectBase, this.reconnectCap, this.random)
          setTimeout(() => {
            if (!subscription.ended && this._socket === socket && this.connected) {
              this._sendSubscribe(subscription, attempt + 1)
            }
          }, delay)
          return
        }
        this._forget(subscription, error) // e.g. not permitted: it ends
        subscription._emit('unsubscribed', {
          type: 'unsubscribed', channel: subscription.channel, reason: 'error', error
        })
      }
    })
  }

  /**
   * @param {Subscription} subscription
   * @param {Error} error  for a `ready` still waiting
   */
  _forget (subscription, error) {
    if (this._subscriptions.get(subscription.channel) === subscription) {
      this._subscriptions.delete(subscription.channel)
    }
    subscription._end(error)
  }

  /** One connection: the token, the WebSocket, its handlers. */
  async _open () {
    let token = this.token
    if (this.getToken !== null) {
      try {
        token = await this.getToken()
      } catch (error) {
        this._failed(`getToken failed: ${error}`)
        return
      }
    }
    if (this._closing) return
    const url = new URL(this.url)
    if (token) url.searchParams.set('token', token)
    let socket
    try {
      socket = new this.WebSocket(url.href)
    } catch (error) { // e.g. ws:// from an https:// page
      this._failed(`cannot open ${this.url}: ${error}`)
      return
    }
    this._socket = socket
    socket.onmessage = (event) => {
      if (this._socket !== socket) return
      this._heard++
      const message = JSON.parse(event.data)
      if (message.type === 'message') {
        this._subscriptions.get(message.channel)?._deliver(message)
      } else {
        this._onReply(message, token)
      }
    }
    socket.onclose = (event) => { this._lost(socket, event.code) }
  }

  /**
   * Everything but `message`: the welcome, replies by `id`, unasked messages.
   * @param {Message} message
   * @param {string | null} token  the connection's
   */
  _onReply (message, token) {
    const type = message.type
    if (!this.connected) {
      if (type === 'welcome') this._onWelcome(message, token)
      return
    }
    const settle = 'id' in message ? this._pending.get(message.id) : undefined
    if (settle !== undefined) {
      this._pending.delete(message.id)
      if (type === 'error') settle.reject(new ServerError(message))
      else settle.resolve(message)
    } else if (type === 'error') {
      this._emit('error', new ServerError(message))
    } else if (type === 'join' || type === 'leave' || type === 'unsubscribed') {
      const subscription = this._subscriptions.get(message.channel)
      if (subscription === undefined) return
      if (type === 'unsubscribed') { // unasked: the server ended it
        this._forget(subscription, new Error(`the server ended the subscription (${message.reason})`))
      }
      subscription._emit(type, message)
    }
  }

  /**
   * @param {Message} welcome
   * @param {string | null} token
   */
  _onWelcome (welcome, token) {
    this.connected = true
    this._attempt = 0
    this.token = token
    this.welcome = welcome
    for (const subscription of this._subscriptions.values()) this._sendSubscribe(subscription)
    for (const send of this._waiting.splice(0)) send()
    if (this.getToken !== null && token) this._scheduleRefresh(token)
    if (this.pingInterval !== null) this._startPinging(this.pingInterval)
    this._emit('connected', welcome)
  }

  /**
   * A connection closed, or given up: reject what waits on it, and connect again.
   * @param {WebSocket} socket
   * @param {number} code
   */
  _lost (socket, code) {
    if (this._socket !== socket) return // one given up already
    this._socket = null
    const wasConnected = this.connected
    this.connected = false
    clearTimeout(this._refreshTimer)
    clearInterval(this._pingTimer)
    const pending = [...this._pending.values()]
    this._pending.clear()
    const lost = failure('ConnectionError', 'the connection to the server was lost')
    for (const settle of pending) settle.reject(lost)
    if (wasConnected) {
      this._emit('disconnected', code)
      this._reconnect()
    } else {
      this._failed(`connection attempt ${this._attempt} failed (close code ${code}): ` +
                   'the server is unreachable or refused the token')
    }
  }

  /** @param {string} why */
  _failed (why) {
    if (this._closing) return
    this._emit('error', failure('ConnectionError', why))
    this._reconnect()
  }

  _reconnect () {
    if (this._closing) return
    const delay = backoffDelay(this._attempt++, this.reconnectBase, this.reconnectCap, this.random)
    this._reconnectTimer = setTimeout(() => { this._open() }, delay)
  }

  /**
   * Before `exp`, a new token from getToken through a `refresh` request.
   * @param {string} token
   */
  _scheduleRefresh (token) {
    clearTimeout(this._refreshTimer)
    const expiry = tokenExpiry(token)
    if (expiry === null) return
    const left = expiry * 1000 - Date.now()
    const wait = Math.max(0, left - Math.min(this.refreshMargin, left / 2))
    this._refreshTimer = setTimeout(() => {
      if (wait > MAX_TIMER) this._scheduleRefresh(token) // not yet: wait again
      else this._refresh()
    }, Math.min(wait, MAX_TIMER))
  }

  async _refresh () {
    const getToken = /** @type {() => Promise<string>} */ (this.getToken)
    let token
    try {
      token = await getToken()
      await this._request({ type: 'refresh', token })
    } catch (error) {
      this._emit('error', error) // at exp the server closes; reconnecting fetches anew
      return
    }
    this.token = token
    if (this.connected) this._scheduleRefresh(token)
  }

  /**
   * Browsers cannot send WebSocket pings: after `interval` ms with nothing received, a
   * `ping` request; no answer within requestTimeout, and the connection is given up for a
   * new one.
   * @param {number} interval
   */
  _startPinging (interval) {
    const socket = this._socket
    let heard = this._heard
    this._pingTimer = setInterval(() => {
      if (this._heard !== heard) {
        heard = this._heard
        return
      }
      this._request({ type: 'ping' }).catch((error) => {
        if (error.name === 'TimeoutError' && this._socket === socket && socket !== null) {
          this._lost(socket, 1006)
          socket.close()
        }
      })
    }, interval)
  }
}
