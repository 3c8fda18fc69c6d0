// The smallgpt page: talks to the same OpenAI-shaped API as any client, streaming with fetch.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];
let history = []; // chat messages: {role, content}
let running = null; // AbortController of the request in flight
const MAX_TOKENS = 200; // the slider's default; a completion longer than the context slides the window

const sliders = ["temperature", "top-k", "top-p", "max-tokens"];
for (const id of sliders) {
  const show = () => { $(`${id}-value`).textContent = $(id).value; };
  $(id).addEventListener("input", show);
  show();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value || localStorage.getItem("smallgpt-key");
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function showWarnings(warnings) {
  $("warning").textContent = warnings.join(" ");
  $("warning").hidden = !warnings.length;
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("key-box").hidden = false;
    showError("This server needs an API key: type it above.");
    return;
  }
  models = (await response.json()).data;
  $("model").replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  showError("");
  selectModel();
}

function current() {
  return models.find((m) => m.id === $("model").value);
}

function selectModel() {
  const model = current();
  if (!model) return;
  // a chat's prompt and reply share the context: a reply of half of it leaves the other half to the turns
  const preferred = model.chat ? Math.floor(model.block_size / 2) : MAX_TOKENS;
  $("max-tokens").max = model.max_tokens;
  $("max-tokens").value = Math.min(preferred, model.max_tokens);
  $("max-tokens").dispatchEvent(new Event("input"));
  $("kind").textContent = model.chat ? "chat model" : "language model";
  $("chat-view").hidden = !model.chat;
  $("complete-view").hidden = model.chat;
}

function settings() {
  const topK = +$("top-k").value;
  return {
    model: $("model").value,
    temperature: +$("temperature").value,
    top_p: +$("top-p").value,
    max_tokens: +$("max-tokens").value,
    ...(topK > 0 ? { top_k: topK } : {}),
    stream: true,
    stream_options: { include_usage: true },
  };
}

// POST a streamed request; onText gets each piece of text, the response's warnings are shown.
// Resolves to {tokens, seconds, failed}: failed when the server refused it or it broke (not Stop).
async function stream(path, body, onText) {
  running = new AbortController();
  setBusy(true);
  showError("");
  showWarnings([]);
  const start = performance.now();
  let tokens = 0;
  let failed = false;
  try {
    const response = await fetch(path, {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: running.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error(error.error ? error.error.message : `HTTP ${response.status}`);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        if (chunk.warnings) showWarnings(chunk.warnings);
        for (const choice of chunk.choices) {
          const text = choice.text ?? (choice.delta && choice.delta.content);
          if (text) onText(text);
        }
      }
    }
  } catch (e) {
    failed = e.name !== "AbortError";
    if (failed) showError(e.message);
  } finally {
    running = null;
    setBusy(false);
  }
  return { tokens, seconds: (performance.now() - start) / 1000, failed };
}

function setBusy(busy) {
  for (const id of ["generate", "send"]) $(id).disabled = busy;
  for (const id of ["stop", "chat-stop"]) $(id).disabled = !busy;
}

function rate({ tokens, seconds }) {
  return tokens ? `${tokens} tokens in ${seconds.toFixed(2)} s · ${(tokens / seconds).toFixed(1)} tokens/s` : "";
}

async function generate() {
  const output = $("output");
  const prompt = document.createElement("span");
  prompt.className = "prompt";
  prompt.textContent = $("prompt").value;
  const text = document.createTextNode("");
  output.replaceChildren(prompt, text);
  $("stats").textContent = "";
  const result = await stream("/v1/completions", { ...settings(), prompt: $("prompt").value }, (piece) => {
    text.appendData(piece);
  });
  $("stats").textContent = rate(result);
}

function addTurn(role, content) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  div.textContent = content;
  $("history").append(div);
  $("history").scrollTop = $("history").scrollHeight;
  return div;
}

async function send(event) {
  event.preventDefault();
  const content = $("message").value.trim();
  if (!content || running) return;
  $("message").value = "";
  const message = { role: "user", content };
  const asked = addTurn("user", content);
  const reply = addTurn("assistant", "");
  let answer = "";
  const result = await stream("/v1/chat/completions", { ...settings(), messages: [...history, message] }, (piece) => {
    answer += piece;
    reply.textContent = answer;
    $("history").scrollTop = $("history").scrollHeight;
  });
  if (result.failed) {
    // refused (e.g. too long for the context): the conversation stays as it was, the message back in the box
    asked.remove();
    reply.remove();
    $("message").value = content;
    return;
  }
  history.push(message, { role: "assistant", content: answer });
  $("chat-stats").textContent = rate(result);
}

function reset() {
  if (running) running.abort();
  history = [];
  $("history").replaceChildren();
  $("chat-stats").textContent = "";
}

$("model").addEventListener("change", selectModel);
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => running && running.abort());
$("chat-stop").addEventListener("click", () => running && running.abort());
$("chat-form").addEventListener("submit", send);
$("reset").addEventListener("click", reset);
$("key").addEventListener("change", () => { localStorage.setItem("smallgpt-key", $("key").value); loadModels(); });
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
setBusy(false);
loadModels();
