// The front page: draw or drop a digit, and see what the chosen model makes of it. A model whose input is a
// feature vector (iris, say) gets a form of its features instead of the pad, filled with its stored sample; each
// change sends the row to the same v2 infer endpoint as an FP32 tensor.
//
// The page sends pictures, never pixels of its own making: a drawing goes as a PNG of the pad, an upload as
// the file itself, to POST /models/{name}/versions/{v}/input, which frames it exactly as the server frames
// every upload and answers the model's input as a v2 UINT8 tensor. That tensor goes to the v2 infer endpoint
// of the chosen model. At most one prediction is in flight; changes while it runs are sent when it ends, and
// an answer for a drawing that was cleared, replaced or sent to another model is dropped.
"use strict";

(() => {
  const SIZE = 280; // the pad's pixels; strokes are drawn in these units whatever its size on screen
  const STROKE = 22; // about MNIST's stroke once a digit is framed into 20 of 28 pixels
  const KEY_STEP = 10, KEY_FINE = 2;
  const FIRST_DELAY_MS = 80; // debounce: a burst of pointer moves becomes one request
  const MAX_RETRIES = 20;

  const $ = (id) => document.getElementById(id);
  const pad = $("pad"), ink = pad.getContext("2d");
  const seen = $("seen"), select = $("model");
  const state = {
    strokes: [], // each an array of [x, y] in pad pixels
    drawing: null, // the stroke under the pointer or the keyboard pen
    upload: null, // {blob, type} while the pad shows an uploaded picture
    fields: [], // a feature model's number inputs, in the order of its features
    models: [],
    model: null,
    generation: 0, // bumped whenever the thing to classify changes wholesale: answers of older ones are stale
    dirty: false,
    inFlight: false,
    timer: 0,
    shown: 0, // sequence number of the answer on screen
    sequence: 0,
    pen: { x: SIZE / 2, y: SIZE / 2, down: false },
  };
  const keys = Serving.keyPanel(() => loadModels());

  // -- drawing ---------------------------------------------------------------------------------------
  function paint() {
    ink.fillStyle = "#000";
    ink.fillRect(0, 0, SIZE, SIZE);
    if (state.upload && state.upload.bitmap) {
      const { bitmap } = state.upload;
      const scale = Math.min(SIZE / bitmap.width, SIZE / bitmap.height);
      const w = bitmap.width * scale, h = bitmap.height * scale;
      ink.drawImage(bitmap, (SIZE - w) / 2, (SIZE - h) / 2, w, h);
    }
    ink.strokeStyle = ink.fillStyle = "#fff";
    ink.lineWidth = STROKE;
    ink.lineCap = ink.lineJoin = "round";
    for (const stroke of state.drawing ? [...state.strokes, state.drawing] : state.strokes) {
      if (stroke.length === 1) {
        ink.beginPath();
        ink.arc(stroke[0][0], stroke[0][1], STROKE / 2, 0, 2 * Math.PI);
        ink.fill();
        continue;
      }
      ink.beginPath();
      ink.moveTo(...stroke[0]);
      for (const point of stroke.slice(1)) ink.lineTo(...point);
      ink.stroke();
    }
  }

  function isEmpty() {
    if (takesFeatures()) return featureValues() === null;
    return !state.upload && state.strokes.length === 0 && !state.drawing;
  }

  function takesFeatures(model = state.model) {
    return Boolean(model && model.input.kind === "features");
  }

  // -- a feature model's form --------------------------------------------------------------------------
  /** The row the form holds, as numbers; null while a field is empty or not a number. */
  function featureValues() {
    const values = state.fields.map((field) => (field.value.trim() === "" ? NaN : Number(field.value)));
    state.fields.forEach((field, i) => field.setAttribute("aria-invalid", String(!Number.isFinite(values[i]))));
    return values.length && values.every(Number.isFinite) ? values : null;
  }

  function buildFeatureForm(model) {
    const example = model.input.example || [];
    state.fields = [];
    $("feature-fields").replaceChildren(...model.input.features.map((feature, i) => {
      const box = document.createElement("div");
      box.className = "field";
      const id = `feature-${i}`;
      const label = document.createElement("label");
      label.htmlFor = id;
      label.textContent = feature.name;
      const input = document.createElement("input");
      input.id = id;
      input.type = "text";
      input.inputMode = "decimal";
      input.autocomplete = "off";
      input.spellcheck = false;
      input.value = example[i] === undefined ? "" : String(Number(example[i].toPrecision(7)));
      input.addEventListener("input", () => { state.generation++; changed(); });
      box.append(label, input);
      if (feature.range) {
        const hint = document.createElement("p");
        hint.className = "hint";
        hint.id = `${id}-range`;
        hint.textContent = `${feature.range[0]} to ${feature.range[1]} in training`;
        input.setAttribute("aria-describedby", hint.id);
        box.append(hint);
      }
      state.fields.push(input);
      return box;
    }));
  }

  $("reset-features").addEventListener("click", () => {
    if (!takesFeatures()) return;
    buildFeatureForm(state.model);
    state.generation++;
    changed(0);
  });
  $("features").addEventListener("submit", (event) => event.preventDefault());

  function startStroke(point) {
    if (state.upload) { // drawing after an upload starts a new digit
      state.upload = null;
      state.generation++;
    }
    state.drawing = [point];
    paint();
    changed();
  }

  function extendStroke(point) {
    if (!state.drawing) return;
    state.drawing.push(point);
    paint();
    changed();
  }

  function endStroke() {
    if (!state.drawing) return;
    state.strokes.push(state.drawing);
    state.drawing = null;
    paint();
    changed();
  }

  function padPoint(event) {
    const rect = pad.getBoundingClientRect();
    return [(event.clientX - rect.left) * SIZE / rect.width, (event.clientY - rect.top) * SIZE / rect.height];
  }

  pad.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    pad.setPointerCapture(event.pointerId);
    startStroke(padPoint(event));
  });
  pad.addEventListener("pointermove", (event) => {
    if (!state.drawing || !pad.hasPointerCapture(event.pointerId)) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const each of events.length ? events : [event]) state.drawing.push(padPoint(each));
    paint();
    changed();
  });
  for (const type of ["pointerup", "pointercancel"]) pad.addEventListener(type, () => endStroke());

  // The keyboard pen: arrows move it, Space puts it down or lifts it, Backspace undoes.
  const penMark = $("pen");
  function showPen() {
    const rect = pad.getBoundingClientRect();
    penMark.hidden = false;
    penMark.classList.toggle("down", state.pen.down);
    penMark.style.left = `${pad.offsetLeft + state.pen.x * rect.width / SIZE}px`;
    penMark.style.top = `${pad.offsetTop + state.pen.y * rect.height / SIZE}px`;
  }
  pad.addEventListener("focus", () => { if (pad.matches(":focus-visible")) showPen(); });
  pad.addEventListener("blur", () => {
    if (state.pen.down) { state.pen.down = false; endStroke(); }
    penMark.hidden = true;
  });
  pad.addEventListener("keydown", (event) => {
    const step = event.shiftKey ? KEY_FINE : KEY_STEP;
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    const pen = state.pen;
    if (event.key in moves) {
      const [dx, dy] = moves[event.key];
      pen.x = Math.min(SIZE, Math.max(0, pen.x + dx));
      pen.y = Math.min(SIZE, Math.max(0, pen.y + dy));
      if (pen.down) extendStroke([pen.x, pen.y]);
    } else if (event.key === " ") {
      pen.down = !pen.down;
      if (pen.down) startStroke([pen.x, pen.y]); else endStroke();
    } else if (event.key === "Backspace") {
      undo();
    } else {
      return;
    }
    event.preventDefault();
    showPen();
  });

  function undo() {
    if (state.upload) {
      state.upload = null;
    } else {
      state.strokes.pop();
    }
    state.generation++;
    paint();
    changed();
  }

  function clear() {
    state.strokes = [];
    state.drawing = null;
    state.upload = null;
    state.generation++;
    paint();
    changed();
  }

  $("undo").addEventListener("click", undo);
  $("clear").addEventListener("click", clear);
  $("save").addEventListener("click", () => {
    const blob = padPng();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "digit.png";
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  });

  // toDataURL, not toBlob: Chromium encodes toBlob in idle time and waited up to a second for it while keys
  // were being pressed; a 280x280 PNG takes well under a millisecond to encode here.
  function padPng() {
    const bytes = atob(pad.toDataURL("image/png").split(",")[1]);
    return new Blob([Uint8Array.from(bytes, (c) => c.charCodeAt(0))], { type: "image/png" });
  }

  // -- uploads -----------------------------------------------------------------------------------------
  const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp", "image/tiff"];

  async function useFile(file) {
    if (!file) return;
    if (takesFeatures()) {
      setMessage(`${state.model.name} takes ${state.model.input.shape[0]} numbers, not a picture: fill in the form.`,
                 "error");
      return;
    }
    let bitmap = null;
    try { bitmap = await createImageBitmap(file); } catch { /* not a picture this browser shows: the server says why */ }
    state.strokes = [];
    state.drawing = null;
    // Sent as it came: the server decides what it can read. A file of another type goes as bytes of unknown type.
    state.upload = { blob: file, type: IMAGE_TYPES.includes(file.type) ? file.type : "application/octet-stream", bitmap };
    state.generation++;
    paint();
    changed(0);
  }

  $("file").addEventListener("change", (event) => {
    useFile(event.target.files[0]);
    event.target.value = ""; // the same file picked again is a new upload
  });
  const dropHint = $("drop-hint");
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    dropHint.hidden = false;
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) dropHint.hidden = true;
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dropHint.hidden = true;
    useFile(event.dataTransfer.files[0]);
  });

  // -- models ----------------------------------------------------------------------------------------
  function describe(model) {
    const parts = [`${model.framework}`, `version ${model.version}`];
    if (typeof model.accuracy === "number") {
      const what = takesFeatures(model) ? "samples" : "digits";
      const held = model.test_samples ? `${model.test_samples.toLocaleString("en")} held-out ${what}` : `held-out ${what}`;
      parts.push(`${(model.accuracy * 100).toFixed(1)}% right on ${held}`);
    } else {
      parts.push("accuracy not recorded");
    }
    parts.push(takesFeatures(model) ? `input ${model.input.shape[0]} features` : `input ${model.input.shape.join("×")}`);
    if (model.dataset) parts.push(`trained on ${model.dataset}${model.arch ? ` (${model.arch})` : ""}`);
    parts.push(`served by ${model.backend}`);
    return parts.join(" · ");
  }

  async function loadModels() {
    select.disabled = true;
    try {
      const { data } = await Serving.call("/models");
      state.models = data.models;
    } catch (error) {
      showError(error);
      if (error.status === 401 || error.status === 403) keys.ask();
      return;
    }
    const previous = state.model && `${state.model.name}/${state.model.version}`;
    select.replaceChildren(...state.models.map((model, i) => {
      const input = takesFeatures(model) ? `${model.input.shape[0]} features` : model.input.shape.join("×");
      const option = new Option(`${model.name} v${model.version} (${model.framework}, ${input})`, String(i));
      option.selected = previous ? `${model.name}/${model.version}` === previous : model.default;
      return option;
    }));
    select.disabled = state.models.length === 0;
    chooseModel();
  }

  function chooseModel() {
    state.model = state.models[Number(select.value)] || null;
    $("model-info").textContent = state.model ? describe(state.model) : "No model is served.";
    const features = takesFeatures();
    $("features").hidden = !features;
    $("image-input").hidden = features;
    $("seen-panel").hidden = features;
    $("input-title").textContent = features ? "Your input" : "Your digit";
    if (features) buildFeatureForm(state.model); else state.fields = [];
    buildBars();
    state.generation++;
    if (isEmpty()) setMessage(idleMessage());
    changed(0);
  }

  function idleMessage() {
    return takesFeatures() ? "Fill in every number to see the answer." : "Draw a digit to see the answer.";
  }
  select.addEventListener("change", chooseModel);

  // -- predictions -----------------------------------------------------------------------------------
  function changed(delay = FIRST_DELAY_MS) {
    state.dirty = true;
    if (isEmpty()) {
      state.dirty = false;
      resetAnswer();
      return;
    }
    if (!state.timer && !state.inFlight) state.timer = setTimeout(flush, delay);
  }

  async function flush() {
    state.timer = 0;
    if (state.inFlight || !state.dirty || !state.model) return;
    state.dirty = false;
    if (isEmpty()) return;
    state.inFlight = true;
    const generation = state.generation, sequence = ++state.sequence, model = state.model;
    try {
      const stale = () => generation !== state.generation;
      const result = takesFeatures(model)
        ? await predictRow(featureValues(), model, stale)
        : await predict(state.upload || { blob: padPng(), type: "image/png" }, model, stale);
      if (result && generation === state.generation && sequence > state.shown) {
        state.shown = sequence;
        showAnswer(result, model);
      }
    } catch (error) {
      if (generation === state.generation) showError(error);
      if (error.status === 401 || error.status === 403) keys.ask();
    } finally {
      state.inFlight = false;
      if (state.dirty) state.timer = setTimeout(flush, 0);
    }
  }

  /** Frame the picture, then run the model; a 503 is retried after its Retry-After. null when it went stale. */
  async function predict(picture, model, stale) {
    const base = `/models/${encodeURIComponent(model.name)}/versions/${encodeURIComponent(model.version)}`;
    const infer = `/v2/models/${encodeURIComponent(model.name)}/versions/${encodeURIComponent(model.version)}/infer`;
    for (let attempt = 1; ; attempt++) {
      const requestId = Serving.newRequestId();
      const started = performance.now();
      try {
        const framed = await Serving.call(`${base}/input`, { method: "POST", body: picture.blob, type: picture.type,
                                                              requestId });
        const framedAt = performance.now();
        const body = JSON.stringify({ id: requestId, inputs: [framed.data.input] });
        const answer = await Serving.call(infer, { method: "POST", body, type: "application/json", requestId });
        const done = performance.now();
        return { input: framed.data.input, outputs: answer.data.outputs, requestId: answer.requestId || requestId,
                 framing: framedAt - started, model: done - framedAt, total: done - started };
      } catch (error) {
        if (!(error instanceof Serving.HttpError) || error.status !== 503 || attempt >= MAX_RETRIES) throw error;
        setMessage(Serving.explain(error) + (attempt > 1 ? ` (attempt ${attempt + 1})` : ""), "busy");
        await Serving.sleep(error.retryAfter * 1000);
        if (stale()) return null;
      }
    }
  }

  /** Run a feature model on one row (v2 infer, FP32 [1, N]); a 503 is retried. null when it went stale. */
  async function predictRow(values, model, stale) {
    const infer = `/v2/models/${encodeURIComponent(model.name)}/versions/${encodeURIComponent(model.version)}/infer`;
    for (let attempt = 1; ; attempt++) {
      const requestId = Serving.newRequestId();
      const started = performance.now();
      const input = { name: model.input.name, shape: [1, values.length], datatype: "FP32", data: values };
      try {
        const body = JSON.stringify({ id: requestId, inputs: [input] });
        const answer = await Serving.call(infer, { method: "POST", body, type: "application/json", requestId });
        const done = performance.now();
        return { input, outputs: answer.data.outputs, requestId: answer.requestId || requestId, framing: 0,
                 model: done - started, total: done - started };
      } catch (error) {
        if (!(error instanceof Serving.HttpError) || error.status !== 503 || attempt >= MAX_RETRIES) throw error;
        setMessage(Serving.explain(error) + (attempt > 1 ? ` (attempt ${attempt + 1})` : ""), "busy");
        await Serving.sleep(error.retryAfter * 1000);
        if (stale()) return null;
      }
    }
  }

  // -- the answer ------------------------------------------------------------------------------------
  function buildBars() {
    const labels = state.model ? state.model.labels : [];
    $("bars").replaceChildren(...labels.map((label) => {
      const row = document.createElement("li");
      const name = document.createElement("span");
      name.className = "label";
      name.textContent = label;
      const track = document.createElement("span");
      track.className = "track";
      track.setAttribute("aria-hidden", "true");
      track.append(document.createElement("span"));
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = "–";
      row.append(name, track, value);
      return row;
    }));
    resetAnswer();
  }

  function resetAnswer() {
    $("top-label").textContent = "?";
    $("top-prob").textContent = "";
    for (const row of $("bars").children) {
      row.classList.remove("best");
      row.querySelector(".track span").style.width = "0";
      row.querySelector(".value").textContent = "–";
    }
    const view = seen.getContext("2d");
    view.fillStyle = "#000";
    view.fillRect(0, 0, seen.width, seen.height);
    seen.setAttribute("aria-label", "What the model sees: nothing yet");
    $("latency").textContent = "–";
    $("request-id").textContent = "–";
    if (isEmpty()) setMessage(idleMessage());
  }

  function showAnswer(result, model) {
    const probabilities = result.outputs.find((output) => output.datatype !== "BYTES").data;
    let best = 0;
    probabilities.forEach((p, i) => { if (p > probabilities[best]) best = i; });
    const percent = (p) => `${(p * 100).toFixed(p >= 0.9995 || p < 0.0005 ? 0 : 1)}%`;
    $("top-label").textContent = model.labels[best];
    $("top-prob").textContent = `${percent(probabilities[best])} sure`;
    [...$("bars").children].forEach((row, i) => {
      row.classList.toggle("best", i === best);
      row.querySelector(".track span").style.width = `${(probabilities[i] * 100).toFixed(2)}%`;
      row.querySelector(".value").textContent = percent(probabilities[i]);
    });
    if (takesFeatures(model)) {
      $("latency").textContent = `${Math.round(result.total)} ms (measured by this page)`;
    } else {
      drawSeen(result.input);
      $("latency").textContent = `${Math.round(result.total)} ms: framing ${Math.round(result.framing)} ms,`
        + ` model ${Math.round(result.model)} ms (measured by this page)`;
    }
    $("request-id").textContent = result.requestId;
    setMessage(`${model.name} v${model.version} says ${model.labels[best]}.`);
  }

  function drawSeen(input) {
    const [, height, width] = input.shape;
    seen.width = width;
    seen.height = height;
    const view = seen.getContext("2d");
    const image = view.createImageData(width, height);
    input.data.forEach((value, i) => {
      image.data.set([value, value, value, 255], i * 4);
    });
    view.putImageData(image, 0, 0);
    seen.setAttribute("aria-label", `What the model sees: the picture framed in ${width}×${height} pixels`);
  }

  function setMessage(text, kind = "") {
    const message = $("message");
    message.textContent = text;
    message.className = `message ${kind}`;
  }

  function showError(error) {
    setMessage(Serving.explain(error), "error");
    if (isEmpty()) return;
    $("top-label").textContent = "!";
    $("top-prob").textContent = "no answer";
  }

  paint();
  buildBars();
  loadModels();
})();
