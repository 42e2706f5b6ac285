// Reads the bridge's channel-state API with Pusher's official Node server SDK (npm `pusher`),
// the way an application would, and prints every answer as one JSON object for
// tests/it/state_sdk.rs. Environment: BRIDGE_HOST, BRIDGE_PORT, APP_ID, APP_KEY, APP_SECRET, ROOM.
const Pusher = require("pusher")

const env = process.env
const base = {
  appId: env.APP_ID,
  key: env.APP_KEY,
  secret: env.APP_SECRET,
  host: env.BRIDGE_HOST,
  port: env.BRIDGE_PORT,
  useTLS: false,
}

async function call(client, path, params) {
  try {
    const res = await client.get({ path, params })
    return { status: res.status, body: await res.json() }
  } catch (e) {
    return { status: e.status === undefined ? null : e.status, error: String(e.message) }
  }
}

async function main() {
  const good = new Pusher(base)
  const wrong = new Pusher({ ...base, secret: "not-the-secret" })
  const room = env.ROOM
  const out = {}
  out.channels = await call(good, "/channels", {})
  out.presence = await call(good, "/channels", { filter_by_prefix: "presence-", info: "user_count" })
  out.channel = await call(good, `/channels/${room}`, { info: "user_count" })
  out.users = await call(good, `/channels/${room}/users`, {})
  out.count = await call(good, "/channels/private-sdk", { info: "subscription_count" })
  out.bad_request = await call(good, "/channels/private-sdk", { info: "user_count" })
  out.wrong_secret = await call(wrong, "/channels", {})
  out.unknown_app = await call(new Pusher({ ...base, appId: "999" }), "/channels", {})
  // A request signed 700 s ago (the SDK signs with Date.now()).
  const realNow = Date.now
  Date.now = () => realNow() - 700 * 1000
  out.stale = await call(good, "/channels", {})
  Date.now = realNow
  const unsigned = await fetch(`http://${env.BRIDGE_HOST}:${env.BRIDGE_PORT}/apps/${env.APP_ID}/channels`)
  out.unsigned = { status: unsigned.status }
  console.log(JSON.stringify(out))
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
