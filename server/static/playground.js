// The pointing playground: one image, a /v1/point call (one object or several) or a streamed
// /v1/chat/completions question, and the answer's points drawn over the image.
//
// It calls only the public API, like any client: the key the user types goes in the
// Authorization header and stays in sessionStorage (this tab). Points are drawn in an SVG
// whose viewBox is the image's own pixel size, so a point's x/y from the API is placed as is.
// document.body.dataset.state (idle, busy, done, error) says where a request stands.
"use strict";

const KEY_STORE = "molmo-playground-api-key";
const ACCEPTED = ["image/png", "image/jpeg", "image/webp"];
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4",
  "#f032e6", "#9a6324", "#469990", "#000075", "#808000", "#800000"];
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
let picture = null; // {dataUrl, width, height}: the image as sent and its displayed size

// ------------------------------------------------------------------ the API

/** A refusal of the API, carrying its OpenAI-shaped error. */
class APIFailure extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.code = error.code;
  }
}

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

/** The response's error as the API words it (or the status, for a body that is not one). */
async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's page, say
  }
  const error = body && body.error && typeof body.error.message === "string"
    ? body.error : { message: `${response.status} ${response.statusText}`, code: null };
  return new APIFailure(response.status, error);
}

async function call(path, body) {
  const response = await fetch(path, { method: "POST", headers: apiHeaders(), body: JSON.stringify(body) });
  if (!response.ok) throw await failure(response);
  return response;
}

/** /v1/models: fills the model list, and shows the key field when the server wants one. */
async function loadModels() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: apiHeaders() });
  } catch (e) {
    $("status").textContent = `server unreachable: ${e.message}`;
    return;
  }
  if (response.status === 401) {
    $("key-row").hidden = false;
    const error = await failure(response);
    $("status").textContent = $("key").value ? error.message : "this server needs an API key";
    return;
  }
  if (!response.ok) {
    $("status").textContent = (await failure(response)).message;
    return;
  }
  const models = (await response.json()).data.map((m) => m.id);
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(...models.map((id) => new Option(id, id, false, id === chosen)));
  $("status").textContent = `serving ${models.join(", ")}`;
}

async function point(objects) {
  const body = { image: picture.dataUrl, model: $("model").value || undefined };
  if (objects.length === 1) body.object = objects[0];
  else body.objects = objects;
  const started = performance.now();
  const data = await (await call("/v1/point", body)).json();
  const seconds = (performance.now() - started) / 1000;
  const results = data.results || [data]; // `objects` answers with one result per object
  show({
    groups: results.map((r, i) => ({ label: objects[i], points: r.points })),
    answer: results.map((r) => r.text).join("\n"),
    latency: `${seconds.toFixed(2)} s`,
    raw: JSON.stringify(data, null, 2),
  });
}

async function chat(question) {
  const body = {
    model: $("model").value || undefined,
    messages: [{ role: "user", content: [
      { type: "image_url", image_url: { url: picture.dataUrl } },
      { type: "text", text: question },
    ] }],
    stream: true,
    stream_options: { include_usage: true },
    temperature: 0, // the model's most likely answer: what a pointing demo should show
  };
  const started = performance.now();
  const response = await call("/v1/chat/completions", body);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const events = [];
  let buffer = "";
  let text = "";
  let points = [];
  let firstToken = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) { // server-sent events: "data: {...}\n\n"
      const payload = buffer.slice(0, end).replace(/^data: /, "");
      buffer = buffer.slice(end + 2);
      if (payload === "[DONE]") continue;
      const chunk = JSON.parse(payload);
      events.push(chunk);
      if (chunk.error) throw new APIFailure(null, chunk.error); // failed after the 200
      for (const choice of chunk.choices || []) {
        if (choice.delta.content) {
          firstToken ??= performance.now() - started;
          text += choice.delta.content;
          $("answer").textContent = text;
        }
        if (choice.delta.points) points = choice.delta.points; // on the choice's last chunk
      }
    }
  }
  const seconds = (performance.now() - started) / 1000;
  const labels = [...new Set(points.map((p) => p.label ?? "points"))];
  show({
    groups: labels.map((label) => ({
      label,
      points: points.filter((p) => (p.label ?? "points") === label && p.image_index === 0)
        .map((p) => ({ x: p.x ?? p.x_norm * picture.width, y: p.y ?? p.y_norm * picture.height })),
    })),
    answer: text,
    latency: `${seconds.toFixed(2)} s` +
      (firstToken === null ? "" : ` (first token ${(firstToken / 1000).toFixed(2)} s)`),
    raw: events.map((e) => JSON.stringify(e)).join("\n"),
  });
}

// ------------------------------------------------------------------ drawing

