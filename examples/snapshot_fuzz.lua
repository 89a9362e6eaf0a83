#!/usr/bin/env lua5.4
--- snapshot_fuzz.lua: a fuzzing loop built on vm:snapshot() and vm:restore().
--
-- The guest (examples/guests/fuzz_target.S, 32-bit protected mode, assembled
-- by `make`) parses an input the script writes into its memory: a magic "KV",
-- a version, a record count, then records (type, length, bytes). Two bugs
-- are planted in it: a bound check that lets index 8 write past an 8-byte
-- table (the guest's canary check then writes 0xbad to port 0x502), and a
-- division with no check for zero (a #DE with no IDT: a triple fault).
--
-- The script runs the guest to the point just before the parse (its write to
-- port 0x500), takes vm:snapshot() there, then for each exec: vm:restore()
-- (which copies back only the pages the last exec dirtied), writes the input,
-- runs, and classifies the end: "accepted" or "rejected" (the guest's write
-- to the debug-exit port 0x501), "crash" (a write to 0x502, or KVM's
-- shutdown: a triple fault), "hang" (run{timeout} ran out), anything else
-- "other". Inputs come from a corpus, seeded with one valid input and grown
-- with every input that took the guest down a path not seen before (the
-- guest sets a byte per branch it takes in a coverage map); each exec takes
-- one at random and mutates it 1-4 times: a bit flipped, a byte set to a
-- random value or to an "interesting" one (0, 1, 8, 0x7f, 0xff...), a byte
-- inserted or removed. math.randomseed(seed): the same seed, the same run.
--
-- Each exec also reads back what the guest found at its start (a counter it
-- increments, a sum over its work area): both must be the same every time,
-- or the restore missed something (the script then says so and exits 1).
--
-- Run: make && lua5.4 examples/snapshot_fuzz.lua [--execs N] [--seed S]
--      lua5.4 examples/snapshot_fuzz.lua --input HEX    (one input, from the snapshot)
-- Output of `--execs 1500` (the times vary; the rest follows from the seed):
--   snapshot: at rip=0x101b (the guest's write to port 0x500): kvm.snapshot (1 vCPUs, 1 memory regions, 1 MiB)
--   fuzzing: seed 1, 1500 execs, from one input: 4b5601020102686902026162
--   crash at exec 418: canary overwritten (port 0x502): 4b560102030208fe026162
--   crash at exec 1133: triple fault (shutdown): 4b560102f90268790402006163
--   1500 execs in 0.60 s: 2489 execs/s (restore 56%, run 39%); pages copied per restore: median 3
--   outcomes: accepted 138, rejected 1360, crash 2, hang 0, other 0; corpus 29 inputs, 29 paths
--   every exec started from the same state: counter 1, work area sum 0x0000c0de
--   crash: canary overwritten (port 0x502), 1 execs, first at exec 418: 4b560102030208fe026162
--   crash: triple fault (shutdown), 1 execs, first at exec 1133: 4b560102f90268790402006163
local root = (arg and arg[0] or ""):match("^(.*)/examples/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/?.so;" .. package.cpath

local kvm = require "kvm"
local x86 = require "kvm.x86"

local USAGE = [[
usage: lua5.4 examples/snapshot_fuzz.lua [options]
  --execs N         execs to run (default 5000)
  --seed S          the random seed (default 1): the same seed, the same run
  --timeout SECONDS an exec running longer is a hang (default 1)
  --input HEX       run this one input from the snapshot and say how it ends
  -h, --help        this text
exit status: 0 done, 1 an exec did not start from the snapshot's state, 2 bad usage
]]

local opts = { execs = 5000, seed = 1, timeout = 1 }
do
  local i = 1
  while i <= #arg do
    local a, v = arg[i], arg[i + 1]
    local num = v and tonumber(v)
    if a == "-h" or a == "--help" then
      io.write(USAGE)
      os.exit(0)
    elseif a == "--execs" and math.tointeger(num) and num > 0 then
      opts.execs = math.tointeger(num)
    elseif a == "--seed" and math.tointeger(num) then
      opts.seed = math.tointeger(num)
    elseif a == "--timeout" and num and num > 0 then
      opts.timeout = num
    elseif a == "--input" and v and #v % 2 == 0 and not v:find("[^%x]") then
      opts.input = v:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end)
    else
      io.stderr:write("snapshot_fuzz: bad argument '", a, "'\n", USAGE)
      os.exit(2)
    end
    i = i + 2
  end
end

-- the guest's layout (fuzz_target.S)
local READY, DONE, CRASH = 0x500, 0x501, 0x502
local RUNS, FPRINT = 0x3000, 0x3004
local COV, NCOV = 0x4000, 17
local INPUT, MAX_INPUT = 0x5000, 256
local MAX_LEN = 64               -- the mutator's inputs stay this short

local f = assert(io.open(root .. "/examples/guests/fuzz_target.bin", "rb"),
  "examples/guests/fuzz_target.bin is missing: run make first")
local guest = f:read("a")
f:close()

local vm <close> = assert(kvm.vm())
assert(vm:memory{ guest = 0, size = 1 << 20 })
vm:debug_exit(READY)
vm:debug_exit(DONE)
vm:debug_exit(CRASH)
local cpu = assert(vm:vcpu(0))
x86.protected_mode(cpu, vm)
vm:write(0x1000, guest)
cpu:set_regs{ rip = 0x1000, rflags = x86.RFLAGS_RESERVED }

-- boot to the point just before the parse
local e = assert(cpu:run{ timeout = 5 })
if e.reason ~= "debug_exit" or e.port ~= READY then
  io.stderr:write("snapshot_fuzz: the guest did not reach its ready port: ", tostring(e), "\n")
  os.exit(1)
end
local snap = assert(vm:snapshot())
print(("snapshot: at rip=0x%x (the guest's write to port 0x%x): %s"):format(cpu:regs().rip, READY,
  tostring(snap)))

local function hex(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

--- One exec: restore, write the input, run. Returns the outcome ("accepted",
-- "rejected", "crash", "hang", "other"), a description, the pages the
-- restore copied, and the restore's and the run's seconds.
local function exec(input)
  local t0 = kvm.now()
  local ok, pages = vm:restore(snap)
  if not ok then error("vm:restore: " .. tostring(pages)) end
  vm:write(INPUT, string.pack("<s2", input))
  local t1 = kvm.now()
  local ex = assert(cpu:run{ timeout = opts.timeout })
  local t2 = kvm.now()
  local outcome, what
  if ex.reason == "debug_exit" and ex.port == DONE then
    outcome = ex.code == 0 and "accepted" or "rejected"
    what = ("the guest wrote %d to port 0x%x"):format(ex.code, DONE)
  elseif ex.reason == "debug_exit" and ex.port == CRASH then
    outcome, what = "crash", ("canary overwritten (port 0x%x)"):format(CRASH)
  elseif ex.reason == "shutdown" then
    outcome, what = "crash", "triple fault (shutdown)"
  elseif ex.reason == "timeout" then
    outcome, what = "hang", ("no end after %g s"):format(opts.timeout)
  else
    outcome, what = "other", tostring(ex)
  end
  return outcome, what, pages, t1 - t0, t2 - t1
end

-- the state each exec found at its start: the same every time, or the restore missed something
local start_state
local function check_start(n)
  local runs, fp = vm:u32(RUNS), vm:u32(FPRINT)
  start_state = start_state or { runs = runs, fp = fp }
  if runs ~= start_state.runs or fp ~= start_state.fp then
    io.stderr:write(("snapshot_fuzz: exec %d started from another state: counter %d, sum 0x%08x "
      .. "(exec 1: %d, 0x%08x)\n"):format(n, runs, fp, start_state.runs, start_state.fp))
    os.exit(1)
  end
end

if opts.input then
  local outcome, what = exec(opts.input)
  check_start(1)
  print(("input %s: %s: %s"):format(hex(opts.input), outcome, what))
  return
end

-- ---- the fuzzer ----

math.randomseed(opts.seed)
local random = math.random
local INTERESTING = { 0, 1, 2, 3, 4, 7, 8, 9, 15, 16, 0x7f, 0x80, 0xfe, 0xff }

local function mutate(s)
  local b = { s:byte(1, -1) }
  for _ = 1, random(4) do
    local op, n = random(6), #b
    if n == 0 then op = 5 end
    if op <= 2 then                         -- flip a bit
      local i = random(n)
      b[i] = b[i] ~ (1 << random(0, 7))
    elseif op == 3 then                     -- a random byte
      b[random(n)] = random(0, 255)
    elseif op == 4 then                     -- an interesting byte
      b[random(n)] = INTERESTING[random(#INTERESTING)]
    elseif op == 5 and n < MAX_LEN then     -- insert a byte
      table.insert(b, random(n + 1), random(0, 255))
    elseif op == 6 and n > 1 then           -- remove one
      table.remove(b, random(n))
    end
  end
  return string.char(table.unpack(b))
end

-- echo "hi", sum "ab": a valid input that takes neither bug's path
local SEED_INPUT = "KV\1\2" .. "\1\2hi" .. "\2\2ab"
local corpus, weight, total = {}, {}, 0     -- an input's weight: (branches it took)^2
local function add(input, cov)
  local _, w = cov:gsub("\1", "")
  corpus[#corpus + 1] = input
  weight[#corpus] = w * w
  total = total + w * w
end
local function pick()
  local r = random(total)
  for i = 1, #corpus do
    r = r - weight[i]
    if r <= 0 then return corpus[i] end
  end
end
local paths = {}                 -- coverage map .. outcome -> true
local crashes, crash_order = {}, {}
local counts = { accepted = 0, rejected = 0, crash = 0, hang = 0, other = 0 }
local pages_seen = {}
local t_restore, t_run = 0, 0

print(("fuzzing: seed %d, %d execs, from one input: %s"):format(opts.seed, opts.execs, hex(SEED_INPUT)))
assert(#SEED_INPUT <= MAX_INPUT)
local started = kvm.now()
for n = 1, opts.execs do
  local input = n == 1 and SEED_INPUT or mutate(pick())
  local outcome, what, pages, tr, tx = exec(input)
  t_restore, t_run = t_restore + tr, t_run + tx
  pages_seen[pages] = (pages_seen[pages] or 0) + 1
  check_start(n)
  counts[outcome] = counts[outcome] + 1
  if outcome == "crash" or outcome == "hang" or outcome == "other" then
    if not crashes[what] then
      crashes[what] = { first = n, input = input, count = 0, outcome = outcome }
      crash_order[#crash_order + 1] = what
      print(("%s at exec %d: %s: %s"):format(outcome, n, what, hex(input)))
    end
    crashes[what].count = crashes[what].count + 1
  else
    local cov = vm:read(COV, NCOV)
    local key = cov .. outcome
    if not paths[key] then
      paths[key] = true
      add(input, cov)
    end
  end
end
local secs = kvm.now() - started

-- the median of the pages each restore copied
local sorted = {}
for p in pairs(pages_seen) do sorted[#sorted + 1] = p end
table.sort(sorted)
local median, seen = 0, 0
for _, p in ipairs(sorted) do
  seen = seen + pages_seen[p]
  if seen * 2 >= opts.execs then median = p; break end
end

local npaths = 0
for _ in pairs(paths) do npaths = npaths + 1 end
print(("%d execs in %.2f s: %.0f execs/s (restore %.0f%%, run %.0f%%); pages copied per restore: median %d")
  :format(opts.execs, secs, opts.execs / secs, 100 * t_restore / secs, 100 * t_run / secs, median))
print(("outcomes: accepted %d, rejected %d, crash %d, hang %d, other %d; corpus %d inputs, %d paths")
  :format(counts.accepted, counts.rejected, counts.crash, counts.hang, counts.other, #corpus, npaths))
print(("every exec started from the same state: counter %d, work area sum 0x%08x"):format(start_state.runs,
  start_state.fp))
for _, what in ipairs(crash_order) do
  local c = crashes[what]
  print(("%s: %s, %d execs, first at exec %d: %s"):format(c.outcome, what, c.count, c.first, hex(c.input)))
end
