"""Reads the bridge's channel-state API with Pusher's official Python server SDK (PyPI
`pusher`) and prints every answer as one JSON object for tests/it/state_sdk.rs.
Environment: BRIDGE_HOST, BRIDGE_PORT, APP_ID, APP_KEY, APP_SECRET, ROOM."""
import json
import os
import time
import types
import urllib.error
import urllib.request

import pusher
import pusher.errors
import pusher.http

env = os.environ


def client(secret=None, app_id=None):
    return pusher.Pusher(
        app_id=app_id or env["APP_ID"],
        key=env["APP_KEY"],
        secret=secret or env["APP_SECRET"],
        host=env["BRIDGE_HOST"],
        port=int(env["BRIDGE_PORT"]),
        ssl=False,
    )


def call(f):
    try:
        return {"status": 200, "body": f()}
    except pusher.errors.PusherBadRequest as e:
        return {"status": 400, "error": str(e)}
    except pusher.errors.PusherBadAuth as e:
        return {"status": 401, "error": str(e)}
    except pusher.errors.PusherBadStatus as e:
        return {"status": int(str(e).split(":")[0]), "error": str(e)}


good = client()
room = env["ROOM"]
out = {
    "channels": call(lambda: good.channels_info()),
    "presence": call(lambda: good.channels_info(prefix_filter="presence-", attributes=["user_count"])),
    "channel": call(lambda: good.channel_info(room, ["user_count"])),
    "users": call(lambda: good.users_info(room)),
    "count": call(lambda: good.channel_info("private-sdk", ["subscription_count"])),
    "bad_request": call(lambda: good.channel_info("private-sdk", ["user_count"])),
    "wrong_secret": call(lambda: client(secret="not-the-secret").channels_info()),
    "unknown_app": call(lambda: client(app_id="999").channels_info()),
}
# A request signed 700 s ago (the SDK signs with time.time()).
real_time = time.time
pusher.http.time = types.SimpleNamespace(time=lambda: real_time() - 700)
out["stale"] = call(lambda: good.channels_info())
pusher.http.time = time
try:
    urllib.request.urlopen("http://%s:%s/apps/%s/channels" % (env["BRIDGE_HOST"], env["BRIDGE_PORT"], env["APP_ID"]))
    out["unsigned"] = {"status": 200}
except urllib.error.HTTPError as e:
    out["unsigned"] = {"status": e.code}
print(json.dumps(out))
