// nanoseek web chat: streams /v1/chat/completions (SSE), shows reasoning_content in a collapsible panel,
// keeps conversations in page memory. Model text is rendered SAFELY: it is HTML-escaped first, and the
// small Markdown subset below only ever wraps escaped text in tags we create ourselves.
// Max tokens is capped by what the context leaves: /v1/models gives the context length (max_model_len),
// and before each request POST /tokenize counts the conversation's prompt tokens. A failed request shows
// its error in the reply's own bubble. Below 720 px the sidebar is a drawer behind the menu button.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { conversations: [], current: null, model: null, context: null, controller: null };

// ---------------------------------------------------------------- safe Markdown
function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
          .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function inline(escaped) {
  // Input is already escaped: these patterns can only add our own tags around escaped text.
  return escaped
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
    .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g,
             '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
}

function renderMarkdown(text) {
  const parts = text.split(/```/);
  let html = "";
  parts.forEach((part, i) => {
    if (i % 2 === 1) {  // inside a fenced block (an unclosed fence while streaming is still code)
      const nl = part.indexOf("\n");
      const lang = nl >= 0 ? part.slice(0, nl).trim() : "";
      const code = nl >= 0 ? part.slice(nl + 1) : part;
      const cls = /^[\w+-]+$/.test(lang) ? ` class="language-${lang}"` : "";
      html += `<pre><code${cls}>${escapeHtml(code)}</code></pre>`;
      return;
    }
    let list = null;
    const close = () => { if (list) { html += `</${list}>`; list = null; } };
    for (const line of part.split("\n")) {
      const esc = escapeHtml(line);
      let m;
      if ((m = /^(#{1,6})\s+(.*)$/.exec(esc))) {
        close(); html += `<h${m[1].length}>${inline(m[2])}</h${m[1].length}>`;
      } else if ((m = /^\s*[-*]\s+(.*)$/.exec(esc))) {
        if (list !== "ul") { close(); html += "<ul>"; list = "ul"; }
        html += `<li>${inline(m[1])}</li>`;
      } else if ((m = /^\s*\d+\.\s+(.*)$/.exec(esc))) {
        if (list !== "ol") { close(); html += "<ol>"; list = "ol"; }
        html += `<li>${inline(m[1])}</li>`;
      } else if (esc.trim() === "") {
        close();
      } else {
        close(); html += `<p>${inline(esc)}</p>`;
      }
    }
    close();
  });
  return html;
}

// ---------------------------------------------------------------- conversations
function newConversation() {
  const conv = { id: Date.now() + Math.random(), title: "New chat", messages: [] };
  state.conversations.unshift(conv);
  state.current = conv;
  renderAll();
  $("input").focus();
}

function renderHistory() {
  const nav = $("history");
  nav.replaceChildren();
  for (const conv of state.conversations) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = conv.title;  // textContent: titles come from user text
    if (conv === state.current) b.classList.add("active");
    b.addEventListener("click", () => { if (!state.controller) { state.current = conv; renderAll(); } });
    nav.appendChild(b);
  }
}

function messageView(msg) {
  const div = document.createElement("div");
  div.className = `msg ${msg.role}`;
  if (msg.role === "user") { div.textContent = msg.content; return div; }
  const details = document.createElement("details");
  details.className = "thinking";
  const summary = document.createElement("summary");
  const thinking = document.createElement("div");
  thinking.className = "thinking-text";
  details.append(summary, thinking);
  const answer = document.createElement("div");
  answer.className = "answer";
  const error = document.createElement("div");
  error.className = "error";
  div.append(details, answer, error);
  msg.view = { div, details, summary, thinking, answer, error };
  updateAssistant(msg);
  return div;
}

function updateAssistant(msg) {
  const v = msg.view;
  v.details.hidden = !msg.reasoning;
  v.summary.textContent = msg.done || msg.content ? "Thinking" : "Thinking…";
  v.thinking.textContent = msg.reasoning || "";
  let text = msg.content || "";
  if (msg.done && !text && !msg.error) text = msg.stopped ? "*(stopped)*" : "*(the model's reply is empty)*";
  v.answer.innerHTML = renderMarkdown(text);  // escaped inside renderMarkdown
  v.error.hidden = !msg.error;
  v.error.textContent = msg.error ? `Error: ${msg.error}` : "";  // textContent: server text is never HTML
  v.div.classList.toggle("failed", Boolean(msg.error));
}

function renderAll() {
  renderHistory();
  const box = $("messages");
  box.replaceChildren(...(state.current ? state.current.messages.map(messageView) : []));
  box.scrollTop = box.scrollHeight;
}

// ---------------------------------------------------------------- talking to the server
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const j = await r.json();
    if (r.ok && j.data && j.data.length) {
      state.model = j.data[0].id;
      state.context = j.data[0].max_model_len || null;
      $("model-name").textContent = `model: ${state.model}` + (state.context ? ` (context ${state.context} tokens)` : "");
      if (state.context) {
        const box = $("max-tokens");
        box.max = String(state.context);
        if (parseInt(box.value, 10) > state.context) box.value = String(state.context);
        $("max-tokens-note").textContent = `Each reply gets at most what the ${state.context}-token context leaves.`;
      }
    }
  } catch (e) { /* the send path reports errors */ }
}

async function errorMessage(r) {
  let message = `HTTP ${r.status}`;
  try { message += `: ${(await r.json()).error.message}`; } catch (e) { /* not JSON */ }
  return message;
}

// The max_tokens to ask for: the user's setting, capped by the room the conversation leaves in the
// context (POST /tokenize counts its prompt tokens as the chat completion will).
async function tokenLimit(history) {
  const wanted = Math.max(1, parseInt($("max-tokens").value, 10) || 1);
  const r = await fetch("/tokenize", { method: "POST", headers: headers(),
                                       body: JSON.stringify({ model: state.model, messages: history }) });
  if (!r.ok) throw new Error(await errorMessage(r));
  const j = await r.json();
  if (j.room < 1) {
    throw new Error(`this conversation fills the model's context (${j.count} of ${j.max_model_len} tokens): ` +
                    "start a new chat");
  }
  return Math.min(wanted, j.room);
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function send(text) {
  if (!state.current) newConversation();
  const conv = state.current;
  if (conv.messages.length === 0) conv.title = text.slice(0, 40);
  conv.messages.push({ role: "user", content: text });
  const reply = { role: "assistant", content: "", reasoning: "", done: false, error: null, stopped: false };
  const history = conv.messages.filter((m) => (m.role === "user" || m.role === "assistant") && !m.error)
                               .map((m) => ({ role: m.role, content: m.content }));
  conv.messages.push(reply);
  renderAll();
  reply.view.details.open = true;
  state.controller = new AbortController();
  $("send").hidden = true; $("stop").hidden = false;  // before any await: one request at a time
  try {
    if (!state.model) await loadModel();  // the first load may have lacked the API key
    const body = {
      model: state.model || "nanoseek", messages: history, stream: true,
      temperature: parseFloat($("temperature").value), max_tokens: await tokenLimit(history),
    };
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!r.ok) throw new Error(await errorMessage(r));
    for await (const data of sseEvents(r)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
      for (const c of chunk.choices || []) {
        const d = c.delta || {};
        if (d.reasoning_content) reply.reasoning += d.reasoning_content;
        if (d.content) {
          if (!reply.content && reply.view) reply.view.details.open = false;  // fold the thinking away
          reply.content += d.content;
        }
      }
      updateAssistant(reply);
      $("messages").scrollTop = $("messages").scrollHeight;
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else reply.error = String(e.message || e);  // shown in this reply's bubble
  } finally {
    reply.done = true;
    state.controller = null;
    $("send").hidden = false; $("stop").hidden = true;
    if (conv === state.current) renderAll();
    if (reply.view) reply.view.details.open = !reply.content && !reply.error;
  }
}

function setSidebar(open) {
  document.body.classList.toggle("sidebar-open", open);
  $("menu").setAttribute("aria-expanded", String(open));
  $("scrim").hidden = !open;
}

// ---------------------------------------------------------------- wiring
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", () => { if (!state.controller) { newConversation(); setSidebar(false); } });
$("menu").addEventListener("click", () => setSidebar(!document.body.classList.contains("sidebar-open")));
$("scrim").addEventListener("click", () => setSidebar(false));
$("history").addEventListener("click", () => setSidebar(false));
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
newConversation();
loadModel();
