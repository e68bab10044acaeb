// The browser terminal: xterm.js attached to a sandbox's PTY session over
// the daemon's share WebSocket (docs/clients.md). The token comes from the
// URL fragment (#t=bhs_…), which the browser never sends to a server.
"use strict";
(function () {
  // The link's token (and session) are in the fragment. They leave the
  // address bar and history at once; this tab keeps them (sessionStorage)
  // so that reloading the page still works.
  const KEY = "bhatti-share";
  let params = new URLSearchParams(location.hash.slice(1));
  if (params.get("t")) {
    sessionStorage.setItem(KEY, params.toString());
    history.replaceState(null, "", location.pathname + location.search);
  } else {
    params = new URLSearchParams(sessionStorage.getItem(KEY) || "");
  }
  const token = params.get("t") || "";
  const session = params.get("session") || "web";

  const statusEl = document.getElementById("status");
  const actionEl = document.getElementById("action");
  const termEl = document.getElementById("terminal");
  const setStatus = (state, text) => {
    statusEl.dataset.state = state;
    statusEl.textContent = text;
    termEl.classList.toggle("disconnected", state !== "connected");
  };
  const offer = (label, fn) => {
    actionEl.textContent = label;
    actionEl.hidden = !label;
    actionEl.onclick = fn;
  };

  // xterm.js keeps its cell metrics and colours in <style> elements it
  // creates; the page's Content-Security-Policy admits those that carry
  // this page's nonce (it allows no other inline style).
  const nonce = document.querySelector('meta[name="csp-nonce"]').content;
  const createElement = Document.prototype.createElement;
  Document.prototype.createElement = function (tag, options) {
    const el = createElement.call(this, tag, options);
    if (String(tag).toLowerCase() === "style") el.nonce = nonce;
    return el;
  };

  const term = new Terminal({ cursorBlink: true, scrollback: 10000, convertEol: false });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(termEl);
  fit.fit();

  let readOnly = true;
  let ws = null;
  let retries = 0;
  let retryTimer = null;
  let stopped = false; // refused for good (bad or expired link)
  const encoder = new TextEncoder();

  function send(obj) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
  }

  term.onData((d) => {
    if (!readOnly && ws && ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(d));
  });
  term.onBinary((d) => {
    if (readOnly || !ws || ws.readyState !== WebSocket.OPEN) return;
    const b = new Uint8Array(d.length);
    for (let i = 0; i < d.length; i++) b[i] = d.charCodeAt(i) & 0xff;
    ws.send(b);
  });
  term.onResize(({ rows, cols }) => {
    if (!readOnly) send({ type: "resize", rows, cols });
  });
  window.addEventListener("resize", () => fit.fit());

  function refuse(text) {
    stopped = true;
    setStatus("failed", text);
    offer("", null);
    if (ws) ws.close();
  }

  function scheduleReconnect(why) {
    if (stopped || retryTimer) return;
    const delay = Math.min(500 * 2 ** retries, 10000);
    retries++;
    setStatus("reconnecting", `${why}; reconnecting in ${Math.round(delay / 100) / 10}s…`);
    // Attached elsewhere (`bhatti shell`, another page): taking it over is
    // the person's choice, never automatic.
    const steal = /client attached/.test(why);
    offer(steal ? "take over" : "reconnect now", () => {
      clearTimeout(retryTimer);
      retryTimer = null;
      connect(steal);
    });
    retryTimer = setTimeout(() => { retryTimer = null; connect(false); }, delay);
  }

  async function info() {
    const r = await fetch("info", { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
    if (r.status === 401) return null;
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    return r.json();
  }

  async function connect(steal) {
    offer("", null);
    let about;
    try {
      about = await info();
    } catch (e) {
      scheduleReconnect("cannot reach the daemon");
      return;
    }
    if (!about) {
      refuse("this link is invalid, expired or revoked");
      return;
    }
    readOnly = about.read_only;
    document.getElementById("mode").hidden = !readOnly;
    document.getElementById("title").textContent = about.sandbox;
    document.title = `${about.sandbox} · bhatti`;
    term.options.disableStdin = readOnly;

    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const sock = new WebSocket(url);
    ws = sock;
    sock.binaryType = "arraybuffer";
    let attached = false;
    let ended = null;
    sock.onopen = () => {
      sock.send(JSON.stringify({ token, session, steal, rows: term.rows, cols: term.cols }));
    };
    sock.onmessage = (ev) => {
      if (typeof ev.data !== "string") {
        term.write(new Uint8Array(ev.data));
        return;
      }
      let m;
      try { m = JSON.parse(ev.data); } catch (e) { return; }
      if (m.type === "attached") {
        attached = true;
        retries = 0;
        // The session's scrollback follows: start from a clean screen.
        term.reset();
        setStatus("connected", `session ${m.session}`);
        if (!readOnly) send({ type: "resize", rows: term.rows, cols: term.cols });
        term.focus();
      } else if (m.type === "exit") {
        ended = `the session ended (exit ${m.exit_code})`;
      } else if (m.type === "detached") {
        ended = `detached: ${m.reason}`;
      } else if (m.type === "error") {
        ended = `error: ${m.error}`;
      }
    };
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      if (ev.code === 4401) { refuse("this link is invalid, expired or revoked"); return; }
      if (attached && ended && !ended.startsWith("error")) {
        // Ended or taken over: not retried on its own.
        setStatus("ended", ended);
        offer(ended.startsWith("detached") ? "take over" : "new session", () => connect(true));
        return;
      }
      scheduleReconnect(ended || (attached ? "connection lost" : "cannot connect"));
    };
  }

  if (!token) {
    refuse("no share token in this link");
  } else {
    connect(false);
  }
})();
