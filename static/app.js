// Browser page of the MNIST service: draw or upload a digit, predict it on this device (the
// stable version's browser variant, run by LiteRT.js: static/device.js) or on the server
// (POST /predict), show the answer and where it came from. Offline after one visit (the
// service worker, static/sw.js). Plain JS with no build step; every asset is served by the
// app itself (no CDN).
"use strict";

(() => {
  const KEY_STORAGE = "mnist-api-key";
  const WHERE_STORAGE = "mnist-where"; // auto | device | server
  const MODEL_STORAGE = "mnist-device-model"; // the stable version's browser model, for offline
  const QUEUE_DB = "mnist-page";
  const QUEUE_STORE = "feedback-queue";
  const SIZE = 280; // drawing space in CSS px, whatever the canvas is shrunk to on screen
  const STROKE_WIDTH = 19;
  const REQUEST_TIMEOUT_MS = 30000;

  const $ = (id) => document.getElementById(id);
  const form = $("predict-form");
  const keyInput = $("api-key");
  const canvas = $("canvas");
  const fileInput = $("file-input");
  const clearButton = $("clear-button");
  const predictButton = $("predict-button");
  const sourceHint = $("source-hint");
  const errorBox = $("error");
  const resultRegion = $("result");
  const resultEmpty = $("result-empty");
  const resultBody = $("result-body");
  const chart = $("chart");
  const feedbackBox = $("feedback");
  const feedbackAsk = $("feedback-ask");
  const feedbackDigits = $("feedback-digits");
  const feedbackThanks = $("feedback-thanks");
  const feedbackError = $("feedback-error");
  const deviceStatus = $("device-status");
  const ctx = canvas.getContext("2d", { willReadFrequently: true });

  // The upload the last answer was about: feedback sends these same bytes, and names the
  // version that answered, so the service scores exactly what the person judged.
  let judged = null; // { blob, filename, predicted, modelVersion, predictionId, where }

  // ---- API key, kept in localStorage ----

  // Storage can be disabled (privacy settings, some private modes): the field still works
  // for this visit, it just is not remembered.
  function loadStored(name) {
    try {
      return localStorage.getItem(name) || "";
    } catch {
      return "";
    }
  }

  function store(name, value) {
    try {
      localStorage.setItem(name, value);
    } catch {
      /* see loadStored */
    }
  }

  keyInput.value = loadStored(KEY_STORAGE);
  keyInput.addEventListener("input", () => store(KEY_STORAGE, keyInput.value.trim()));
  // A new key may unlock the model download (the model is served to key holders only).
  keyInput.addEventListener("change", () => startDevice());

  // ---- Canvas drawing ----

  function setUpCanvas() {
    // Back the canvas with device pixels so strokes stay sharp on high-density screens;
    // the transform lets the rest of the code think in 280x280 CSS px.
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(SIZE * ratio);
    canvas.height = Math.round(SIZE * ratio);
    ctx.setTransform(canvas.width / SIZE, 0, 0, canvas.height / SIZE, 0, 0);
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = STROKE_WIDTH;
    ctx.strokeStyle = "#000";
    clearCanvas();
  }

  function clearCanvas() {
    // An opaque white background, so the PNG is black-on-white like a digit on paper.
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, SIZE, SIZE);
    ctx.fillStyle = "#000";
  }

  function toCanvasPoint(event) {
    // The canvas can be narrower than 280 px on a phone; clientLeft/Top skip its border.
    const rect = canvas.getBoundingClientRect();
    const x = event.clientX - rect.left - canvas.clientLeft;
    const y = event.clientY - rect.top - canvas.clientTop;
    return { x: (x * SIZE) / canvas.clientWidth, y: (y * SIZE) / canvas.clientHeight };
  }

  let last = null; // last point of the stroke in progress, null when the pen is up

  function startStroke(point) {
    // Drawing shows the person wants the drawing predicted, not a file chosen earlier.
    if (chosenFile()) clearFile();
    last = point;
    // A zero-length line draws nothing, so a tap is drawn as a dot.
    ctx.beginPath();
    ctx.arc(point.x, point.y, STROKE_WIDTH / 2, 0, 2 * Math.PI);
    ctx.fill();
  }

  function extendStroke(point) {
    if (!last) return;
    ctx.beginPath();
    ctx.moveTo(last.x, last.y);
    ctx.lineTo(point.x, point.y);
    ctx.stroke();
    last = point;
  }

  function endStroke() {
    last = null;
  }

  if (window.PointerEvent) {
    // One code path for mouse, pen and touch; CSS touch-action: none stops the page from
    // scrolling under the finger.
    let activePointer = null;
    canvas.addEventListener("pointerdown", (event) => {
      if (activePointer !== null || event.button !== 0) return;
      event.preventDefault();
      activePointer = event.pointerId;
      canvas.setPointerCapture(event.pointerId); // keep the stroke when leaving the canvas
      startStroke(toCanvasPoint(event));
    });
    canvas.addEventListener("pointermove", (event) => {
      if (event.pointerId !== activePointer) return;
      // Coalesced events give the points the browser merged between frames: smoother lines.
      const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
      for (const e of events.length ? events : [event]) extendStroke(toCanvasPoint(e));
    });
    const stop = (event) => {
      if (event.pointerId !== activePointer) return;
      activePointer = null;
      endStroke();
    };
    canvas.addEventListener("pointerup", stop);
    canvas.addEventListener("pointercancel", stop);
  } else {
    // Older mobile browsers (iOS Safari before 13) have touch events but no Pointer Events.
    const touch = (handler) => (event) => {
      event.preventDefault(); // no scrolling or zooming while drawing
      handler(toCanvasPoint(event.changedTouches[0]));
    };
    canvas.addEventListener("touchstart", touch(startStroke), { passive: false });
    canvas.addEventListener("touchmove", touch(extendStroke), { passive: false });
    canvas.addEventListener("touchend", endStroke);
    canvas.addEventListener("touchcancel", endStroke);
    canvas.addEventListener("mousedown", (event) => startStroke(toCanvasPoint(event)));
    window.addEventListener("mousemove", (event) => extendStroke(toCanvasPoint(event)));
    window.addEventListener("mouseup", endStroke);
  }

  // ---- File choice ----

  function chosenFile() {
    return (fileInput.files && fileInput.files[0]) || null;
  }

  function clearFile() {
    fileInput.value = "";
    updateSourceHint();
  }

  function updateSourceHint() {
    const file = chosenFile();
    sourceHint.textContent = file
      ? `Predict will send ${file.name}. Draw or press Clear to use the canvas instead.`
      : "Predict will send the drawing.";
  }

  fileInput.addEventListener("change", updateSourceHint);
  clearButton.addEventListener("click", () => {
    clearCanvas();
    clearFile();
  });

  // ---- Where to predict: this device or the server ----

  let device = null; // the static/device.js module, once imported
  let deviceReady = Promise.resolve(false); // settles to true when the model is loaded
  let deviceReason = ""; // why this device cannot predict, shown with server answers

  function whereChoice() {
    const checked = document.querySelector("input[name=where]:checked");
    return checked ? checked.value : "auto";
  }

  function setDeviceState(state, text) {
    document.documentElement.dataset.device = state; // checking | ready | unavailable | off
    deviceStatus.textContent = text;
  }

  function shortVersion(modelVersion) {
    return modelVersion.replace(/^mnist-cnn-int8-/, "");
  }

  // The stable version's browser model: from GET /models when online (and remembered), else
  // the remembered one (offline, or no key yet).
  async function stableBrowserModel(key) {
    if (key) {
      try {
        const response = await fetch("/models", { headers: { "x-api-key": key } });
        const data = await readJson(response);
        if (response.ok && data && Array.isArray(data.models)) {
          const stable = data.models.find((m) => m.role === "stable");
          const info = stable && stable.browser_model
            ? { model_version: stable.model_version, url: stable.browser_model.url, sha256: stable.browser_model.sha256 }
            : null;
          store(MODEL_STORAGE, info ? JSON.stringify(info) : "");
          return info;
        }
        if (response.status === 401) throw new Error("the API key was not accepted");
      } catch (err) {
        if (!(err instanceof TypeError)) throw err; // a refused key, not a lost connection
        /* offline: the remembered model */
      }
    }
    try {
      return JSON.parse(loadStored(MODEL_STORAGE) || "null");
    } catch {
      return null;
    }
  }

  async function loadDevice() {
    if (whereChoice() === "server") {
      setDeviceState("off", "Answers come from the server.");
      return false;
    }
    setDeviceState("checking", "Getting the model for this device…");
    try {
      device = device || (await import("/static/device.js"));
      const reason = await device.unsupportedReason();
      if (reason) throw new Error(reason);
      const key = keyInput.value.trim();
      const info = await stableBrowserModel(key);
      if (!info) throw new Error(key ? "the service offers no model for this device" : "no API key yet to download the model");
      const version = await device.loadModel(info, key);
      deviceReason = "";
      setDeviceState("ready", `Model ${shortVersion(version)} runs on this device, also offline.`);
      return true;
    } catch (err) {
      deviceReason = (err && (err.reason || err.message)) || "the runtime did not load";
      setDeviceState("unavailable", `This device cannot run the model (${deviceReason}); answers come from the server.`);
      return false;
    }
  }

  function startDevice() {
    deviceReady = deviceReady.then(loadDevice, loadDevice);
    return deviceReady;
  }

  const savedWhere = loadStored(WHERE_STORAGE);
  for (const input of document.querySelectorAll("input[name=where]")) {
    if (input.value === savedWhere) input.checked = true;
    input.addEventListener("change", () => {
      store(WHERE_STORAGE, whereChoice());
      startDevice();
    });
  }

  // On the first visit, wait (briefly) until the service worker controls the page, so the
  // runtime and the model pass through it and are kept for offline use, not fetched twice.
  async function registerServiceWorker() {
    if (!("serviceWorker" in navigator)) return;
    try {
      await navigator.serviceWorker.register("/sw.js");
      if (navigator.serviceWorker.controller) return;
      await Promise.race([
        new Promise((resolve) => navigator.serviceWorker.addEventListener("controllerchange", resolve, { once: true })),
        new Promise((resolve) => setTimeout(resolve, 3000)),
      ]);
    } catch {
      /* no offline use (e.g. a private window); the page still works online */
    }
  }

  // ---- Prediction ----

  function canvasBlob() {
    return new Promise((resolve, reject) => {
      canvas.toBlob((blob) => {
        if (blob) resolve(blob);
        else reject(Object.assign(new Error("toBlob failed"), { userMessage: "Could not read the drawing; try again." }));
      }, "image/png");
    });
  }

  async function postWithTimeout(url, options) {
    // A hung connection would otherwise leave the button disabled for minutes.
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    try {
      return await fetch(url, { ...options, method: "POST", signal: controller.signal });
    } finally {
      clearTimeout(timer);
    }
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch {
      return null; // e.g. an HTML error page from a proxy in front of the service
    }
  }

  function errorMessage(response, data, source) {
    const code = data && data.code;
    if (code === "unauthorized") {
      return "The API key was not accepted. Enter a valid API key and try again.";
    }
    if (code === "blank_image") {
      return source === "canvas"
        ? "The canvas is empty: draw a digit first."
        : "There is no digit in that image: it looks blank.";
    }
    if (code === "rate_limited") {
      const wait = response.headers.get("Retry-After");
      return /^\d+$/.test(wait || "")
        ? `Too many predictions in a short time. Try again in ${wait} seconds.`
        : "Too many predictions in a short time. Wait a moment and try again.";
    }
    if (data && typeof data.error === "string" && data.error) return data.error;
    return `The service answered with an unexpected error (HTTP ${response.status}). Try again in a moment.`;
  }

  // One decimal, but never round a near-certain answer up to "100.0%" or a tiny one to "0.0%".
  function percent(p) {
    if (p > 0.999 && p < 1) return ">99.9%";
    if (p > 0 && p < 0.001) return "<0.1%";
    return `${(p * 100).toFixed(1)}%`;
  }

  function renderChart(probabilities, predicted) {
    chart.replaceChildren(
      ...probabilities.map((p, digit) => {
        const bar = document.createElement("li");
        bar.className = digit === predicted ? "bar is-predicted" : "bar";
        const label = document.createElement("span");
        label.className = "bar-label";
        label.textContent = String(digit);
        const track = document.createElement("span");
        track.className = "bar-track";
        track.setAttribute("aria-hidden", "true"); // the value text says the same
        const fill = document.createElement("span");
        fill.className = "bar-fill";
        fill.style.width = `${Math.min(Math.max(p, 0), 1) * 100}%`;
        track.append(fill);
        const value = document.createElement("span");
        value.className = "bar-value";
        value.textContent = percent(p);
        bar.append(label, track, value);
        return bar;
      }),
    );
  }

  function duration(ms) {
    return ms < 10 ? `${ms.toFixed(1)} ms` : `${Math.round(ms)} ms`;
  }

  function showResult(result, note) {
    const onDevice = result.where === "device";
    $("result-digit").textContent = String(result.prediccion);
    $("result-probability").textContent = percent(result.probabilidad);
    $("result-where").textContent = onDevice ? "on this device" : "by the server";
    $("result-model").textContent = result.model_version || "unknown";
    $("result-time").textContent = duration(result.ms);
    $("result-cached").textContent = onDevice ? "" : result.cached ? "cached answer" : "fresh answer";
    $("result-cached-sep").hidden = onDevice;
    const noteBox = $("result-note");
    noteBox.textContent = note || "";
    noteBox.hidden = !note;
    renderChart(result.probabilities, result.prediccion);
    resultEmpty.hidden = true;
    resultBody.hidden = false;
  }

  // ---- Feedback: "Right?" ----

  function resetFeedback() {
    feedbackBox.hidden = true;
    feedbackAsk.hidden = false;
    feedbackDigits.hidden = true;
    feedbackThanks.hidden = true;
    feedbackThanks.textContent = "";
    feedbackError.hidden = true;
    feedbackError.textContent = "";
    setFeedbackBusy(false);
  }

  function askFeedback(upload) {
    judged = upload;
    resetFeedback();
    feedbackBox.hidden = false;
  }

  function setFeedbackBusy(busy) {
    for (const button of feedbackBox.querySelectorAll("button")) button.disabled = busy;
  }

  function feedbackErrorMessage(response, data) {
    const code = data && data.code;
    if (code === "feedback_unavailable") {
      return "Your answer could not be saved right now (predictions still work). Try again in a moment.";
    }
    if (code === "unauthorized") return "The API key was not accepted, so the answer was not saved.";
    if (code === "rate_limited") return "Too many requests in a short time. Wait a moment and try again.";
    if (data && typeof data.error === "string" && data.error) return data.error;
    return `The answer could not be saved (HTTP ${response.status}). Try again in a moment.`;
  }

  // Send one judgement. An on-device answer first gets the server's own answer for the same
  // version (POST /predict?model_version=), whose prediction_id is what /feedback credits:
  // the service never takes the page's word for what was predicted.
  async function deliverFeedback(item, key) {
    const headers = { "x-api-key": key };
    if (!item.predictionId) {
      const body = new FormData();
      body.append("file", item.blob, item.filename);
      const url = `/predict?model_version=${encodeURIComponent(item.modelVersion)}`;
      const response = await postWithTimeout(url, { headers, body });
      const data = await readJson(response);
      if (!response.ok || !data) return { response, data };
      item.predictionId = data.prediction_id || "";
    }
    const body = new FormData();
    body.append("file", item.blob, item.filename);
    body.append("label", String(item.label));
    body.append("model_version", item.modelVersion);
    if (item.predictionId) body.append("prediction_id", item.predictionId);
    const response = await postWithTimeout("/feedback", { headers, body });
    return { response, data: await readJson(response) };
  }

  // ---- Feedback given offline: kept in IndexedDB, sent once when the connection returns ----

  function openQueue() {
    return new Promise((resolve, reject) => {
      const request = indexedDB.open(QUEUE_DB, 1);
      request.onupgradeneeded = () => request.result.createObjectStore(QUEUE_STORE, { keyPath: "id", autoIncrement: true });
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => reject(request.error);
    });
  }

  async function inQueue(mode, action) {
    const db = await openQueue();
    try {
      return await new Promise((resolve, reject) => {
        const tx = db.transaction(QUEUE_STORE, mode);
        const request = action(tx.objectStore(QUEUE_STORE));
        tx.oncomplete = () => resolve(request.result);
        tx.onerror = () => reject(tx.error);
      });
    } finally {
      db.close();
    }
  }

  function queueFeedback(item) {
    const { blob, filename, label, modelVersion, predictionId } = item;
    return inQueue("readwrite", (s) => s.add({ blob, filename, label, modelVersion, predictionId: predictionId || "" }));
  }

  let flushing = null;

  // Send what was queued, oldest first, each once: an item leaves the queue when the service
  // took it or refused it for good (4xx); it stays while the service cannot be reached.
  function flushFeedbackQueue() {
    if (flushing) return flushing;
    flushing = (async () => {
      const key = keyInput.value.trim();
      if (!key || !("indexedDB" in window)) return;
      const items = await inQueue("readonly", (s) => s.getAll());
      for (const item of items) {
        let outcome;
        try {
          outcome = await deliverFeedback(item, key);
        } catch {
          return; // still offline
        }
        const status = outcome.response.status;
        if (status === 401 || status === 429 || status >= 500) return; // try again later
        await inQueue("readwrite", (s) => s.delete(item.id));
      }
    })()
      .catch(() => {})
      .finally(() => {
        flushing = null;
      });
    return flushing;
  }

  window.addEventListener("online", () => flushFeedbackQueue());

  async function sendFeedback(label) {
    if (!judged) return;
    feedbackError.hidden = true;
    setFeedbackBusy(true);
    try {
      const key = keyInput.value.trim();
      let outcome;
      try {
        outcome = await deliverFeedback({ ...judged, label }, key);
      } catch (err) {
        if (err.name === "AbortError" || navigator.onLine) throw err;
        // Offline: keep it and send it when the connection returns.
        await queueFeedback({ ...judged, label });
        feedbackAsk.hidden = true;
        feedbackDigits.hidden = true;
        feedbackThanks.textContent = "Thank you! You are offline: your answer is kept and will be sent when the connection returns.";
        feedbackThanks.hidden = false;
        return;
      }
      const { response, data } = outcome;
      if (response.ok && data && typeof data.feedback_id === "number") {
        feedbackAsk.hidden = true;
        feedbackDigits.hidden = true;
        feedbackThanks.textContent = data.correct
          ? "Thank you! Glad it was right."
          : `Thank you! Noted: it was a ${data.label}. This helps the next model.`;
        feedbackThanks.hidden = false;
        return;
      }
      feedbackError.textContent = feedbackErrorMessage(response, data);
      feedbackError.hidden = false;
    } catch (err) {
      console.warn("feedback not sent", err);
      feedbackError.textContent = err.name === "AbortError"
        ? "The service took too long to answer; the answer was not saved."
        : "Could not reach the service; the answer was not saved.";
      feedbackError.hidden = false;
    } finally {
      setFeedbackBusy(false);
    }
  }

  $("feedback-yes").addEventListener("click", () => {
    if (judged) sendFeedback(judged.predicted);
  });
  $("feedback-no").addEventListener("click", () => {
    feedbackAsk.hidden = true;
    feedbackDigits.hidden = false;
    feedbackDigits.querySelector("button").focus();
  });
  feedbackDigits.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-digit]");
    if (button) sendFeedback(Number(button.dataset.digit));
  });

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  function resetOutput() {
    errorBox.hidden = true;
    errorBox.textContent = "";
    resultBody.hidden = true;
    resultEmpty.hidden = false;
    chart.replaceChildren();
    judged = null;
    resetFeedback();
  }

  function setBusy(busy) {
    predictButton.disabled = busy;
    predictButton.textContent = busy ? "Predicting…" : "Predict";
    resultRegion.setAttribute("aria-busy", String(busy));
    resultEmpty.textContent = busy ? "Predicting…" : "No prediction yet.";
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (predictButton.disabled) return; // Enter in the key field while a request is in flight
    resetOutput();
    const key = keyInput.value.trim();
    if (!key) {
      showError("Enter your API key first.");
      keyInput.focus();
      return;
    }
    const file = chosenFile();
    const source = file ? "file" : "canvas";
    setBusy(true);
    try {
      const filename = file ? file.name : "drawing.png";
      let note = "";
      if (whereChoice() !== "server") {
        const onDevice = await predictOnDevice(file);
        if (onDevice.blank) {
          showError(errorMessage(new Response(null, { status: 422 }), { code: "blank_image" }, source));
          return;
        }
        if (onDevice.result) {
          const upload = file || (await canvasBlob());
          showResult(onDevice.result);
          askFeedback({
            blob: upload,
            filename,
            predicted: onDevice.result.prediccion,
            modelVersion: onDevice.result.model_version,
            predictionId: "", // asked from the server when the person answers "Right?"
            where: "device",
          });
          return;
        }
        note = onDevice.note;
      }
      const started = performance.now();
      const upload = file || (await canvasBlob());
      const body = new FormData();
      body.append("file", upload, filename);
      const response = await postWithTimeout("/predict", { headers: { "x-api-key": key }, body });
      const data = await readJson(response);
      if (response.ok && data && Array.isArray(data.probabilities)) {
        showResult({ ...data, where: "server", ms: performance.now() - started }, note);
        askFeedback({
          blob: upload,
          filename,
          predicted: data.prediccion,
          modelVersion: data.model_version || response.headers.get("X-Model-Version") || "",
          predictionId: data.prediction_id || "",
          where: "server",
        });
        flushFeedbackQueue(); // the service is reachable: send anything kept offline
      } else showError(errorMessage(response, data, source));
    } catch (err) {
      if (err.userMessage) showError(err.userMessage);
      else if (err.name === "AbortError") showError("The service took too long to answer. Try again in a moment.");
      else showError("Could not reach the service. Check your connection and try again.");
    } finally {
      setBusy(false);
    }
  });

  // The answer on this device: { result } , { blank: true }, or { note } saying why the
  // server answers instead (said with the answer: the fallback is silent, not hidden).
  async function predictOnDevice(file) {
    const ready = await deviceReady;
    if (!ready || !device) return { note: `This device cannot run the model (${deviceReason || "not loaded"}), so the server answered.` };
    try {
      const result = file ? await device.predictBlob(file) : await device.predictCanvas(canvas);
      if (result) return { result };
      return { note: "The server checked this file (a kind or size this device does not predict)." };
    } catch (err) {
      if (err instanceof device.BlankImage) return { blank: true };
      return { note: `This device could not run the model (${err.message}), so the server answered.` };
    }
  }

  setUpCanvas();
  updateSourceHint(); // a file may still be selected after a reload (form restoration)
  setDeviceState("checking", "Checking whether this device can run the model…");
  deviceReady = registerServiceWorker().then(loadDevice);
  deviceReady.then(() => flushFeedbackQueue());
})();
