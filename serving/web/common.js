// What both pages share: calling the server (with the API key, if one is set) and saying what went wrong.
// No framework and no build step: plain scripts, loaded with `defer`, that share the `Serving` object.
"use strict";

const Serving = (() => {
  const KEY = "serving.key";
  let memory = ""; // the key, when sessionStorage is refused (some private windows)

  /** The API key this tab holds ("" when none), kept in sessionStorage: gone when the tab closes. */
  function key() {
    try { return sessionStorage.getItem(KEY) || ""; } catch { return ""; }
  }

  function setKey(value) {
    try {
      if (value) sessionStorage.setItem(KEY, value); else sessionStorage.removeItem(KEY);
    } catch { /* storage refused (a private window): the key lasts until the page reloads */ }
    memory = value;
  }

  /** An answer that was not 2xx: its status, the server's own words and the wait it asked for. */
  class HttpError extends Error {
    constructor(status, detail, retryAfter, requestId) {
      super(detail);
      this.status = status;
      this.detail = detail;
      this.retryAfter = retryAfter;
      this.requestId = requestId;
    }
  }

  function retryAfter(response) {
    const seconds = Number(response.headers.get("Retry-After"));
    return Number.isFinite(seconds) && seconds > 0 ? Math.min(seconds, 30) : 1;
  }

  /** fetch() on this origin with the key; resolves to {data, text, requestId}, rejects with an HttpError. */
  async function call(path, { method = "GET", body = undefined, type = undefined, requestId = undefined,
                              signal = undefined } = {}) {
    const headers = {};
    if (type) headers["Content-Type"] = type;
    const token = key() || memory;
    if (token) headers.Authorization = "Bearer " + token;
    if (requestId) headers["X-Request-ID"] = requestId;
    let response;
    try {
      response = await fetch(path, { method, body, headers, signal, cache: "no-store", credentials: "omit" });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new HttpError(0, "the server cannot be reached", 2, null);
    }
    const text = await response.text();
    let data = null;
    try { data = JSON.parse(text); } catch { /* not JSON: Prometheus text, or a proxy's error page */ }
    const id = response.headers.get("X-Request-ID");
    if (!response.ok) {
      const detail = data && typeof data.error === "string" ? data.error
        : (text.trim().slice(0, 200) || response.statusText || "no detail");
      throw new HttpError(response.status, detail, retryAfter(response), id);
    }
    return { data, text, requestId: id };
  }

  /** One sentence a person can act on, for any failure (never a stack trace, never "[object Object]"). */
  function explain(error) {
    if (!(error instanceof HttpError)) return "Something went wrong in this page: " + String(error && error.message);
    const detail = error.detail.replace(/\.$/, "");
    switch (error.status) {
      case 0: return "The server cannot be reached. Is it running?";
      case 400: return `The server could not read that: ${detail}.`;
      case 401: return "This server needs an API key. Enter it below: it is kept in this browser tab only.";
      case 403: return `This key may not do that: ${detail}.`;
      case 404: return `Not found: ${detail}.`;
      case 413: return `That is too large for this server: ${detail}.`;
      case 415: return `The server does not take that kind of file: ${detail}.`;
      case 421: return `This server does not answer for this address: ${detail}.`;
      case 422: return `The server could not use that input: ${detail}.`;
      case 503: return `The server is busy, retrying in ${error.retryAfter} s.`;
      case 504: return `The model did not answer in time: ${detail}.`;
      default:
        return `The server failed (${error.status})` + (error.requestId ? `; its log has request ${error.requestId}.` : ".");
    }
  }

  /** Wire the key form: shown when the server asks for a key, stored on submit, forgotten on request. */
  function keyPanel(onChange) {
    const panel = document.getElementById("key-panel");
    const form = document.getElementById("key-form");
    const input = document.getElementById("key");
    const forget = document.getElementById("forget-key");
    if (key()) panel.hidden = false;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      setKey(input.value.trim());
      input.value = "";
      onChange();
    });
    forget.addEventListener("click", () => {
      setKey("");
      input.value = "";
      onChange();
    });
    return {
      ask() {
        panel.hidden = false;
        input.focus();
      },
    };
  }

  /** A request id of the page's making, so the two calls of one prediction share it in the server's log. */
  function newRequestId() {
    const bytes = new Uint8Array(8);
    crypto.getRandomValues(bytes);
    return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  return { HttpError, call, explain, key, setKey, keyPanel, newRequestId, sleep };
})();
