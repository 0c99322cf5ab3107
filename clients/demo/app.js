// The matchgate demo page: a random video chat in one small ES module on top of the SDK.
//
// In dev mode it gets a token from `POST /v1/dev/token` for a random device id kept in
// sessionStorage (so two tabs are two users, and a reload stays the same user); with a
// key configured (`--demo`) it asks for a token instead. In `p2p` mode (or without media
// configuration) a match becomes a WebRTC call with the camera and microphone; in `livekit`
// mode the page shows the room it got. A proposal (accept phase) is accepted at once: pressing
// Start said yes already. Leaving the page ends the call.
//
// `?relay=1` forces `iceTransportPolicy: "relay"` (every packet through TURN). The read-only
// `window.matchgateDemo` lets tests read the state, the last chat line and the peer connection.

import { Matchgate } from "/demo/matchgate.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const iceTransportPolicy = params.get("relay") === "1" ? "relay" : "all";

const view = {
  /** connecting, idle, searching, proposed, in_call, reconnecting or closed. */
  state: "connecting",
  sessionId: null,
  /** The session Block and Report are about: the current one, else the last one. */
  lastSessionId: null,
  queue: null,
  lastChat: null,
  call: null,
  callState: null,
  localStream: null,
};

window.matchgateDemo = Object.freeze({
  get state() {
    return view.state;
  },
  get sessionId() {
    return view.sessionId;
  },
  get lastChat() {
    return view.lastChat;
  },
  get pc() {
    return view.call?.peerConnection ?? null;
  },
});

const SHOWN_STATE = {
  connecting: "connecting",
  idle: "idle",
  queued: "searching",
  proposed: "proposed",
  matched: "in_call",
  reconnecting: "reconnecting",
  closed: "closed",
};

// --- tokens ---------------------------------------------------------------------------------

function deviceId() {
  let id = sessionStorage.getItem("matchgate-demo-device");
  if (id === null) {
    id = `demo-${crypto.randomUUID()}`;
    sessionStorage.setItem("matchgate-demo-device", id);
  }
  return id;
}

/** A dev-mode token, or null when the gateway has no dev mode (a key is configured). */
async function devToken() {
  const response = await fetch("/v1/dev/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ device_id: deviceId() }),
  });
  if (response.status === 404) return null;
  if (!response.ok) throw new Error(`POST /v1/dev/token answered ${response.status}`);
  return (await response.json()).access_token;
}

/** Asks for a token once (a gateway with a key): the form stays until one is given. */
function pastedToken() {
  const stored = sessionStorage.getItem("matchgate-demo-token");
  if (stored !== null) return Promise.resolve(stored);
  const form = $("token-form");
  form.hidden = false;
  return new Promise((resolve) => {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim();
      if (token === "") return;
      sessionStorage.setItem("matchgate-demo-token", token);
      form.hidden = true;
      resolve(token);
    });
  });
}

// --- camera ---------------------------------------------------------------------------------

async function openCamera() {
  const attempts = [{ video: true, audio: true }, { video: true }, { audio: true }];
  for (const constraints of attempts) {
    try {
      return await navigator.mediaDevices.getUserMedia(constraints);
    } catch {
      // Try with less.
    }
  }
  return null;
}

// --- the page -------------------------------------------------------------------------------

function notice(text) {
  $("notice").textContent = text;
}

function chatLine(who, text) {
  const item = document.createElement("li");
  item.className = who;
  const name = document.createElement("b");
  name.textContent = who === "me" ? "You" : who === "peer" ? "Stranger" : "";
  item.append(name, document.createTextNode(text));
  $("chat-log").append(item);
  item.scrollIntoView({ block: "nearest" });
}

function seconds(ms) {
  return ms === null || ms === undefined ? "unknown" : `${Math.max(1, Math.round(ms / 1000))} s`;
}

function render() {
  const line = $("state");
  line.dataset.state = view.state;
  switch (view.state) {
    case "connecting":
      line.textContent = "Connecting…";
      break;
    case "idle":
      line.textContent = "Idle: press Start to meet someone";
      break;
    case "searching":
      line.textContent =
        view.queue === null
          ? "Searching…"
          : `Searching… position ${view.queue.position + 1} in line, estimated wait ${seconds(view.queue.estimated_wait_ms)}`;
      break;
    case "proposed":
      line.textContent = "Match found: accepting…";
      break;
    case "in_call":
      line.textContent = `In a call (${view.sessionId})`;
      break;
    case "reconnecting":
      line.textContent = "Connection lost: reconnecting…";
      break;
    case "closed":
      line.textContent = "Disconnected: reload the page to start over";
      break;
  }
  $("call-state").textContent = view.callState === null ? "" : `(${view.callState})`;
  const connected = !["connecting", "reconnecting", "closed"].includes(view.state);
  $("start").disabled = view.state !== "idle";
  $("skip").disabled = view.state !== "in_call";
  $("end").disabled = !["searching", "proposed", "in_call"].includes(view.state);
  $("block").disabled = !connected || view.lastSessionId === null;
  $("report").disabled = !connected || view.lastSessionId === null;
  $("chat-input").disabled = view.state !== "in_call";
  $("chat-send").disabled = view.state !== "in_call";
}

