// Calls to this server's API: the key from session storage, OpenAI error envelopes as values,
// and chat completions read as a server-sent event stream.

const KEY_NAME = "aligner.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_NAME) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// The server's error envelope ({error: {message, type, param, code}}), or one made up for a
// body that is not one (a proxy's page, a dropped connection).
async function errorOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error) return { status: response.status, ...body.error };
  } catch (_) { /* not JSON */ }
  return { status: response.status, message: `${response.status} ${response.statusText}: ${text.slice(0, 200)}` };
}

// GET or POST JSON: {ok: true, data} or {ok: false, error}; never throws.
export async function api(path, { method = "GET", body, text = false } = {}) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (exc) {
    return { ok: false, error: { status: 0, message: `cannot reach the server: ${exc.message}` } };
  }
  if (!response.ok) return { ok: false, error: await errorOf(response) };
  return { ok: true, data: text ? await response.text() : await response.json() };
}

// One SSE event's `data:` payloads, comments reported as keep-alives.
export function parseEvent(event, onChunk) {
  for (const line of event.split("\n")) {
    if (line.startsWith(":")) {
      onChunk({ keepAlive: true });
    } else if (line.startsWith("data: ")) {
      const data = line.slice(6);
      if (data === "[DONE]") return "done";
      const chunk = JSON.parse(data);
      if (chunk.error) return { error: chunk.error };
      onChunk(chunk);
    }
  }
  return null;
}

// POST a chat completion with stream: true; `onChunk` gets every parsed chunk as it arrives.
// Resolves to {} when the stream ends, or {error} (refused, or an error event mid-stream).
export async function streamChat(body, onChunk, signal) {
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
      signal,
    });
  } catch (exc) {
    return { error: { status: 0, message: `cannot reach the server: ${exc.message}` } };
  }
  if (!response.ok) return { error: await errorOf(response) };
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return {};
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const outcome = parseEvent(buffer.slice(0, cut), onChunk);
        buffer = buffer.slice(cut + 2);
        if (outcome === "done") return {};
        if (outcome) return outcome;
      }
    }
  } catch (exc) {
    return { error: { status: 0, message: `the stream broke off: ${exc.message}` } };
  }
}
