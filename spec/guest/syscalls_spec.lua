--- No system call per exit but KVM_RUN (issue 13): a real guest makes N port
-- writes, each an exit dispatched inside run() (the 16550A's scratch
-- register, or a Lua handler), in a child lua5.4 under strace. Run with
-- N = 20000 and N = 100000: the KVM_RUN ioctls grow by the 80000 exits, and
-- every other system call is made the same number of times in both runs
-- (set-up and tear-down: loading Lua, the module, the VM); the one allowance
-- is a Lua handler's sampled clock reads where the clock has no vDSO.
local support = require "support"

local N1, N2 = 20000, 100000

-- real mode: N writes of AL to port 0x3ff, then hlt. `loop` counts in CX in
-- 16-bit code; with the address-size prefix (0x67) in ECX, so N may pass 65535.
local function guest(n)
  return "\xba\xff\x03"                         -- mov dx, 0x3ff
      .. "\x66\xb9" .. string.pack("<I4", n)    -- mov ecx, n
      .. "\xee"                                 -- l: out dx, al
      .. "\x67\xe2\xfc"                         -- loop l (ecx)
      .. "\xf4"                                 -- hlt
end

local CHILD = [[
local support = require "support"
local n, lua = %d, %s
local vm, cpu = support.guest(%q, { setup = function(v)
  if lua then v:on_io(0x3ff, function() end) else v:serial{ output = false } end
end })
local e = cpu:run()
print("reason " .. e.reason .. " writes " .. tostring(vm:stats().ports[0x3ff]))
cpu:close()
vm:close()
]]

local function have_strace()
  local p = io.popen("command -v strace")
  local found = p:read("a") ~= ""
  p:close()
  return found
end

-- the child under `strace -f -C` (each call, then the summary): its system
-- calls by name ({ioctl = n, ...}), and its KVM_RUN ioctls
local function traced(n, lua)
  local log = os.tmpname()
  -- (under make check-memory the child is ASan's lua5.4: LeakSanitizer
  -- cannot run under ptrace, so it is told not to)
  local asan = "ASAN_OPTIONS=" .. (os.getenv("ASAN_OPTIONS") or "") .. ":detect_leaks=0 "
  local code, out = support.child(CHILD:format(n, tostring(lua), guest(n)),
    "env " .. asan .. "strace -f -C -qq -o " .. log .. " ")
  local f = assert(io.open(log))
  local text = f:read("a")
  f:close()
  os.remove(log)
  assert.equal(0, code, out)
  assert.matches("reason hlt writes " .. n, out, 1, true)
  local runs = select(2, text:gsub("ioctl%(%d+, KVM_RUN", ""))
  local calls = {}
  local summary = text:match("\n%% time[^\n]*\n%-[^\n]*\n(.-)\n%-")
  assert(summary, "no strace summary in:\n" .. text:sub(-2000))
  for line in summary:gmatch("[^\n]+") do
    local fields = {}
    for w in line:gmatch("%S+") do fields[#fields + 1] = w end
    calls[fields[#fields]] = tonumber(fields[4])
  end
  return calls, runs
end

local function check(lua)
  support.need_kvm()
  assert(have_strace(), "strace is not installed (make deps)")
  local a, runs_a = traced(N1, lua)
  local b, runs_b = traced(N2, lua)
  -- one KVM_RUN per write and one more for the hlt
  assert.equal(N1 + 1, runs_a)
  assert.equal(N2 + 1, runs_b)
  -- the other ioctls (KVM_CREATE_VM, KVM_SET_REGS, ...) do not depend on N
  assert.equal(a.ioctl - runs_a, b.ioctl - runs_b)
  -- a Lua handler's time is sampled, two clock reads every 16th call: no
  -- system call with a vDSO clock, one each where the clocksource has none
  -- (hpet, acpi_pm: a nested guest under QEMU TCG may use one)
  if lua and (b.clock_gettime or 0) > (a.clock_gettime or 0) then
    assert((b.clock_gettime or 0) <= N2 // 8 + 16, "clock_gettime: " .. b.clock_gettime)
    a.clock_gettime, b.clock_gettime = nil, nil
  end
  -- nor does anything else, and there is little of it
  local others = 0
  for name, count in pairs(b) do
    if name ~= "ioctl" then
      assert.equal(a[name], count, ("%s: %s calls for %d exits, %d for %d"):format(name,
        tostring(a[name]), N1, count, N2))
      others = others + count
    end
  end
  for name in pairs(a) do assert(b[name], name .. " made for " .. N1 .. " exits only") end
  assert(others < 1000, others .. " system calls besides ioctl")
end

describe("system calls per exit", function()
  it("a C device's exits: KVM_RUN and nothing else", function()
    check(false)
  end)

  it("a Lua handler's exits: KVM_RUN and nothing else", function()
    check(true)
  end)
end)
