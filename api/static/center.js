// herald's notification center: the inbox of the user whose token opened the page, live.
//
// Safety: every text from a notification goes into the page as text (textContent), never
// as HTML; a link is followed only when it is relative or https. The server sends a
// Content-Security-Policy without 'unsafe-inline', so this file is the only script.
//
// Auth: the bearer token arrives in the URL fragment (#token=…, never sent to a server),
// is kept in sessionStorage and removed from the address bar. The stream is opened with a
// short-lived stream token traded for it (POST /v1/stream/token): EventSource sends no headers.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    badge: $("badge"), conn: $("conn"), list: $("list"), empty: $("empty"), more: $("more"),
    readAll: $("read-all"), alerts: $("alerts"), message: $("message"),
  };
  const appUrl = (document.querySelector('meta[name="herald-app-url"]') || {}).content || "";
  const state = {
    token: null,
    items: new Map(), // id -> notification
    nodes: new Map(), // id -> <li>
    unread: 0,
    lastEventId: null,
    cursor: null,
    loaded: false,
    stream: null,
    retryMs: 1000,
  };

  // --- token --------------------------------------------------------------------------
  function takeToken() {
    const match = /(?:^|&)token=([^&]+)/.exec(location.hash.slice(1));
    if (match) {
      sessionStorage.setItem("herald.token", decodeURIComponent(match[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem("herald.token");
  }

  function say(text) {
    els.message.textContent = text;
    els.message.hidden = !text;
  }

  async function api(method, path, body) {
    const headers = { Authorization: "Bearer " + state.token };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store",
    });
    if (response.status === 401) {
      say("Your session has expired: open this page again with a fresh token.");
      throw new Error("unauthorized");
    }
    if (!response.ok) throw new Error(method + " " + path + ": " + response.status);
    return response.json();
  }

  // --- rendering (text only) -----------------------------------------------------------
  function safeHref(url) {
    if (typeof url !== "string" || !url) return null;
    if (url.startsWith("/") && !url.startsWith("//") && !url.startsWith("/\\")) {
      return appUrl ? appUrl.replace(/\/+$/, "") + url : url;
    }
    try {
      const parsed = new URL(url);
      return parsed.protocol === "https:" ? parsed.href : null;
    } catch (_) {
      return null;
    }
  }

  const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  function ago(iso) {
    const seconds = Math.round((Date.parse(iso) - Date.now()) / 1000);
    const steps = [[60, "second"], [60, "minute"], [24, "hour"], [7, "day"], [4.35, "week"], [12, "month"]];
    let value = seconds;
    for (const [size, unit] of steps) {
      if (Math.abs(value) < size) return relative.format(Math.trunc(value), unit);
      value /= size;
    }
    return relative.format(Math.trunc(value), "year");
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function render(n) {
    const li = el("li", "item");
    li.dataset.id = n.id;
    li.appendChild(el("span", "dot")).setAttribute("aria-hidden", "true");
    const content = li.appendChild(el("div", "content"));
    const href = safeHref(n.target_url);
    const title = content.appendChild(el(href ? "a" : "span", "title", n.title));
    if (href) {
      title.href = href;
      title.rel = "noopener noreferrer";
    }
    if (n.summary) content.appendChild(el("p", "summary", n.summary));
    const meta = content.appendChild(el("div", "meta"));
    if (n.severity && n.severity !== "info") meta.appendChild(el("span", "sev sev-" + n.severity, n.severity));
    const time = meta.appendChild(el("time", null, ago(n.created_at)));
    time.dateTime = n.created_at;
    time.title = new Date(n.created_at).toLocaleString();
    const mark = li.appendChild(el("button", "mark", "Mark read"));
    mark.type = "button";
    mark.setAttribute("aria-label", "Mark read: " + n.title);
    mark.addEventListener("click", () => markRead(n.id));
    return li;
  }

  function update(li, n) {
    const unread = !n.read_at;
    li.classList.toggle("unread", unread);
    li.querySelector(".mark").disabled = !unread;
  }

  const newer = (a, b) => (a.created_at === b.created_at ? a.id > b.id : a.created_at > b.created_at);

  // Insert or update one notification, keeping the list newest first; by id, so a
  // notification that comes twice (a resumed stream, the first page) shows once.
  function upsert(n, fresh) {
    if (n.archived_at) return remove(n.id);
    state.items.set(n.id, n);
    let li = state.nodes.get(n.id);
    if (!li) {
      li = render(n);
      state.nodes.set(n.id, li);
      let before = null;
      for (const node of els.list.children) {
        if (newer(n, state.items.get(node.dataset.id))) { before = node; break; }
      }
      els.list.insertBefore(li, before);
      if (fresh) li.classList.add("fresh");
    }
    update(li, n);
    els.empty.hidden = state.items.size > 0;
  }

  function remove(id) {
    const li = state.nodes.get(id);
    if (li) li.remove();
    state.nodes.delete(id);
    state.items.delete(id);
    els.empty.hidden = state.items.size > 0;
  }

  function setUnread(count) {
    state.unread = Math.max(0, count);
    els.badge.textContent = state.unread > 99 ? "99+" : String(state.unread);
    els.badge.dataset.count = String(state.unread);
    els.badge.setAttribute("aria-label", state.unread + " unread");
    document.title = state.unread ? "(" + state.unread + ") Notifications" : "Notifications";
    els.readAll.disabled = state.unread === 0;
  }

  function setConn(name, text) {
    els.conn.dataset.state = name;
    els.conn.textContent = text;
  }

  // --- actions: optimistic, then reconciled by the stream's counts -------------------------
  async function markRead(id) {
    const n = state.items.get(id);
    if (!n || n.read_at) return;
    const before = state.unread;
    upsert({ ...n, read_at: new Date().toISOString() });
    setUnread(state.unread - 1);
    try {
      const s = await api("POST", "/v1/notifications/" + encodeURIComponent(id) + "/read");
      upsert({ ...state.items.get(id), read_at: s.read_at });
    } catch (err) {
      upsert(n);
      setUnread(before);
      if (err.message !== "unauthorized") say("Could not mark it read; try again.");
    }
  }

  async function markAllRead() {
    const snapshot = new Map(state.items);
    const before = state.unread;
    let newest = null;
    for (const n of state.items.values()) if (!newest || n.created_at > newest) newest = n.created_at;
    const now = new Date().toISOString();
    for (const n of state.items.values()) if (!n.read_at) upsert({ ...n, read_at: now });
    setUnread(0);
    try {
      await api("POST", "/v1/notifications/read-all", newest ? { before: newest } : {});
    } catch (err) {
      for (const n of snapshot.values()) upsert(n);
      setUnread(before);
      if (err.message !== "unauthorized") say("Could not mark all read; try again.");
    }
  }

  async function loadPage() {
    const query = "?limit=30" + (state.cursor ? "&cursor=" + encodeURIComponent(state.cursor) : "");
    const page = await api("GET", "/v1/notifications" + query);
    for (const n of page.items) upsert(n, false);
    state.cursor = page.next_cursor;
    els.more.hidden = !state.cursor;
    els.empty.hidden = state.items.size > 0;
  }

  // Another tab or device read something: the server's count and the rows on screen
  // disagree, so fetch what is on screen again (debounced) and take the server's read_at.
  let reconciling = null;
  function reconcile(count) {
    if (!state.loaded) return;
    let local = 0;
    for (const n of state.items.values()) if (!n.read_at) local += 1;
    if (state.cursor ? local <= count : local === count) return;
    clearTimeout(reconciling);
    reconciling = setTimeout(async () => {
      const limit = Math.min(Math.max(state.items.size, 1), 100);
      try {
        const page = await api("GET", "/v1/notifications?limit=" + limit);
        for (const n of page.items) upsert(n, false);
      } catch (_) { /* the next count tries again */ }
    }, 150);
  }

  async function reload() {
    for (const id of [...state.items.keys()]) remove(id);
    state.cursor = null;
    await loadPage();
  }

  // --- desktop alerts: asked for only on click, shown only while the tab is hidden -----------
  function setupAlerts() {
    if (!("Notification" in window)) return;
    const show = () => {
      const p = Notification.permission;
      els.alerts.hidden = p === "granted";
      els.alerts.disabled = p === "denied";
      els.alerts.textContent = p === "denied" ? "Desktop alerts blocked" : "Enable desktop alerts";
    };
    show();
    els.alerts.addEventListener("click", async () => {
      await Notification.requestPermission();
      show();
    });
  }

  function alertDesktop(n) {
    if (!document.hidden || !("Notification" in window) || Notification.permission !== "granted") return;
    const note = new Notification(n.title, { body: n.summary || "", tag: n.id });
    note.onclick = () => {
      window.focus();
      note.close();
    };
  }

  // --- the stream --------------------------------------------------------------------------
  async function connect() {
    setConn("connecting", state.loaded ? "reconnecting…" : "connecting…");
    let url;
    try {
      const { token } = await api("POST", "/v1/stream/token");
      url = "/v1/stream?token=" + encodeURIComponent(token);
      if (state.lastEventId) url += "&last_event_id=" + encodeURIComponent(state.lastEventId);
    } catch (err) {
      if (err.message === "unauthorized") return setConn("closed", "signed out");
      return retryLater();
    }
    const es = new EventSource(url);
    state.stream = es;
    es.addEventListener("notification", (e) => {
      const n = JSON.parse(e.data);
      const known = state.items.has(n.id);
      upsert(n, true);
      if (!known && state.loaded && !n.read_at) alertDesktop(n);
    });
    es.addEventListener("reset", () => { reload().catch(() => {}); });
    es.addEventListener("unread", async (e) => {
      state.lastEventId = e.lastEventId;
      const count = JSON.parse(e.data).count;
      setUnread(count);
      reconcile(count);
      state.retryMs = 1000;
      setConn("live", "live");
      if (!state.loaded) {
        state.loaded = true; // after the stream's first position: nothing falls between the two
        try { await loadPage(); } catch (_) { state.loaded = false; }
      }
    });
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED) {
        // Refused (an expired stream token, a restart): trade for a new one and resume.
        es.close();
        retryLater();
      } else {
        setConn("reconnecting", "reconnecting…");
      }
    };
  }

  function retryLater() {
    setConn("reconnecting", "reconnecting…");
    setTimeout(connect, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, 30000);
  }

  function start() {
    state.token = takeToken();
    setUnread(0);
    els.readAll.addEventListener("click", markAllRead);
    els.more.addEventListener("click", () => loadPage().catch(() => say("Could not load more.")));
    setupAlerts();
    if (!state.token) {
      setConn("closed", "signed out");
      say("Open this page with #token=<your bearer token> at the end of the address (herald token USER).");
      return;
    }
    setInterval(() => {
      for (const [id, li] of state.nodes) li.querySelector("time").textContent = ago(state.items.get(id).created_at);
    }, 30000);
    connect();
  }

  start();
})();
