// pusher-js 8, unchanged, driven by the tests: one JSON command a line on stdin, one JSON
// event a line on stdout. Private and presence channels are authorized by the `pusher`
// server library's authorizeChannel, as an application's auth endpoint would.
//   node pusher_client.js HOST PORT APP_ID KEY SECRET [USER_ID]
// Commands: {"op":"subscribe","channel":C} {"op":"unsubscribe","channel":C}
//           {"op":"trigger","channel":C,"name":E,"data":D} {"op":"signin"} {"op":"disconnect"}
"use strict";
// private-encrypted- channels: the libraries encrypt, fastfan relays as it is.
const MASTER_KEY = Buffer.alloc(32, 7).toString("base64");
const Pusher = require("pusher-js");
const PusherServer = require("pusher");
const readline = require("readline");

const [host, port, appId, key, secret, userId] = process.argv.slice(2);
const backend = new PusherServer({ appId, key, secret, host, port, encryptionMasterKeyBase64: MASTER_KEY });
const emit = (event) => process.stdout.write(JSON.stringify(event) + "\n");

const client = new Pusher(key, {
  cluster: "fastfan", wsHost: host, wsPort: Number(port), forceTLS: false,
  enabledTransports: ["ws"], disableStats: true,
  userAuthentication: {
    customHandler: ({ socketId }, callback) =>
      callback(null, backend.authenticateUser(socketId, { id: userId, name: `user ${userId}` })),
  },
  channelAuthorization: {
    customHandler: ({ socketId, channelName }, callback) => {
      const presence = channelName.startsWith("presence-")
        ? { user_id: userId, user_info: { name: `user ${userId}` } } : undefined;
      callback(null, backend.authorizeChannel(socketId, channelName, presence));
    },
  },
});
client.connection.bind("state_change", ({ current }) => {
  if (current === "connected") emit({ event: "connected", socket_id: client.connection.socket_id });
  else emit({ event: "state", state: current });
});
client.connection.bind("error", (error) => emit({ event: "error", error: error && error.data }));
client.connection.bind("message", (message) => {
  if (message.event === "pusher:signin_success") emit({ event: "signed_in" });
  if (message.event === "pusher_internal:subscription_succeeded" &&
      message.channel.startsWith("#server-to-user-")) emit({ event: "user_channel" });
});
client.user.bind_global((eventName, data) => emit({ event: "user_message", name: eventName, data }));

function subscribe(name) {
  const channel = client.subscribe(name);
  channel.bind("pusher:subscription_succeeded", (members) => {
    const ids = [];
    if (members && typeof members.each === "function") members.each((m) => ids.push(m.id));
    emit({ event: "subscribed", channel: name, members: ids.sort(), count: members && members.count });
  });
  channel.bind("pusher:subscription_error", (error) => emit({ event: "subscription_error", channel: name, status: error.status }));
  channel.bind("pusher:cache_miss", () => emit({ event: "cache_miss", channel: name }));
  channel.bind("pusher:member_added", (m) => emit({ event: "member_added", channel: name, id: m.id, info: m.info }));
  channel.bind("pusher:member_removed", (m) => emit({ event: "member_removed", channel: name, id: m.id }));
  channel.bind_global((eventName, data) => {
    if (!eventName.startsWith("pusher:")) emit({ event: "message", channel: name, name: eventName, data });
  });
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const command = JSON.parse(line);
  if (command.op === "subscribe") subscribe(command.channel);
  else if (command.op === "unsubscribe") { client.unsubscribe(command.channel); emit({ event: "unsubscribed", channel: command.channel }); }
  else if (command.op === "trigger") emit({ event: "triggered", ok: client.channel(command.channel).trigger(command.name, command.data) });
  else if (command.op === "signin") client.signin();
  else if (command.op === "disconnect") { client.disconnect(); process.exit(0); }
});
