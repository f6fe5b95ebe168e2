// flamingo-vlm few-shot playground: build an interleaved prompt, stream a completion.
// Talks to POST /v1/completions with the `images` extension field and `stream: true`.
"use strict";

const MEDIA = "<image>";
const EOC = "<|endofchunk|>";
const MAX_SIDE = 1024; // images are downscaled in the browser before upload (the model uses far less)

const $ = (sel, root = document) => root.querySelector(sel);
const shotsEl = $("#shots");
const template = $("#shot-template");
let modelId = null;
// What the served model puts between a demonstration's <|endofchunk|> and the next step (GET /v1/models'
// demo_separator: "\n" for the built-in model, "" for OpenFlamingo's checkpoints).
let demoSeparator = "";
let controller = null;

// -- steps -----------------------------------------------------------------------------------------
function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error || new Error("could not read " + file.name));
    r.readAsDataURL(file);
  });
}

async function toDataURL(file) {
  const original = await readAsDataURL(file);
  try {
    const bitmap = await createImageBitmap(file);
    const scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
    if (scale >= 1) return original;
    const canvas = document.createElement("canvas");
    // (at least 1: a 1 x 5000 strip scaled by 0.2 rounded to a 0-pixel canvas, sent as "data:,")
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    return canvas.toDataURL("image/jpeg", 0.92);
  } catch (e) {
    return original; // let the server judge it (and answer with a clear error if it cannot decode it)
  }
}

