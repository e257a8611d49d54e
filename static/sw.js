// The page's service worker (served at /sw.js so its scope is the whole site): after one
// visit the page, its scripts, the LiteRT.js runtime and the stable version's browser model
// are kept here, so reloading without a connection still predicts on the device.
//
// - The page and its own scripts: network first (a new release shows on the next online
//   visit; the request revalidates, so an unchanged file costs a 304), the kept copy offline.
// - The vendored runtime (/static/vendor/<package>-<version>/): kept copy first; its path
//   names its version, so it never changes in place.
// - A browser model (/models/<version>/browser-model): kept copy first. Fetching a new one
//   (the stable version changed) drops the others. The page checks its SHA-256 either way.
// - Everything else (the API) goes to the network untouched.
"use strict";

const SHELL_CACHE = "mnist-shell-v1";
const MODEL_CACHE = "mnist-models-v1";
const SHELL = ["/", "/static/app.js", "/static/app.css", "/static/device.js", "/static/mnist-preprocess.js"];
const MODEL_PATH = /^\/models\/[^/]+\/browser-model$/;

self.addEventListener("install", (event) => {
  // The shell was just downloaded by the page: these requests revalidate (304), not refetch.
  event.waitUntil(caches.open(SHELL_CACHE).then((cache) => cache.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    (async () => {
      for (const name of await caches.keys()) {
        if (name !== SHELL_CACHE && name !== MODEL_CACHE) await caches.delete(name);
      }
      await self.clients.claim(); // the first visit's page is controlled from now on
    })(),
  );
});

async function networkFirst(request, key) {
  const cache = await caches.open(SHELL_CACHE);
  try {
    const response = await fetch(request, { cache: "no-cache" });
    if (response.ok) await cache.put(key, response.clone());
    return response;
  } catch (err) {
    const kept = await cache.match(key);
    if (kept) return kept;
    throw err;
  }
}

async function keptFirst(request) {
  const cache = await caches.open(SHELL_CACHE);
  const kept = await cache.match(request);
  if (kept) return kept;
  const response = await fetch(request);
  if (response.ok) await cache.put(request, response.clone());
  return response;
}

async function model(request) {
  const cache = await caches.open(MODEL_CACHE);
  const kept = await cache.match(request);
  if (kept) return kept;
  const response = await fetch(request);
  if (response.ok) {
    // One model at a time: the one the page asks for now is the stable version's.
    for (const old of await cache.keys()) await cache.delete(old);
    await cache.put(request, response.clone());
  }
  return response;
}

self.addEventListener("fetch", (event) => {
  const request = event.request;
  const url = new URL(request.url);
  if (request.method !== "GET" || url.origin !== self.location.origin) return;
  if (request.mode === "navigate" && url.pathname === "/") {
    event.respondWith(networkFirst(request, "/"));
  } else if (MODEL_PATH.test(url.pathname)) {
    event.respondWith(model(request));
  } else if (url.pathname.startsWith("/static/vendor/")) {
    event.respondWith(keptFirst(request));
  } else if (SHELL.includes(url.pathname)) {
    event.respondWith(networkFirst(request, url.pathname));
  }
});