/** Runs a request, showing a refusal instead of throwing it. */
function act(request, done) {
  request().then(done, (error) => notice(`${error.code ?? "error"}: ${error.message}`));
}

/** Opens the media of the current session, once per session. */
function startMedia(mg) {
  const session = mg.session;
  if (mg.state !== "matched" || session === null) return;
  if (view.call !== null && view.call.sessionId === session.session_id) return;
  if ($("room-info").dataset.session === session.session_id) return;
  const media = session.media;
  if (media?.provider === "livekit") {
    $("room-info").dataset.session = session.session_id;
    $("room-name").textContent = media.room;
    $("room-url").textContent = media.url;
    $("room-info").hidden = false;
    return;
  }
  const call = mg.call({ localStream: view.localStream ?? undefined, iceTransportPolicy });
  view.call = call;
  view.callState = call.peerConnection.connectionState;
  call.on("remote_stream", (stream) => {
    $("remote-video").srcObject = stream;
  });
  call.on("state", (state) => {
    view.callState = state;
    render();
  });
  call.on("error", (error) => notice(`call: ${error.message}`));
  call.on("closed", () => {
    if (view.call !== call) return;
    view.call = null;
    view.callState = null;
    $("remote-video").srcObject = null;
    render();
  });
}

async function main() {
  render();
  const firstToken = await devToken().catch((error) => {
    notice(error.message);
    return null;
  });
  const getToken = firstToken === null ? pastedToken : devToken;
  let token = firstToken;

  const mg = new Matchgate({
    url: `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/v1/ws`,
    // The first token is already at hand; later ones (expiry, refusal) are asked for anew.
    getToken: () => {
      if (token === null) return getToken();
      const first = token;
      token = null;
      return first;
    },
  });

  mg.on("state", (state) => {
    view.state = SHOWN_STATE[state] ?? state;
    if (state !== "queued") view.queue = null;
    if (state === "matched") {
      view.sessionId = mg.session?.session_id ?? null;
      view.lastSessionId = view.sessionId;
      startMedia(mg);
    } else if (state !== "reconnecting") {
      view.sessionId = null;
    }
    render();
  });
  mg.on("queued", (frame) => {
    view.queue = frame;
    render();
  });
  mg.on("queue_update", (frame) => {
    view.queue = frame;
    render();
  });
  mg.on("match_proposed", () => act(() => mg.accept()));
  mg.on("matched", (frame) => {
    chatLine("system", "Matched: say hello");
    view.sessionId = frame.session_id;
    view.lastSessionId = frame.session_id;
    $("room-info").hidden = true;
    // After a replay the state may already be `matched`, with a new session.
    startMedia(mg);
    render();
  });
  mg.on("session_ended", (frame) => {
    chatLine("system", `The call ended (${frame.reason})`);
    $("room-info").hidden = true;
  });
  mg.on("chat", (frame) => {
    view.lastChat = frame.text;
    chatLine("peer", frame.text);
  });
  mg.on("error", (error) => {
    notice(`${error.code}: ${error.message}`);
    // A pasted token that may have been refused (browsers hide the handshake's status) is
    // forgotten, so that the next attempt asks for another one.
    if (error.code === "unauthorized" || error.code === "handshake_failed") {
      sessionStorage.removeItem("matchgate-demo-token");
    }
  });

  $("start").addEventListener("click", () => act(() => mg.enqueue(), () => notice("")));
  $("skip").addEventListener("click", () => act(() => mg.skip()));
  $("end").addEventListener("click", () => act(() => mg.end()));
  $("block").addEventListener("click", () =>
    act(
      () => mg.block(view.lastSessionId),
      () => notice("Blocked: you will not meet this user again"),
    ),
  );
  $("report").addEventListener("click", () =>
    act(
      () => mg.report($("report-reason").value, undefined, view.lastSessionId),
      () => notice("Reported: thank you"),
    ),
  );
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("chat-input");
    const text = input.value.trim();
    if (text === "") return;
    act(
      () => mg.chat(text),
      () => {
        chatLine("me", text);
        input.value = "";
      },
    );
  });

  // Leaving the page leaves the queue or the call at once, instead of holding the place for
  // the resume grace period while the stranger watches a frozen picture.
  addEventListener("pagehide", () => {
    if (["searching", "proposed", "in_call"].includes(view.state)) mg.end().catch(() => {});
  });

  view.localStream = await openCamera();
  if (view.localStream === null) {
    $("camera-state").textContent = "(no camera or microphone: you will only receive)";
  } else {
    $("local-video").srcObject = view.localStream;
  }
  act(() => mg.connect());
}

main();