async function setImage(li, file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name} is not an image`);
    return;
  }
  li.dataset.image = await toDataURL(file);
  li.dataset.filename = file.name;
  const img = $(".thumb", li);
  img.src = li.dataset.image;
  img.alt = file.name;
  img.hidden = false;
  $(".drop-label", li).hidden = true;
  $(".remove-image", li).hidden = false;
  refresh();
}

function clearImage(li) {
  delete li.dataset.image;
  delete li.dataset.filename;
  const img = $(".thumb", li);
  img.hidden = true;
  img.removeAttribute("src");
  $(".drop-label", li).hidden = false;
  $(".remove-image", li).hidden = true;
  refresh();
}

function addShot(text = "") {
  const li = template.content.firstElementChild.cloneNode(true);
  const drop = $(".drop", li);
  const input = $(".shot-file", li);
  const area = $(".shot-text", li);
  area.value = text;
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  input.addEventListener("change", async () => {
    const files = [...input.files];
    if (files.length) await setImage(li, files[0]);
    for (const f of files.slice(1)) await setImage(addShot(), f);
    input.value = "";
  });
  li.addEventListener("dragover", (e) => { e.preventDefault(); e.stopPropagation(); li.classList.add("dragover"); });
  li.addEventListener("dragleave", () => li.classList.remove("dragover"));
  li.addEventListener("drop", async (e) => {
    e.preventDefault();
    e.stopPropagation();
    li.classList.remove("dragover");
    const files = [...e.dataTransfer.files].filter((f) => !f.type || f.type.startsWith("image/"));
    if (files.length) await setImage(li, files[0]);
    for (const f of files.slice(1)) await setImage(addShot(), f);
  });
  area.addEventListener("input", refresh);
  $(".remove", li).addEventListener("click", () => { li.remove(); if (!shotsEl.children.length) addShot("Output:"); refresh(); });
  $(".remove-image", li).addEventListener("click", () => clearImage(li));
  shotsEl.appendChild(li);
  refresh();
  return li;
}

function steps() {
  return [...shotsEl.children].map((li) => ({
    image: li.dataset.image || null, filename: li.dataset.filename || null, text: $(".shot-text", li).value,
  }));
}

// The prompt: every step is <image>text; every step but the last is a demonstration closed by <|endofchunk|>
// and the model's demonstration separator.
// `sources[k]` says where images[k] came from, so that an error about an image can name it.
function buildPrompt() {
  const all = steps();
  let prompt = "";
  const images = [];
  const sources = [];
  all.forEach((s, i) => {
    if (s.image) {
      prompt += MEDIA;
      images.push(s.image);
      sources.push(`step ${i + 1}` + (s.filename ? ` (${s.filename})` : ""));
    }
    prompt += s.text;
    if (i < all.length - 1) prompt += EOC + demoSeparator;
  });
  return { prompt, images, sources };
}

// The server's error names the image by its place in the request (param "images[2]"): say which
// step and file that is.
function errorMessage(error, sources) {
  const m = /^images\[(\d+)\]/.exec(error.param || "");
  const where = m && sources[Number(m[1])];
  return where ? `${where}: ${error.message}` : error.message;
}

function escapeHTML(s) {
  return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
}

function refresh() {
  const items = [...shotsEl.children];
  items.forEach((li, i) => {
    const last = i === items.length - 1;
    li.classList.toggle("query", last);
    $(".shot-kind", li).textContent = last ? `step ${i + 1} · query` : `step ${i + 1} · example`;
    $(".shot-text", li).placeholder = last ? "the text the model continues, e.g. Output:" : "text after this image, e.g. Output: two cats.";
  });
  const { prompt } = buildPrompt();
  // One step a line; the separator is shown escaped ("\n") so that it can be seen.
  const escaped = escapeHTML(JSON.stringify(demoSeparator).slice(1, -1));
  const separator = demoSeparator ? `<span class="marker" title="this model's demonstration separator">${escaped}</span>` : "";
  $("#prompt-preview").innerHTML = escapeHTML(prompt)
    .replaceAll(escapeHTML(MEDIA), `<span class="marker">${escapeHTML(MEDIA)}</span>`)
    .replaceAll(escapeHTML(EOC + demoSeparator), `<span class="marker">${escapeHTML(EOC)}</span>${separator}\n`)
    || "<em>(empty)</em>";
}

// -- generation ------------------------------------------------------------------------------------
function setStatus(state, text) {
  const el = $("#status");
  el.dataset.state = state;
  el.textContent = text || state;
}

function showError(message) {
  const out = $("#output");
  out.classList.remove("streaming");
  out.classList.add("error");
  out.textContent = message;
  setStatus("error", "error");
}

// A settings field's number; its default when left empty. A value out of range goes to the server as
// typed, which says what is wrong (0 max tokens was sent as 32, top-p 0 as 1, without a word).
function numberField(sel, fallback) {
  const v = $(sel).value.trim();
  return v === "" ? fallback : Number(v);
}

async function generate() {
  const { prompt, images, sources } = buildPrompt();
  if (!prompt.trim() && !images.length) { showError("The prompt is empty: add an image or some text."); return; }
  const out = $("#output");
  out.classList.remove("error");
  out.classList.add("streaming");
  out.textContent = "";
  $("#usage").textContent = "";
  const stop = $("#stop").value;
  const body = {
    model: modelId || undefined,
    prompt,
    images,
    max_tokens: numberField("#max-tokens", 32),
    temperature: numberField("#temperature", 0),
    top_p: numberField("#top-p", 1),
    stream: true,
    stream_options: { include_usage: true },
  };
  if (stop) body.stop = [stop];
  controller = new AbortController();
  $("#generate").disabled = true;
  $("#stop-btn").disabled = false;
  setStatus("streaming", "waiting…");
  const t0 = performance.now();
  let firstTokenAt = null, finish = null, usage = null, complete = false;
  try {
    const resp = await fetch("/v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) {
      let msg = `HTTP ${resp.status}`;
      try { const j = await resp.json(); if (j.error) msg += `: ${errorMessage(j.error, sources)}`; } catch (e) { /* not JSON */ }
      showError(msg);
      return;
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { complete = true; continue; }
          const msg = JSON.parse(data);
          if (msg.error) { showError(errorMessage(msg.error, sources)); return; }
          if (msg.usage) usage = msg.usage;
          for (const choice of msg.choices || []) {
            if (choice.text) {
              if (firstTokenAt === null) { firstTokenAt = performance.now(); setStatus("streaming", "streaming…"); }
              out.textContent += choice.text;
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
    // A stream that ends without [DONE] was cut (the server went away, a proxy closed it): not an
    // answer that ended, which the page showed it as.
    if (!complete) {
      const partial = out.textContent;
      showError("the connection closed before the answer was finished" + (partial ? `; what came: ${partial}` : ""));
      return;
    }
    out.classList.remove("streaming");
    const secs = ((performance.now() - t0) / 1000).toFixed(2);
    setStatus("done", `done (${finish || "stop"}) in ${secs}s`);
    if (!out.textContent) out.innerHTML = '<span class="prefix">(the model ended its answer at once)</span>';
    if (usage) $("#usage").textContent = `${usage.prompt_tokens} prompt tokens · ${usage.completion_tokens} generated · ${images.length} image(s)`;
  } catch (e) {
    if (e.name === "AbortError") { out.classList.remove("streaming"); setStatus("idle", "stopped"); }
    else showError(`request failed: ${e.message}`);
  } finally {
    $("#generate").disabled = false;
    $("#stop-btn").disabled = true;
    controller = null;
  }
}

// -- wiring ----------------------------------------------------------------------------------------
$("#add-shot").addEventListener("click", () => $(".shot-text", addShot()).focus());
// Images added to the page as a whole (the "Add images" button, a drop outside the steps) go to the
// last step while it has no image, whatever its text (the fresh page's query "Output:"), then to a new
// step each: a step left with text and no image would go to the model as a text-only demonstration
// before them.
function stepForNewImage() {
  const last = shotsEl.lastElementChild;
  return last && !last.dataset.image ? last : addShot();
}
$("#add-files").addEventListener("change", async (e) => {
  for (const f of [...e.target.files]) await setImage(stepForNewImage(), f);
  e.target.value = "";
});
$("#clear").addEventListener("click", () => { shotsEl.innerHTML = ""; addShot("Output:"); });
$("#generate").addEventListener("click", generate);
$("#stop-btn").addEventListener("click", () => controller && controller.abort());
document.addEventListener("keydown", (e) => { if ((e.ctrlKey || e.metaKey) && e.key === "Enter") generate(); });
// Files dropped outside a step fill the last step if it has no image, then add one step per image.
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", async (e) => {
  e.preventDefault();
  for (const f of [...e.dataTransfer.files].filter((f) => !f.type || f.type.startsWith("image/"))) await setImage(stepForNewImage(), f);
});

addShot("Output:");
fetch("/v1/models").then((r) => r.json()).then((j) => {
  const m = j.data && j.data[0];
  if (m) {
    modelId = m.id;
    demoSeparator = m.demo_separator || "";
    $("#model-info").textContent = `${m.id} · context ${m.max_model_len}`;
    refresh();
  }
}).catch(() => { $("#model-info").textContent = "server unreachable"; });
