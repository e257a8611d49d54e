// On-device prediction: the stable version's browser variant run by LiteRT.js (WebAssembly,
// CPU, one thread) on the same 28x28 input the server computes (mnist-preprocess.js).
// Everything is served by the service itself: the runtime from /static/vendor/ (vendored from
// npm, see static/vendor/vendor.json), the model from /models/<version>/browser-model with
// the API key. The model's bytes are checked against the SHA-256 of its model card before use.
"use strict";

import { loadLiteRt, loadAndCompile, supportsFeature, Tensor } from "/static/vendor/litertjs-core-2.5.3/dist/index.js";
import { BlankImage, mnistInput, MNIST_SIZE } from "/static/mnist-preprocess.js";

export { BlankImage };

// The plain build (relaxed SIMD, no threads): threads would need cross-origin isolation and
// one thread runs this model in about a millisecond.
const RUNTIME_SCRIPT = "/static/vendor/litertjs-core-2.5.3/wasm/litert_wasm_internal.js";
// The kinds /predict takes, recognised from the bytes as the server does (never the name).
const SIGNATURES = [
  { kind: "png", bytes: [0x89, 0x50, 0x4e, 0x47] },
  { kind: "jpeg", bytes: [0xff, 0xd8, 0xff] },
  { kind: "gif", bytes: [0x47, 0x49, 0x46, 0x38] },
  { kind: "bmp", bytes: [0x42, 0x4d] },
];
// The server's limits: bigger files get the server's own answer (its 413), not a device one.
const MAX_UPLOAD_BYTES = 10 * 1024 * 1024;
const MAX_IMAGE_PIXELS = 50000000;

export class DeviceUnavailable extends Error {
  constructor(reason) {
    super(reason);
    this.reason = reason;
  }
}

let runtime = null; // the promise of the loaded runtime, once asked for
let current = null; // { modelVersion, sha256, model }

// Why this browser cannot run the model, or "" if it can.
export async function unsupportedReason() {
  if (typeof WebAssembly !== "object") return "no WebAssembly";
  if (!globalThis.crypto || !crypto.subtle) return "no Web Crypto to check the model";
  if (typeof createImageBitmap !== "function") return "no image decoding";
  try {
    if (!(await supportsFeature("relaxedSimd"))) return "no WebAssembly relaxed SIMD";
  } catch {
    return "no WebAssembly relaxed SIMD";
  }
  return "";
}

async function loadRuntime() {
  if (runtime === null) {
    runtime = (async () => {
      const reason = await unsupportedReason();
      if (reason) throw new DeviceUnavailable(reason);
      await loadLiteRt(RUNTIME_SCRIPT);
    })();
    runtime.catch(() => {
      runtime = null; // a later attempt (e.g. back online) may try again
    });
  }
  return runtime;
}

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

// Load (or keep) the browser variant `info` = { model_version, url, sha256 } from the listing.
export async function loadModel(info, apiKey) {
  if (current && current.modelVersion === info.model_version && current.sha256 === info.sha256) {
    return current.modelVersion;
  }
  await loadRuntime();
  let response;
  try {
    response = await fetch(info.url, { headers: { "x-api-key": apiKey } });
  } catch {
    throw new DeviceUnavailable("the model could not be downloaded");
  }
  if (!response.ok) throw new DeviceUnavailable(`the model could not be downloaded (HTTP ${response.status})`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  const digest = hex(await crypto.subtle.digest("SHA-256", bytes));
  if (digest !== info.sha256) throw new DeviceUnavailable("the downloaded model does not match its SHA-256");
  const model = await loadAndCompile(bytes, { accelerator: "wasm" });
  if (current) current.model.delete();
  current = { modelVersion: info.model_version, sha256: digest, model };
  return current.modelVersion;
}

export function loadedVersion() {
  return current ? current.modelVersion : null;
}

// The model on one MNIST field: probabilities, as the server computes them (softmax of the
// dequantized logits, in float64).
export async function runField(field) {
  if (!current) throw new DeviceUnavailable("the model is not loaded");
  const input = new Tensor(field, [1, MNIST_SIZE, MNIST_SIZE, 1]);
  let outputs;
  try {
    outputs = await current.model.run(input);
  } finally {
    input.delete();
  }
  const logits = Array.from(outputs[0].toTypedArray());
  for (const output of outputs) output.delete();
  const top = Math.max(...logits);
  const exp = logits.map((x) => Math.exp(x - top));
  const sum = exp.reduce((a, b) => a + b, 0);
  return exp.map((x) => x / sum);
}

function answer(probabilities, started) {
  let digit = 0;
  for (let d = 1; d < probabilities.length; d++) if (probabilities[d] > probabilities[digit]) digit = d;
  return {
    prediccion: digit,
    probabilidad: probabilities[digit],
    probabilities,
    model_version: current.modelVersion,
    where: "device",
    ms: performance.now() - started,
  };
}

// Predict decoded RGBA pixels (a canvas's ImageData, or a decoded upload).
export async function predictPixels(rgba, width, height, options = {}) {
  const started = options.started ?? performance.now();
  const field = mnistInput(rgba, width, height, options);
  return answer(await runField(field), started);
}

// Predict the page's canvas as the server would see its PNG.
export async function predictCanvas(canvas) {
  const started = performance.now();
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  return predictPixels(pixels.data, pixels.width, pixels.height, { started });
}

// The upload's kind from its first bytes, or null when /predict would not take it as is.
export async function uploadKind(blob) {
  if (blob.size === 0 || blob.size > MAX_UPLOAD_BYTES) return null;
  const head = new Uint8Array(await blob.slice(0, 16).arrayBuffer());
  for (const { kind, bytes } of SIGNATURES) {
    if (bytes.every((b, i) => head[i] === b)) return kind;
  }
  const riff = String.fromCharCode(...head.slice(0, 4)) === "RIFF";
  if (riff && String.fromCharCode(...head.slice(8, 12)) === "WEBP") return "webp";
  return null;
}

// Decode an upload upright (EXIF orientation applied, as the server does), without colour
// management (Pillow applies none), and predict it. Null when the server should answer
// instead (a kind or size it refuses, or bytes the browser cannot decode).
export async function predictBlob(blob) {
  const started = performance.now();
  const kind = await uploadKind(blob);
  if (kind === null) return null;
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, {
      imageOrientation: "from-image",
      premultiplyAlpha: "none",
      colorSpaceConversion: "none",
    });
  } catch {
    return null; // corrupt or truncated: the server's answer says why
  }
  try {
    if (bitmap.width * bitmap.height > MAX_IMAGE_PIXELS) return null;
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    const pixels = ctx.getImageData(0, 0, bitmap.width, bitmap.height);
    return await predictPixels(pixels.data, pixels.width, pixels.height, { started, jpeg: kind === "jpeg" });
  } finally {
    bitmap.close();
  }
}