function clearResult() {
  $("marks").replaceChildren();
  $("legend").replaceChildren();
  $("answer").textContent = "";
  $("raw").textContent = "";
  $("summary").hidden = true;
  $("error").hidden = true;
}

function svg(tag, attributes) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  return element;
}

/** Numbered markers per object, each object in its own colour, and the counts. */
function show({ groups, answer, latency, raw }) {
  const radius = Math.max(picture.width, picture.height) / 45; // in image pixels
  const marks = [];
  const legend = [];
  groups.forEach((group, g) => {
    const colour = PALETTE[g % PALETTE.length];
    group.points.forEach((p, i) => {
      // A dark halo and a white ring keep a marker visible on an object of its own colour.
      const mark = svg("g", { class: "mark" });
      Object.assign(mark.dataset, { object: group.label, n: i + 1, x: p.x, y: p.y });
      const number = svg("text", { x: p.x, y: p.y, "font-size": radius * 1.2 });
      number.textContent = i + 1;
      mark.append(
        svg("circle", { class: "halo", cx: p.x, cy: p.y, r: radius * 1.3 }),
        svg("circle", { class: "dot", cx: p.x, cy: p.y, r: radius, fill: colour,
          "stroke-width": radius / 5 }),
        number,
      );
      marks.push(mark);
    });
    const item = document.createElement("li");
    Object.assign(item.dataset, { object: group.label, count: group.points.length });
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour;
    item.append(swatch, `${group.label}: ${group.points.length}`);
    legend.push(item);
  });
  $("marks").replaceChildren(...marks);
  $("legend").replaceChildren(...legend);
  const total = groups.reduce((n, g) => n + g.points.length, 0);
  $("count").textContent = `${total} point${total === 1 ? "" : "s"}`;
  $("count").dataset.count = total;
  $("latency").textContent = latency;
  $("summary").hidden = false;
  $("answer").textContent = answer;
  $("raw").textContent = raw;
}

function showError(status, message) {
  $("error-status").textContent = status;
  $("error-message").textContent = message;
  $("error").hidden = false;
}

// ------------------------------------------------------------------ the image

function useFile(file) {
  if (!file) return;
  if (!ACCEPTED.includes(file.type)) {
    showError("", `${file.name || "that"} is not a PNG, JPEG or WebP image (${file.type || "unknown type"})`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    const img = $("image");
    img.onload = () => {
      // The browser shows the image turned by its EXIF orientation, and the API answers
      // in that frame too: natural sizes are the frame the points are in.
      picture = { dataUrl: reader.result, width: img.naturalWidth, height: img.naturalHeight };
      $("marks").setAttribute("viewBox", `0 0 ${picture.width} ${picture.height}`);
      $("frame").hidden = false;
      clearResult();
    };
    img.onerror = () => showError("", `the browser cannot show ${file.name || "that image"}`);
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

// ------------------------------------------------------------------ wiring

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

async function ask(event) {
  event.preventDefault();
  clearResult();
  if (!picture) {
    showError("", "drop, paste or pick an image first");
    return;
  }
  document.body.dataset.state = "busy";
  $("go").disabled = true;
  try {
    if (mode() === "point") {
      const objects = $("objects").value.split(",").map((s) => s.trim()).filter(Boolean);
      if (!objects.length) throw new Error("name something to point at");
      await point(objects);
    } else {
      await chat($("question").value);
    }
    document.body.dataset.state = "done";
  } catch (e) {
    const where = e instanceof APIFailure ? [e.status, e.code].filter(Boolean).join(" ") : "";
    showError(where && `${where}:`, e.message);
    document.body.dataset.state = "error";
  } finally {
    $("go").disabled = false;
  }
}

function init() {
  document.body.dataset.state = "idle";
  const stored = sessionStorage.getItem(KEY_STORE);
  if (stored) {
    $("key").value = stored;
    $("key-row").hidden = false;
  }
  $("key").addEventListener("change", () => {
    const key = $("key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
    loadModels();
  });
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.addEventListener("change", () => {
      $("objects-row").hidden = mode() !== "point";
      $("question-row").hidden = mode() !== "chat";
    });
  }
  $("file").addEventListener("change", () => useFile($("file").files[0]));
  const stage = $("stage");
  stage.addEventListener("dragover", (e) => {
    e.preventDefault();
    stage.classList.add("over");
  });
  stage.addEventListener("dragleave", () => stage.classList.remove("over"));
  stage.addEventListener("drop", (e) => {
    e.preventDefault();
    stage.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = [...e.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (file) {
      e.preventDefault();
      useFile(file);
    }
  });
  $("ask").addEventListener("submit", ask);
  loadModels();
}

init();
