// The page of `refseg serve`: pick or drop an image, type a phrase, POST /v1/segment?attn=1, draw the
// mask (COCO RLE, decoded here) over the image and the attention heat map, offer the mask as a PNG.
"use strict";

const $ = (id) => document.getElementById(id);
let imageFile = null;
let imageBitmap = null;

function setStatus(msg, isError) {
  $("status").textContent = msg;
  $("status").className = isError ? "error" : "";
}

// COCO compressed RLE string -> run lengths (the inverse of pycocotools' rleToString)
function rleCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// {size: [h, w], counts} -> Uint8Array(h * w), row-major, 1 = object (RLE runs are column-major)
function decodeMask(rle) {
  const [h, w] = rle.size;
  const mask = new Uint8Array(h * w);
  let i = 0, value = 0;
  for (const run of rleCounts(rle.counts)) {
    if (value) {
      for (let j = i; j < i + run; j++) mask[(j % h) * w + Math.floor(j / h)] = 1;
    }
    i += run;
    value ^= 1;
  }
  return mask;
}

function jet(v) {  // [0, 1] -> [r, g, b] like refseg.infer.visualize.heatmap
  const f = (o) => Math.round(255 * Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - o))));
  return [f(3), f(2), f(1)];
}

function drawOverlay(mask, w, h) {
  const c = $("overlay");
  c.width = w; c.height = h;
  const ctx = c.getContext("2d");
  ctx.drawImage(imageBitmap, 0, 0, w, h);
  const img = ctx.getImageData(0, 0, w, h);
  let area = 0;
  for (let i = 0; i < w * h; i++) {
    if (!mask[i]) continue;
    area++;
    img.data[4 * i] = Math.round(0.5 * img.data[4 * i] + 0.5 * 255);
    img.data[4 * i + 1] = Math.round(0.5 * img.data[4 * i + 1] + 0.5 * 40);
    img.data[4 * i + 2] = Math.round(0.5 * img.data[4 * i + 2] + 0.5 * 40);
  }
  ctx.putImageData(img, 0, 0);
  return area;
}

function drawHeatmap(attn, w, h) {
  const c = $("heatmap");
  c.width = w; c.height = h;
  const ctx = c.getContext("2d");
  if (!attn) { ctx.clearRect(0, 0, w, h); return; }
  const [ah, aw] = attn.size;
  const lo = Math.min(...attn.values), hi = Math.max(...attn.values);
  const small = document.createElement("canvas");
  small.width = aw; small.height = ah;
  const sctx = small.getContext("2d");
  const cells = sctx.createImageData(aw, ah);
  attn.values.forEach((v, i) => {
    const [r, g, b] = jet(hi > lo ? (v - lo) / (hi - lo) : 0);
    cells.data.set([r, g, b, 255], 4 * i);
  });
  sctx.putImageData(cells, 0, 0);
  ctx.drawImage(imageBitmap, 0, 0, w, h);
  ctx.globalAlpha = 0.6;
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, w, h);
  ctx.globalAlpha = 1;
}

function offerDownload(mask, w, h) {
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(w, h);
  for (let i = 0; i < w * h; i++) {
    const v = mask[i] ? 255 : 0;
    img.data.set([v, v, v, 255], 4 * i);
  }
  ctx.putImageData(img, 0, 0);
  c.toBlob((blob) => {
    const a = $("download");
    if (a.href.startsWith("blob:")) URL.revokeObjectURL(a.href);
    a.href = URL.createObjectURL(blob);
    a.hidden = false;
  }, "image/png");
}

async function pickImage(file) {
  if (!file) return;
  imageFile = file;
  try {
    imageBitmap = await createImageBitmap(file);
  } catch (e) {
    imageBitmap = null;
    setStatus(`${file.name} could not be read as an image; pick a JPEG or PNG file`, true);
    return;
  }
  const c = $("overlay");
  c.width = imageBitmap.width; c.height = imageBitmap.height;
  c.getContext("2d").drawImage(imageBitmap, 0, 0);
  setStatus(`${file.name}: ${imageBitmap.width}x${imageBitmap.height}`, false);
}

async function segment(ev) {
  ev.preventDefault();
  const text = $("text").value.trim();
  if (!imageFile) return setStatus("pick or drop an image first", true);
  if (!text) return setStatus("type a referring expression first", true);
  const body = new FormData();
  body.append("image", imageFile);
  body.append("text", text);
  setStatus("segmenting...", false);
  $("submit").disabled = true;
  try {
    const r = await fetch("v1/segment?attn=1", { method: "POST", body });
    const out = await r.json();
    if (!r.ok) return setStatus(`error ${r.status}: ${out.error || out.detail || r.statusText}`, true);
    const mask = decodeMask(out.mask);
    const area = drawOverlay(mask, out.width, out.height);
    drawHeatmap(out.attn, out.width, out.height);
    offerDownload(mask, out.width, out.height);
    const extra = out.no_target_prob === undefined ? "" : `, no-target probability ${out.no_target_prob.toFixed(3)}`;
    setStatus(`done: mask ${area} px of ${out.width * out.height}, score ${out.score.toFixed(3)}${extra}, ` +
              `${out.latency_ms} ms`, false);
    document.body.dataset.maskArea = String(area);
  } catch (e) {
    setStatus(`request failed: ${e}`, true);
  } finally {
    $("submit").disabled = false;
  }
}

$("file").addEventListener("change", (e) => pickImage(e.target.files[0]));
$("form").addEventListener("submit", segment);
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  pickImage(e.dataTransfer.files[0]);
});
fetch("v1/model").then((r) => r.json()).then((m) => {
  $("model").textContent = `model: ${m.preset || "custom"} at ${m.image_size} px, checkpoint ` +
    `${m.checkpoint_sha256.slice(0, 12)}, refseg ${m.refseg_version}`;
}).catch(() => { $("model").textContent = "model info unavailable"; });
