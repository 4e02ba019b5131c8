-- wrk script: replay a file of pre-signed webhook requests (bench/_webhook_load.py).
--
-- wrk -t THREADS ... -s _webhook_post.lua URL -- FILE RATE MODE THREADS
--   FILE  one request a line: svix-id TAB svix-timestamp TAB svix-signature TAB body
--   RATE  requests per second over all threads, 0 for as fast as the server answers
--   MODE  "once": every line exactly once, split between the threads, then each thread
--         prints "finished" and stops; "loop": round and round until wrk is stopped
-- done() prints one line "RESULT {json}" with the answers by status, the latency
-- percentiles (microseconds) and the monotonic times (ms) of the first request sent
-- and the last answer received.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock, bench_timespec *spec);
]]
local clock = ffi.new("bench_timespec")

local function now_ms()
  ffi.C.clock_gettime(1, clock) -- CLOCK_MONOTONIC, as Python's time.monotonic()
  return tonumber(clock.tv_sec) * 1000 + tonumber(clock.tv_nsec) / 1e6
end

local threads = {}
local count = 0

function setup(thread)
  count = count + 1
  thread:set("id", count)
  threads[#threads + 1] = thread
end

local reqs = {}
-- delay() reserves a request (several connections may wait on their delay at once), so
-- exactly one request() follows each delay() that does not idle.
local reserved, sent, answered = 0, 0, 0
local interval, start = 0, nil
local once = true
local running = false -- wrk calls request() once before the run, to check the script
statuses = {}
first_ms, last_ms = 0, 0

function init(args)
  local total = tonumber(args[4])
  local line_no = 0
  for line in io.lines(args[1]) do
    line_no = line_no + 1
    -- Thread k of n takes lines k, k + n, k + 2n ...
    if (line_no - id) % total == 0 then
      local svix_id, stamp, signature, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
      reqs[#reqs + 1] = wrk.format("POST", nil, {
        ["Content-Type"] = "application/json",
        ["svix-id"] = svix_id,
        ["svix-timestamp"] = stamp,
        ["svix-signature"] = signature,
      }, body)
    end
  end
  local rate = tonumber(args[2]) / total
  if rate > 0 then interval = 1000 / rate end
  once = args[3] == "once"
  io.stdout:write("ready " .. id .. " " .. #reqs .. "\n")
  io.stdout:flush()
end

function delay()
  running = true
  if once and reserved >= #reqs then
    return 3600000 -- nothing left to send: this connection idles until the thread stops
  end
  reserved = reserved + 1
  if interval == 0 then return 0 end
  local now = now_ms()
  if start == nil then start = now end
  local due = start + (reserved - 1) * interval - now
  return due > 0 and math.floor(due) or 0
end

function request()
  if not running then return reqs[1] end
  if sent == 0 then first_ms = now_ms() end
  sent = sent + 1
  return reqs[(sent - 1) % #reqs + 1]
end

function response(status, headers, body)
  answered = answered + 1
  last_ms = now_ms()
  statuses[status] = (statuses[status] or 0) + 1
  if once and answered >= #reqs then
    io.stdout:write("finished " .. id .. "\n")
    io.stdout:flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local by_status, first, last = {}, nil, 0
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      by_status[tostring(status)] = (by_status[tostring(status)] or 0) + n
    end
    local f, l = thread:get("first_ms"), thread:get("last_ms")
    if f > 0 and (first == nil or f < first) then first = f end
    if l > last then last = l end
  end
  local parts = {}
  for status, n in pairs(by_status) do
    parts[#parts + 1] = string.format('"%s":%d', status, n)
  end
  local errors = summary.errors
  io.stdout:write(string.format(
    'RESULT {"statuses":{%s},"p50_us":%d,"p99_us":%d,"max_us":%d,"first_ms":%.3f,'
      .. '"last_ms":%.3f,"connect_errors":%d,"read_errors":%d,"write_errors":%d,'
      .. '"timeouts":%d}\n',
    table.concat(parts, ","), latency:percentile(50), latency:percentile(99), latency.max,
    first or 0, last, errors.connect, errors.read, errors.write, errors.timeout))
  io.stdout:flush()
end
