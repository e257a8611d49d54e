// Browser page of the MNIST service: draw or upload a digit, POST it to /predict, show the answer.
// Plain JS with no build step; every asset is served by the app itself (no CDN).
"use strict";

(() => {
  const KEY_STORAGE = "mnist-api-key";
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
  const ctx = canvas.getContext("2d");

  // The upload the last answer was about: feedback sends these same bytes with the answer's
  // signed prediction_id, so the service credits exactly the answer the person judged.
  let judged = null; // { blob, filename, predicted, modelVersion, predictionId }

  // ---- API key, kept in localStorage ----

  // Storage can be disabled (privacy settings, some private modes): the field still works
  // for this visit, it just is not remembered.
  function loadKey() {
    try {
      return localStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return "";
    }
  }

  function saveKey(value) {
    try {
      localStorage.setItem(KEY_STORAGE, value);
    } catch {
      /* see loadKey */
    }
  }

  keyInput.value = loadKey();
  keyInput.addEventListener("input", () => saveKey(keyInput.value.trim()));

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

  function showResult(result) {
    $("result-digit").textContent = String(result.prediccion);
    $("result-probability").textContent = percent(result.probabilidad);
    $("result-model").textContent = result.model_version || "unknown";
    $("result-cached").textContent = result.cached ? "cached answer" : "fresh answer";
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

  async function sendFeedback(label) {
    if (!judged) return;
    feedbackError.hidden = true;
    setFeedbackBusy(true);
    try {
      const body = new FormData();
      body.append("file", judged.blob, judged.filename);
      body.append("label", String(label));
      body.append("prediction_id", judged.predictionId);
      const key = keyInput.value.trim();
      const response = await postWithTimeout("/feedback", { headers: { "x-api-key": key }, body });
      const data = await readJson(response);
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
      const upload = file || (await canvasBlob());
      const filename = file ? file.name : "drawing.png";
      const body = new FormData();
      body.append("file", upload, filename);
      const response = await postWithTimeout("/predict", { headers: { "x-api-key": key }, body });
      const data = await readJson(response);
      if (response.ok && data && Array.isArray(data.probabilities)) {
        showResult(data);
        askFeedback({
          blob: upload,
          filename,
          predicted: data.prediccion,
          modelVersion: data.model_version || response.headers.get("X-Model-Version") || "",
          predictionId: data.prediction_id || "",
        });
      } else showError(errorMessage(response, data, source));
    } catch (err) {
      if (err.userMessage) showError(err.userMessage);
      else if (err.name === "AbortError") showError("The service took too long to answer. Try again in a moment.");
      else showError("Could not reach the service. Check your connection and try again.");
    } finally {
      setBusy(false);
    }
  });

  setUpCanvas();
  updateSourceHint(); // a file may still be selected after a reload (form restoration)
})();
