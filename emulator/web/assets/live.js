// The live view's page: plain JavaScript, no build step, nothing fetched from elsewhere.
// Server-Sent Events (/api/events) bring a snapshot, then connection updates, matrix rows and
// what-if results. Ladders arrive as SVG drawn by the server (the static report's renderer);
// every other text is set with textContent.
"use strict";
(function () {
  const token = new URLSearchParams(location.search).get("token");
  const MAX_CARDS = 40;
  const rows = {};          // row id -> <tr>
  const ladders = {};       // connection -> its live ladder (SVG); updates leave it out when unchanged
  let headings = {};

  function withToken(url) {
    return token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
  }
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function table(head, body) {
    const t = el("table");
    const tr = el("tr");
    head.forEach(h => tr.appendChild(el("th", {}, h)));
    t.appendChild(tr);
    body.forEach(r => {
      const row = el("tr");
      r.forEach(c => row.appendChild(el("td", {}, c)));
      t.appendChild(row);
    });
    return t;
  }

  // ------------------------------------------------------------------ the lab
  function renderLab(lab) {
    const box = document.getElementById("lab-body");
    box.textContent = "";
    const part = (title, node) => { const d = el("div"); d.appendChild(el("h3", {}, title)); d.appendChild(node); box.appendChild(d); };
    part("Users (" + lab.server.domain + ")", table(["user", "password", "enabled"],
      lab.users.map(u => [u.name, u.password, u.enabled ? "yes" : "no"])));
    part("Mailboxes", table(["DN", "owner", "grants"],
      lab.mailboxes.map(m => [m.dn, m.owner, m.grants.join(", ") || "-"])));
    const p = lab.policy;
    part("Policy", table(["setting", "value"], [
      ["min auth level", Object.entries(p.min_auth_level).map(([k, v]) => k + ": " + v).join(", ")],
      ["NTLMv1 allowed", p.ntlmv1_allowed ? "yes" : "no"], ["anonymous allowed", p.anonymous_allowed ? "yes" : "no"],
      ["encryption required", p.encryption_required ? "yes" : "no"], ["SMB signing required", p.smb_signing_required ? "yes" : "no"]]));
    part("Listeners", table(["listener", "address"], lab.listeners.map(l => [l.name, l.host + ":" + l.port])));
  }

  // ------------------------------------------------------------------ the matrix
  function renderMatrix(m) {
    headings = m.headings;
    const thead = document.querySelector("#matrix-table thead");
    const tbody = document.querySelector("#matrix-table tbody");
    thead.textContent = ""; tbody.textContent = "";
    const hr = el("tr");
    // The Run button and the verdict come first, so they stay in view on a narrow screen.
    ["row", "match"].concat(Object.values(headings)).forEach(h => hr.appendChild(el("th", {}, h)));
    thead.appendChild(hr);
    m.rows.forEach(r => {
      const tr = el("tr", {id: "row-" + r.id});
      const name = el("td", {title: r.title + " (" + r.cite + ")"});
      const b = el("button", {type: "button", id: "run-" + r.id}, "Run");
      b.addEventListener("click", () => runRow(r.id, b));
      name.appendChild(b);
      name.appendChild(document.createTextNode(" " + r.id));
      name.appendChild(el("small", {}, r.order + ", UNS " + r.uns + ", typed: " + r.typed));
      tr.appendChild(name);
      tr.appendChild(el("td", {"data-col": "match"}, ""));
      Object.keys(headings).forEach(c => tr.appendChild(el("td", {"data-col": c, title: "expected: " + (r.expected[c] || "-")}, "want " + (r.expected[c] || "-"))));
      tbody.appendChild(tr);
      rows[r.id] = tr;
    });
    (m.results || []).forEach(showRow);
  }
  function showRow(res) {
    const tr = rows[res.id];
    if (!tr) return;
    tr.classList.remove("running");
    Object.entries(res.cells).forEach(([c, cell]) => {
      const td = tr.querySelector('td[data-col="' + c + '"]');
      if (!td) return;
      td.textContent = cell.text;
      td.className = cell.ok === null ? "" : (cell.ok ? "ok" : "bad");
    });
    const m = tr.querySelector('td[data-col="match"]');
    m.textContent = res.ok ? "✓ as the KB says" : "✗ differs";
    m.className = res.ok ? "ok" : "bad";
    markMine(res.conns);
  }
  function markMine(conns) {
    document.querySelectorAll(".card.mine").forEach(c => c.classList.remove("mine"));
    (conns || []).forEach(id => { const c = document.getElementById("conn-" + id); if (c) c.classList.add("mine"); });
  }
  async function post(url, body) {
    const r = await fetch(withToken(url), {method: "POST", body: body, credentials: "same-origin"});
    const text = await r.text();
    if (!r.ok) throw new Error(text.trim() || ("HTTP " + r.status));
    return JSON.parse(text);
  }
  async function runRow(id, button) {
    button.disabled = true;
    rows[id].classList.add("running");
    try { showRow(await post("api/rows/" + encodeURIComponent(id) + "/run", new URLSearchParams())); }
    catch (e) { rows[id].querySelector('td[data-col="match"]').textContent = "error: " + e.message; rows[id].classList.remove("running"); }
    finally { button.disabled = false; }
  }

  // ------------------------------------------------------------------ what if
  function showWhatIf(res) {
    const box = document.getElementById("whatif-result");
    box.textContent = "";
    const c = res.client;
    box.appendChild(table(["", ""], [
      ["transports", c.tried.join(", ") || "none"], ["prompt", c.prompt_shown ? "shown" : "not shown"],
      ["on the wire", c.wire_user || "no credentials"], ["server acted as", c.acting_user || "nobody"],
      ["result", c.outcome + (c.status ? " (" + c.status + ")" : "")], ["dialog", c.dialog || "-"]]));
    markMine(res.conns);
  }
  document.getElementById("whatif-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const form = ev.target, err = document.getElementById("whatif-error"), button = document.getElementById("whatif-run");
    const data = new URLSearchParams(new FormData(form));
    if (!form.elements.use_network_security.checked) data.set("use_network_security", "off");
    err.textContent = ""; button.disabled = true;
    try { showWhatIf(await post("api/whatif", data)); }
    catch (e) { err.textContent = e.message; }
    finally { button.disabled = false; }
  });

  // ------------------------------------------------------------------ connections
  function upsertConn(c) {
    const list = document.getElementById("conn-list");
    const none = document.getElementById("no-conns");
    if (none) none.remove();
    let card = document.getElementById("conn-" + c.conn);
    if (card && Number(card.dataset.version) > c.version) return;
    if (!card) {
      card = el("article", {id: "conn-" + c.conn, class: "card"});
      list.insertBefore(card, list.firstChild);
      while (list.children.length > MAX_CARDS) { delete ladders[list.lastChild.id.slice(5)]; list.lastChild.remove(); }
    }
    card.dataset.version = c.version;
    card.textContent = "";
    const state = c.closed ? "closed (" + c.closed + ")" : "open";
    card.appendChild(el("h3", {}, c.conn + " · " + c.listener + " listener · from " + c.peer + " · " + state +
      (c.status ? " · " + c.status : "")));
    const kind = c.identity_source === "rpc_auth" ? "replaced" : (c.identity_source ? "inherited" : "");
    const words = el("p", {class: "words " + kind});
    if (kind) words.appendChild(el("strong", {}, (kind === "replaced" ? "⟳ replaced: " : "⇩ inherited: ")));
    words.appendChild(document.createTextNode(c.words));
    card.appendChild(words);
    const finals = c.final || [];
    if (finals.length) {
      finals.forEach(f => f.verdicts.forEach(v => card.appendChild(el("p", {class: "verdict"}, "Verdict: " + v))));
    } else if (c.closed && c.capture) {
      const more = el("button", {type: "button"}, "read the verdict from the capture");
      more.addEventListener("click", async () => {
        const r = await fetch(withToken("api/conns/" + encodeURIComponent(c.conn)), {credentials: "same-origin"});
        if (r.ok) { const m = await r.json(); m.version = Number(card.dataset.version); upsertConn(m); }
      });
      card.appendChild(more);
    }
    const live = el("div", {class: "ladder"});
    if (c.svg !== undefined) ladders[c.conn] = c.svg;
    live.innerHTML = ladders[c.conn] || "";   // drawn and escaped by the server
    card.appendChild(live);
    if (finals.length) {
      // The capture's ladders are fetched when opened: pushed to every page they would cost
      // the server far more than the verdict lines do.
      const d = el("details");
      d.appendChild(el("summary", {}, "ladders from the capture (Wireshark's frame numbers)"));
      d.addEventListener("toggle", async () => {
        if (!d.open || d.dataset.loaded) return;
        const r = await fetch(withToken("api/conns/" + encodeURIComponent(c.conn)), {credentials: "same-origin"});
        if (!r.ok) return;
        d.dataset.loaded = "1";
        (await r.json()).final.forEach(f => { d.appendChild(el("h4", {}, f.title || "")); const s = el("div"); s.innerHTML = f.svg || ""; d.appendChild(s); });
      });
      card.appendChild(d);
    }
    if (c.capture && c.closed) {
      const links = el("p", {class: "links"});
      links.appendChild(el("a", {href: withToken("conn/" + c.conn + "/pcap"), download: c.conn + ".pcap"}, "download pcap"));
      links.appendChild(el("a", {href: withToken("conn/" + c.conn + "/explain"), target: "_blank"}, "explain text"));
      card.appendChild(links);
    }
  }

  // ------------------------------------------------------------------ events
  function connect() {
    const status = document.getElementById("status");
    const source = new EventSource(withToken("api/events"));
    source.addEventListener("open", () => { status.textContent = "live"; });
    source.addEventListener("error", () => { status.textContent = "reconnecting…"; });
    source.addEventListener("snapshot", (e) => {
      const s = JSON.parse(e.data);
      renderLab(s.lab); renderMatrix(s.matrix);
      s.conns.forEach(upsertConn);
      status.textContent = "live";
    });
    source.addEventListener("conns", (e) => {
      const d = JSON.parse(e.data);
      d.conns.forEach(upsertConn);
      document.getElementById("skipped").textContent = d.latest
        ? "(busy: " + d.skipped + " connections changed in a quarter second, not drawn; newest " + d.latest.conn +
          " on " + d.latest.listener + ", " + d.latest.words + ")" : "";
    });
    source.addEventListener("row", (e) => showRow(JSON.parse(e.data)));
    source.addEventListener("whatif", (e) => showWhatIf(JSON.parse(e.data)));
  }
  connect();
})();
