// Mammoth Serve playground: plain JavaScript over the public HTTP API only (no build step).
// /v1/models, /v1/images/generations and /v1/images/edits (SSE), /v1/videos, /v1/chat/completions.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "mammoth-api-key";
  const state = {
    tab: "image",
    key: sessionStorage.getItem(KEY_STORE) || "",
    families: new Set(),
    sources: { edit: null, "video-edit": null, ask: null }, // {dataUrl, mime, label}
    busy: false,
  };

  // Which model family each tab needs (the ingress routes images to mammoth2, videos to mammoth25).
  const TAB_FAMILY = { image: "mammoth2", edit: "mammoth2", video: "mammoth25", "video-edit": "mammoth25", ask: null };
  const RUN_LABEL = { image: "Generate", edit: "Edit", video: "Generate video", "video-edit": "Edit video", ask: "Ask" };

  // Image SSE events by name: the current Mammoth names and OpenAI's (a server may send either).
  const IMAGE_EVENTS = {
    queued: "progress", planning: "progress", denoise_step: "progress", decoding: "progress", progress: "progress",
    "image_generation.partial_image": "partial", "image_edit.partial_image": "partial",
    completed: "completed", "image_generation.completed": "completed", "image_edit.completed": "completed",
    error: "error",
  };

  class ApiError extends Error {
    constructor(status, message, type, param) {
      super(message);
      this.status = status;
      this.type = type || "error";
      this.param = param || null;
    }
  }

  // ------------------------------------------------------------------------------ HTTP helpers

  function headers(json = true) {
    const out = {};
    if (json) out["Content-Type"] = "application/json";
    if (state.key) out.Authorization = `Bearer ${state.key}`;
    return out;
  }

  async function errorFrom(response) {
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    const err = body && body.error;
    const message = (err && err.message) || (body && body.detail) || `HTTP ${response.status}`;
    return new ApiError(response.status, message, err && err.type, err && err.param);
  }

  async function api(path, options = {}) {
    const response = await fetch(path, { ...options, headers: { ...headers(options.body !== undefined), ...(options.headers || {}) } });
    if (!response.ok) {
      const error = await errorFrom(response);
      if (response.status === 401) showKeyRow(true);
      throw error;
    }
    return response;
  }

  function postJson(path, body) {
    return api(path, { method: "POST", body: JSON.stringify(body) });
  }

  // Server-sent events from a fetch() body (EventSource cannot POST).
  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const event = parseSseBlock(block);
        if (event) yield event;
      }
    }
    const last = parseSseBlock(buffer);
    if (last) yield last;
  }

  function parseSseBlock(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    return data.length ? { event, data: data.join("\n") } : null;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function readAsDataUrl(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
  }

  // ------------------------------------------------------------------------------ DOM helpers

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("data-")) node.setAttribute(name, value);
      else node[name] = value;
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function showKeyRow(needed) {
    $("key-row").hidden = false;
    if (needed) {
      $("key-row").classList.add("needed");
      $("api-key").focus();
    }
  }

  function showError(error, context) {
    const box = el("div", { class: "error", "data-status": String(error.status || ""), "data-type": error.type || "error" },
      el("strong", { class: "type", text: error.type || "error" }),
      el("span", { class: "message", text: error.message }),
      error.param ? el("span", { class: "param", text: ` (${error.param})` }) : null,
      context ? el("span", { class: "context", text: ` — ${context}` }) : null,
      el("button", { type: "button", class: "dismiss", text: "×", onclick: () => box.remove() }));
    $("errors").prepend(box);
  }

  function asError(error) {
    if (error instanceof ApiError) return error;
    return new ApiError(0, String(error && error.message ? error.message : error), "client_error");
  }

  // One running request: phase text, a progress bar and the latest latent preview.
  function progressCard(label) {
    const bar = el("progress", { max: 1, value: 0 });
    const phase = el("span", { class: "phase", text: "queued" });
    const preview = el("img", { class: "preview", alt: "latent preview", hidden: true });
    const card = el("div", { class: "job" }, el("span", { class: "label", text: label }), phase, bar, preview);
    $("progress").append(card);
    let previews = 0;
    return {
      phase(text, value, max) {
        phase.textContent = text;
        if (max) { bar.max = max; bar.value = value; }
      },
      preview(b64, mime = "image/png") {
        previews += 1;
        preview.hidden = false;
        preview.src = `data:${mime};base64,${b64}`;
      },
      get previews() { return previews; },
      done() { card.remove(); },
    };
  }

  function formatSeconds(value) {
    return typeof value === "number" ? `${value.toFixed(3)} s` : String(value);
  }

  function metaList(meta) {
    const list = el("dl", { class: "meta" });
    for (const [name, value] of Object.entries(meta)) {
      if (value === undefined || value === null || value === "") continue;
      list.append(el("dt", { text: name }), el("dd", { "data-field": name, text: String(value) }));
    }
    return list;
  }

  function timingsTable(timings) {
    const table = el("table", { class: "timings" });
    table.append(el("caption", { text: "timings per stage" }));
    for (const [stage, seconds] of Object.entries(timings || {})) {
      table.append(el("tr", { "data-stage": stage }, el("th", { text: stage }), el("td", { text: formatSeconds(seconds) })));
    }
    return table;
  }

  function galleryItem(kind, media, info) {
    const actions = el("div", { class: "actions" });
    const figure = el("figure", { class: `item ${kind}`, "data-kind": kind, "data-request-id": info.request_id || "" },
      media, el("figcaption", {}, el("p", { class: "prompt", text: info.prompt }), metaList(info.meta),
        timingsTable(info.timings), actions));
    if (info.previews !== undefined) figure.setAttribute("data-previews", String(info.previews));
    return { figure, actions };
  }

  function addAction(actions, label, handler) {
    actions.append(el("button", { type: "button", "data-action": label, text: label, onclick: handler }));
  }

  function useSource(tab, source) {
    state.sources[tab] = source;
    const target = { edit: "edit-source", "video-edit": "video-source", ask: "ask-source" }[tab];
    $(target).textContent = source ? `using ${source.label}` : "none chosen";
    selectTab(tab);
  }

  // ------------------------------------------------------------------------------ form values

  function intOrNull(id) {
    const raw = $(id).value.trim();
    return raw === "" ? null : Number.parseInt(raw, 10);
  }

  function floatOrNull(id) {
    const raw = $(id).value.trim();
    return raw === "" ? null : Number.parseFloat(raw);
  }

  function knobs() {
    const body = {};
    const size = $("size").value.trim();
    if (size) body.size = size;
    const steps = intOrNull("steps");
    if (steps !== null) body.steps = steps;
    const seed = intOrNull("seed");
    if (seed !== null) body.seed = seed; // n images: the server seeds them seed, seed+1, ...
    const guidance = floatOrNull("guidance");
    if (guidance !== null) body.guidance_scale = guidance;
    return body;
  }

  // ------------------------------------------------------------------------------ flows

  // Request fields only newer servers know; an older one refuses them by name (422) and sends
  // its progress events unasked, so the request is repeated without them.
  const OPTIONAL_FIELDS = ["progress_events"];

  async function postImage(path, body) {
    try {
      return await postJson(path, body);
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 422 || !OPTIONAL_FIELDS.includes(error.param)) throw error;
      const { [error.param]: _dropped, ...rest } = body;
      return postImage(path, rest);
    }
  }

  async function runImage(prompt, edit) {
    const count = Math.max(1, intOrNull("n") || 1);
    const body = { prompt, ...knobs(), stream: true, preview: $("preview").checked, progress_events: true };
    if (count > 1) body.n = count;
    if (edit) {
      const source = state.sources.edit;
      if (!source) throw new ApiError(0, "choose an image to edit", "client_error", "image");
      body.images = [source.dataUrl];
    }
    const card = progressCard(`${edit ? "edit" : "image"}: ${prompt}`);
    const previews = {}; // image index -> latent previews shown
    let completed = 0;
    try {
      const response = await postImage(edit ? "/v1/images/edits" : "/v1/images/generations", body);
      for await (const message of sseEvents(response)) {
        let data;
        try { data = JSON.parse(message.data); } catch (_) { continue; }
        const kind = IMAGE_EVENTS[data.type] || IMAGE_EVENTS[message.event];
        const index = data.index || 0;
        if (kind === "error") {
          const err = data.error || {};
          throw new ApiError(0, err.message || "stream failed", err.type, err.param);
        }
        if (kind === "progress" || kind === "partial") {
          const step = data.step !== undefined ? data.step
            : data.partial_image_index !== undefined ? data.partial_image_index + 1 : undefined;
          const phase = data.type === "denoise_step" || kind === "partial" ? "denoise" : data.type || message.event;
          const who = count > 1 ? `image ${index + 1}/${count}: ` : "";
          card.phase(step !== undefined ? `${who}${phase} ${step}/${data.total || "?"}` : `${who}${phase}`,
            step || 0, data.total);
          const preview = data.preview_b64_png || (kind === "partial" ? data.b64_json : null);
          if (preview) {
            card.preview(preview);
            previews[index] = (previews[index] || 0) + 1;
          }
        } else if (kind === "completed") {
          addImage(prompt, data, previews[index] || 0, edit);
          completed += 1;
        }
      }
      if (!completed) throw new ApiError(0, "the event stream ended without a result", "stream_error");
    } finally {
      card.done();
    }
  }

  function addImage(prompt, data, previews, edit) {
    const item = (data.data && data.data[0]) || {};
    const b64 = data.b64_json || item.b64_json;
    const mime = data.mime_type || item.mime_type || `image/${data.output_format || "png"}`;
    const src = `data:${mime};base64,${b64}`;
    const img = el("img", { src, alt: prompt, class: "media" });
    const { figure, actions } = galleryItem(edit ? "edit" : "image", img, {
      prompt, request_id: data.request_id, previews, timings: data.timings,
      meta: { seed: data.seed, index: data.index || null, size: data.width ? `${data.width}x${data.height}` : data.size,
        steps: data.steps,
        model: data.model, planned_tokens: data.planned_tokens ?? (data.usage && data.usage.output_tokens),
        retries: data.retries || null },
    });
    addAction(actions, "edit", () => useSource("edit", { dataUrl: src, mime, label: `gallery image (seed ${data.seed})` }));
    addAction(actions, "ask", () => useSource("ask", { dataUrl: src, mime, label: `gallery image (seed ${data.seed})` }));
    actions.append(el("a", { href: src, download: `mammoth-${data.seed}.${mime.split("/")[1]}`, text: "download" }));
    $("gallery").prepend(figure);
  }

  async function runVideo(prompt, edit) {
    const body = { prompt, ...knobs() };
    const frames = intOrNull("frames");
    if (frames !== null) body.frames = frames;
    if (edit) {
      const source = state.sources["video-edit"];
      if (!source) throw new ApiError(0, "choose a video to edit", "client_error", "video");
      body.video = source.dataUrl;
    }
    const card = progressCard(`${edit ? "video edit" : "video"}: ${prompt}`);
    try {
      let job = await (await postJson("/v1/videos", body)).json();
      while (job.status !== "completed" && job.status !== "failed") {
        card.phase(`${job.status} ${job.progress || 0}%`, job.progress || 0, 100);
        await sleep(400);
        job = await (await api(`/v1/videos/${encodeURIComponent(job.id)}`)).json();
      }
      if (job.status === "failed") {
        const err = job.error || {};
        throw new ApiError(0, err.message || "video job failed", err.type);
      }
      card.phase("downloading", 100, 100);
      const content = await api(`/v1/videos/${encodeURIComponent(job.id)}/content`);
      const blob = await content.blob();
      addVideo(prompt, job, blob, edit);
    } finally {
      card.done();
    }
  }

  function addVideo(prompt, job, blob, edit) {
    const url = URL.createObjectURL(blob);
    const mime = job.mime_type || blob.type || "video/mp4";
    const video = el("video", { class: "media", controls: true, loop: true, muted: true, autoplay: true, playsInline: true },
      el("source", { src: url, type: mime }));
    const { figure, actions } = galleryItem(edit ? "video-edit" : "video", video, {
      prompt, request_id: job.id, timings: job.timings,
      meta: { seed: job.seed, size: `${job.width}x${job.height}`, frames: job.frames, fps: job.fps, model: job.model,
        retries: job.retries || null },
    });
    const source = async () => ({ dataUrl: await readAsDataUrl(blob), mime, label: `gallery video (seed ${job.seed})` });
    addAction(actions, "edit", async () => useSource("video-edit", await source()));
    addAction(actions, "ask", async () => useSource("ask", await source()));
    actions.append(el("a", { href: url, download: `mammoth-${job.seed}.${mime.split("/")[1]}`, text: "download" }));
    $("gallery").prepend(figure);
  }

  async function runAsk(prompt) {
    const content = [{ type: "text", text: prompt }];
    const source = state.sources.ask;
    if (source) {
      const part = source.mime.startsWith("video/") ? "video_url" : "image_url";
      content.push({ type: part, [part]: { url: source.dataUrl } });
    }
    const body = { messages: [{ role: "user", content }], stream: true };
    const maxTokens = intOrNull("max-tokens");
    if (maxTokens !== null) body.max_tokens = maxTokens;
    const seed = intOrNull("seed");
    if (seed !== null) body.seed = seed;
    const answer = el("blockquote", { class: "answer media" });
    const card = progressCard(`ask: ${prompt}`);
    const started = performance.now();
    let requestId = "";
    try {
      const response = await postJson("/v1/chat/completions", body);
      card.phase("answering");
      for await (const message of sseEvents(response)) {
        if (message.data === "[DONE]") break;
        let data;
        try { data = JSON.parse(message.data); } catch (_) { continue; }
        if (data.error) throw new ApiError(0, data.error.message, data.error.type);
        requestId = data.id || requestId;
        const delta = data.choices && data.choices[0] && data.choices[0].delta;
        if (delta && delta.content) answer.textContent += delta.content;
      }
    } finally {
      card.done();
    }
    const { figure, actions } = galleryItem("answer", answer, {
      prompt, request_id: requestId, timings: { total: (performance.now() - started) / 1000 },
      meta: { attached: source ? source.label : null },
    });
    actions.remove();
    $("gallery").prepend(figure);
  }

  const FLOWS = {
    image: (prompt) => runImage(prompt, false),
    edit: (prompt) => runImage(prompt, true),
    video: (prompt) => runVideo(prompt, false),
    "video-edit": (prompt) => runVideo(prompt, true),
    ask: (prompt) => runAsk(prompt),
  };

  async function submit(event) {
    event.preventDefault();
    const prompt = $("prompt").value.trim();
    $("run").disabled = true;
    try {
      await FLOWS[state.tab](prompt);
    } catch (error) {
      showError(asError(error), state.tab);
    } finally {
      $("run").disabled = false;
    }
  }

  // ------------------------------------------------------------------------------ tabs, files, key

  function selectTab(tab) {
    state.tab = tab;
    for (const button of document.querySelectorAll("#tabs button")) {
      button.setAttribute("aria-selected", String(button.dataset.tab === tab));
    }
    for (const node of document.querySelectorAll(".only")) {
      node.hidden = !node.dataset.for.split(" ").includes(tab);
    }
    for (const node of document.querySelectorAll(".gen")) node.hidden = tab === "ask";
    $("run").textContent = RUN_LABEL[tab];
    document.body.dataset.tab = tab;
  }

  function watchFile(inputId, tab) {
    $(inputId).addEventListener("change", async () => {
      const file = $(inputId).files[0];
      if (!file) return;
      useSource(tab, { dataUrl: await readAsDataUrl(file), mime: file.type || "application/octet-stream", label: file.name });
    });
  }

  async function loadModels() {
    $("models").textContent = "connecting…";
    try {
      const models = await (await api("/v1/models")).json();
      state.families = new Set(models.data.map((m) => m.family));
      $("models").textContent = models.data.map((m) => `${m.family}: ${m.id}`).join(" · ") || "no models";
      $("models").dataset.state = "ok";
      $("key-row").classList.remove("needed");
      for (const button of document.querySelectorAll("#tabs button")) {
        const family = TAB_FAMILY[button.dataset.tab];
        button.disabled = family !== null && !state.families.has(family);
      }
    } catch (error) {
      const err = asError(error);
      $("models").textContent = err.status === 401 ? "API key required" : `server: ${err.message}`;
      $("models").dataset.state = "error";
    }
  }

  function init() {
    for (const button of document.querySelectorAll("#tabs button")) {
      button.addEventListener("click", () => selectTab(button.dataset.tab));
    }
    watchFile("edit-file", "edit");
    watchFile("video-file", "video-edit");
    watchFile("ask-file", "ask");
    $("form").addEventListener("submit", submit);
    $("api-key").value = state.key;
    if (state.key) showKeyRow(false);
    $("key-row").addEventListener("submit", (event) => {
      event.preventDefault();
      state.key = $("api-key").value.trim();
      if (state.key) sessionStorage.setItem(KEY_STORE, state.key);
      else sessionStorage.removeItem(KEY_STORE);
      loadModels();
    });
    selectTab("image");
    loadModels();
    document.body.dataset.ready = "true";
  }

  init();
})();
