// Talking to the stepwell API: the bearer token, JSON calls, and live events.
//
// Every call sends `Authorization: Bearer <token>` when the tab has a token.
// Live run events are a server-sent event stream; EventSource cannot send that
// header, so the stream is read with fetch() and parsed here.

const TOKEN_KEY = "stepwell.token";

/** An error answer of the API: `{"error": {"code", "message", "details"}}`. */
export class ApiError extends Error {
  constructor(status, code, message, details = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

// -- the token ---------------------------------------------------------------

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token.trim());
}

export function clearToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

/**
 * Take a token from the address' fragment (`/ui/#token=...`; a fragment is
 * never sent to the server) and drop it from the address bar and history.
 */
export function takeTokenFromFragment() {
  const match = location.hash.match(/^#token=([^&/]+)/);
  if (!match) return false;
  let token = match[1];
  try {
    token = decodeURIComponent(token);
  } catch {
    // malformed (`%E0`): used as written; the server says whether it is the token
  }
  setToken(token);
  history.replaceState(null, "", location.pathname + location.search + "#/graph");
  return true;
}

let unauthorized = () => {};

/** Call `handler(error)` whenever the server answers 401 (to ask for a token). */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

function headers(extra = {}) {
  const all = { Accept: "application/json", ...extra };
  const token = getToken();
  if (token) all.Authorization = `Bearer ${token}`;
  return all;
}

// -- calls -------------------------------------------------------------------

/** The ApiError of a failed response (the API's JSON body, or the bare status). */
async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: described by its status below
  }
  const error = body && body.error;
  const failed = error && typeof error.message === "string"
    ? new ApiError(response.status, error.code, error.message, error.details)
    : new ApiError(response.status, `http_${response.status}`,
      `the server answered ${response.status} ${response.statusText}`.trim());
  if (response.status === 401) unauthorized(failed);
  return failed;
}

async function send(path, init) {
  try {
    return await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network", `cannot reach the server (${err.message})`);
  }
}

/**
 * Call the API and return its JSON answer; throws ApiError on an error answer.
 * `body` (any JSON value) is sent as JSON.
 */
export async function api(path, { method = "GET", body, headers: extra, signal } = {}) {
  const init = { method, headers: headers(extra), signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await send(path, init);
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

/** Build `path?k=v&...` from the defined values of `params`. */
export function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null) query.set(key, String(value));
  }
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

/** A path segment for a name from the API (step, table, run, rule). */
export const seg = (name) => encodeURIComponent(name);

// -- server-sent events ------------------------------------------------------

/** One event block (`event:`, `id:`, `data:` lines) as {event, id, data}. */
function parseEvent(block) {
  let event = "message";
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // blank or a keep-alive comment
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "id") id = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  return { event, id, data: JSON.parse(data.join("\n")) };
}

/**
 * Follow a server-sent event stream, calling `onEvent({event, id, data})` for
 * each event. Resolves when the server ends the stream; `signal` stops it.
 */
export async function followEvents(path, onEvent, signal) {
  const response = await send(path, { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (event) onEvent(event);
    }
  }
}
