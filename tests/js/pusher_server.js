// The `pusher` server library (Node), unchanged: one call, its answer as JSON on stdout.
//   node pusher_server.js HOST PORT APP_ID KEY SECRET 'COMMAND'
// COMMAND: {"op":"trigger","channels":[C],"name":E,"data":D[,"socket_id":S]}
//          {"op":"triggerBatch","batch":[{"channel":C,"name":E,"data":D}]}
//          {"op":"get","path":P[,"params":{...}]}
//          {"op":"sendToUser","user":U,"name":E,"data":D} {"op":"terminate","user":U}
//          {"op":"webhook","headers":{...},"body":B}: the library's own check of a webhook
"use strict";
// private-encrypted- channels: the libraries encrypt, fastfan relays as it is.
const MASTER_KEY = Buffer.alloc(32, 7).toString("base64");
const Pusher = require("pusher");

const [host, port, appId, key, secret, commandText] = process.argv.slice(2);
const backend = new Pusher({ appId, key, secret, host, port, encryptionMasterKeyBase64: MASTER_KEY });
const command = JSON.parse(commandText);

async function call() {
  if (command.op === "trigger") {
    const params = command.socket_id || command.info
      ? { socket_id: command.socket_id, info: command.info } : undefined;
    return backend.trigger(command.channels, command.name, command.data, params);
  }
  if (command.op === "triggerBatch") return backend.triggerBatch(command.batch);
  if (command.op === "sendToUser") return backend.sendToUser(command.user, command.name, command.data);
  if (command.op === "terminate") return backend.terminateUserConnections(command.user);
  return backend.get({ path: command.path, params: command.params || {} });
}

if (command.op === "webhook") {
  const webhook = backend.webhook({ headers: command.headers, rawBody: command.body });
  console.log(JSON.stringify({ valid: webhook.isValid(), events: webhook.isValid() ? webhook.getEvents() : null }));
  process.exit(0);
}

call().then(async (response) => {
  console.log(JSON.stringify({ status: response.status, body: await response.json() }));
}, (error) => {
  console.log(JSON.stringify({ status: error.status || 0, body: error.body || String(error) }));
});
