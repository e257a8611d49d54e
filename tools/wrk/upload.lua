-- wrk script for the benchmark: POST an upload, or GET a route, and print a JSON summary.
-- args: method path content-type mode api-key body-file run-id [extra-header]
--   mode "fixed": the same bytes every time (cache hits)
--   mode "nonce": bytes appended after the image's end (PNG IEND / JPEG EOI), so every
--                 request is a new cache key for the same picture (cache misses)
--   mode "batch": a multipart body whose parts carry the marker @@NONCE@@, replaced per part
--   mode "padded": like "batch", but the marker is PADDED_MARKER and its replacement has
--                  the same length, so binary sizes stated in the body stay true (V2 infer)
--   extra-header: one more "Name: value" header (V2's Inference-Header-Content-Length)
local threads = {}
local PADDED_MARKER = "@@NONCE@@#######################"  -- 32 bytes, as in tools/bench.py
local next_id = 1

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  method, path, ctype, mode, key, file, run = args[1], args[2], args[3], args[4], args[5], args[6], args[7]
  extra = args[8]
  body = ""
  if file ~= nil and file ~= "" then
    local handle = io.open(file, "rb")
    body = handle:read("*all")
    handle:close()
  end
  counter = 0
  headers = {}
  if key ~= "" then headers["x-api-key"] = key end
  if ctype ~= "" then headers["Content-Type"] = ctype end
  if extra ~= nil and extra ~= "" then
    local name, value = extra:match("^([^:]+):%s*(.*)$")
    headers[name] = value
  end
end

function request()
  counter = counter + 1
  local payload = body
  if mode == "nonce" then
    payload = body .. string.format("%s-%d-%d", run, id, counter)
  elseif mode == "batch" then
    local part = 0
    payload = string.gsub(body, "@@NONCE@@", function()
      part = part + 1
      return string.format("%s-%d-%d-%d", run, id, counter, part)
    end)
  elseif mode == "padded" then
    local part = 0
    payload = string.gsub(body, PADDED_MARKER, function()
      part = part + 1
      local nonce = string.format("%s-%d-%d-%d", run, id, counter, part)
      return string.sub(nonce .. string.rep("#", #PADDED_MARKER), 1, #PADDED_MARKER)
    end)
  end
  if method == "GET" then
    return wrk.format("GET", path, headers)
  end
  return wrk.format("POST", path, headers, payload)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"mean_us": %f}\n',
    summary.requests, summary.duration, summary.bytes, errors.connect, errors.read,
    errors.write, errors.status, errors.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.mean))
end
