// Laravel Echo 2 with its Pusher connector (pusher-js 8), unchanged, driven by the tests: one
// JSON command a line on stdin, one JSON event a line on stdout. The auth endpoint is the
// `pusher` server library's authorizeChannel, as Laravel's Broadcast::routes() signs.
//   node echo_client.mjs HOST PORT APP_ID KEY SECRET USER_ID
// Commands: {"op":"listen","kind":"channel"|"private","channel":C,"event":E}
//           {"op":"join","channel":C} {"op":"leave","channel":C}
//           {"op":"whisper","kind":"private"|"join","channel":C,"name":N,"data":D}
//           {"op":"listenForWhisper","kind":"private"|"join","channel":C,"name":N}
// (a module: laravel-echo 2's CommonJS build does not load in Node)
import Echo from "laravel-echo";
import Pusher from "pusher-js";
import PusherServer from "pusher";
import readline from "node:readline";

const [host, port, appId, key, secret, userId] = process.argv.slice(2);
const backend = new PusherServer({ appId, key, secret, host, port });
const emit = (event) => process.stdout.write(JSON.stringify(event) + "\n");

const echo = new Echo({
  broadcaster: "pusher", Pusher, key, cluster: "fastfan", wsHost: host, wsPort: Number(port),
  forceTLS: false, enabledTransports: ["ws"], disableStats: true,
  channelAuthorization: {
    customHandler: ({ socketId, channelName }, callback) => {
      const presence = channelName.startsWith("presence-")
        ? { user_id: userId, user_info: { id: userId, name: `user ${userId}` } } : undefined;
      callback(null, backend.authorizeChannel(socketId, channelName, presence));
    },
  },
});
echo.connector.pusher.connection.bind("connected", () => emit({ event: "connected", socket_id: echo.socketId() }));
const pick = (kind, name) => (kind === "private" ? echo.private(name) : kind === "join" ? echo.join(name) : echo.channel(name));

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const command = JSON.parse(line);
  if (command.op === "listen") {
    pick(command.kind, command.channel)
      .subscribed(() => emit({ event: "subscribed", channel: command.channel }))
      .listen(command.event, (data) => emit({ event: "heard", channel: command.channel, name: command.event, data }));
  } else if (command.op === "join") {
    echo.join(command.channel)
      .here((users) => emit({ event: "here", channel: command.channel, users: users.map((u) => u.id).sort() }))
      .joining((user) => emit({ event: "joining", channel: command.channel, id: user.id }))
      .leaving((user) => emit({ event: "leaving", channel: command.channel, id: user.id }));
  } else if (command.op === "leave") {
    echo.leave(command.channel);
    emit({ event: "left", channel: command.channel });
  } else if (command.op === "whisper") {
    pick(command.kind, command.channel).whisper(command.name, command.data);
  } else if (command.op === "listenForWhisper") {
    pick(command.kind, command.channel)
      .listenForWhisper(command.name, (data) => emit({ event: "whisper", channel: command.channel, name: command.name, data }));
  }
});
