--- Shared helpers for the specs (loaded with `require "support"`; spec/helper.lua
-- puts spec/ on package.path).
--
--     local support = require "support"
--     local ok, why = support.kvm_ok()
--     describe("thing", function()
--       if not ok then pending("no /dev/kvm: " .. why) return end
--       it("runs", function()
--         local vm, cpu, ram = support.guest("\xf4")   -- hlt
--         assert.equal("hlt", cpu:run().reason)
--       end)
--     end)
--
-- Guests are loaded at `support.BASE` (0x1000) with rip = 0x1000, rsp = 0x8000
-- and rflags = 2 (interrupts off) in a region of `support.RAM` bytes at 0.
local support = {}

--- Where guests are loaded and start.
support.BASE = 0x1000

--- Guest RAM size for `support.guest` (2 MiB: room for long mode's tables).
support.RAM = 2 << 20

local core_ok, kvm = pcall(require, "kvm")
local x86 = core_ok and require "kvm.x86" or nil

local ok_cache, why_cache

--- Is KVM usable here (the core loads and /dev/kvm opens)?
-- @treturn boolean
-- @treturn ?string why not
function support.kvm_ok()
  if ok_cache == nil then
    if not core_ok then
      ok_cache, why_cache = false, "kvm.core does not load (run make): " .. tostring(kvm)
    else
      local ok, why = kvm.available()
      ok_cache, why_cache = ok, why
      if ok and not kvm.vm() then ok_cache, why_cache = false, select(2, kvm.vm()) end
    end
  end
  return ok_cache, why_cache
end

--- Read a file's bytes.
function support.slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

--- Create a VM with `support.RAM` bytes of memory at 0 and vCPU 0, load a
-- guest at 0x1000 and point rip at it.
-- @param code the guest: a byte string, or the name of a flat binary built
--   by make from spec/guest/NAME.S ("name.bin")
-- @tparam[opt] table opts `mode` = "real" (default: 16-bit, segments 0),
--   "protected" (flat 32-bit) or "long" (64-bit, identity-mapped 4 GiB);
--   `size` = RAM bytes; `regs` = extra registers for set_regs
-- @return vm, cpu, ram
function support.guest(code, opts)
  opts = opts or {}
  if code:match("^[%w_%-]+%.bin$") then
    local path = "spec/guest/" .. code
    local f = io.open(path, "rb")
    if not f then error(path .. " is missing: run make", 2) end
    code = f:read("a")
    f:close()
  end
  local vm = assert(kvm.vm())
  local ram = vm:memory{ guest = 0, size = opts.size or support.RAM }
  local cpu = assert(vm:vcpu(0))
  local mode = opts.mode or "real"
  if mode == "real" then x86.real_mode(cpu)
  elseif mode == "protected" then x86.protected_mode(cpu, vm)
  elseif mode == "long" then x86.long_mode(cpu, vm)
  else error("support.guest: unknown mode '" .. tostring(mode) .. "'", 2) end
  ram:write(support.BASE, code)
  local regs = { rip = support.BASE, rsp = 0x8000, rflags = 2 }
  for k, v in pairs(opts.regs or {}) do regs[k] = v end
  cpu:set_regs(regs)
  return vm, cpu, ram
end

--- Call f(...) and return the error it raises, without the "file:line: "
-- position Lua adds in front; fails the test when it does not raise. (Call
-- methods inside a closure, not as a tail call, so that the message names
-- them: `support.err(function() vm:vcpu(-1) end)`.)
function support.err(f, ...)
  local ok, e = pcall(f, ...)
  if ok then error("expected an error, got none", 2) end
  if type(e) == "string" then e = e:gsub("^[%w_%./%-]+:%d+: ", "", 1) end
  return e
end

local callers = {}

--- The error obj:name(...) raises, as support.err gives it (the call is
-- made as a method call so the message names the method).
function support.merr(obj, name, ...)
  local f = callers[name]
  if not f then
    assert(name:match("^[%a_][%w_]*$"), "bad method name")
    f = assert(load("local o = ...; o:" .. name .. "(select(2, ...))", "=call"))
    callers[name] = f
  end
  return support.err(f, obj, ...)
end

--- This process's pid (the first field of /proc/self/stat).
function support.pid()
  local f = assert(io.open("/proc/self/stat"))
  local pid = f:read("n")
  f:close()
  return math.tointeger(pid)
end

--- How many file descriptors this process has open (entries of
-- /proc/PID/fd, counted by ls; the pipe to ls is counted, consistently).
function support.fd_count()
  local p = assert(io.popen("ls /proc/" .. support.pid() .. "/fd"))
  local n = 0
  for _ in p:lines() do n = n + 1 end
  p:close()
  return n
end

--- Wall-clock seconds (from /proc/uptime, 10 ms resolution).
function support.now()
  local f = assert(io.open("/proc/uptime"))
  local t = f:read("n")
  f:close()
  return t
end

--- Full garbage collection, twice (finalizers run in the first).
function support.gc()
  collectgarbage()
  collectgarbage()
end

--- Run a Lua snippet in a child lua5.4 (for things that may crash the
-- process). Returns the exit status ("exit", code) as os.execute does, and
-- the child's stdout.
function support.child(src)
  local name = os.tmpname()
  local f = assert(io.open(name, "w"))
  f:write('package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;" .. package.path\n',
          'package.cpath = "./?.so;" .. package.cpath\n', src)
  f:close()
  local p = assert(io.popen("lua5.4 " .. name .. " 2>&1"))
  local out = p:read("a")
  local _, how, code = p:close()
  os.remove(name)
  return code, out, how
end

return support
