--- Breakpoints and watchpoints scripted in Lua, on one vCPU.
--
-- Built on the core's guest debug (`cpu:set_guest_debug`, `cpu:step`):
-- hardware breakpoints use the four debug registers (linear addresses: they
-- work before the guest maps the address), software breakpoints patch an
-- int3 into guest memory through the guest's page tables (`cpu:translate`)
-- and have KVM stop at the #BP; watchpoints are hardware write (or access)
-- breakpoints. When the guest reaches one, its function `fn(cpu, exit)` runs:
-- `true` continues the guest (a breakpoint's instruction is then executed
-- once, with the breakpoint lifted for that one step and put back), anything
-- else makes `d:run()` return the "debug" exit (`e.pc` the address).
--
--     local kvm = require "kvm"
--     local d = kvm.debug.new(cpu)
--     d:break_at(0x1000, function(cpu, e) print("at", e.pc) return true end)
--     d:watch(0x2000, 4, function(cpu, e) cpu:set_regs{rax = 0} return true end)
--     local e, id = d:run{timeout = 5}
--
-- Addresses are guest-virtual (linear: segment bases are 0 in long mode and
-- for the flat segments of protected mode; in real mode, cs * 16 + ip).
-- Software breakpoints need a KVM that intercepts int3 (kvm_intel, kvm_amd);
-- on kvm_pvm only single-step and hardware execute breakpoints stop the guest.
--
-- @module kvm.debug
local M = {}

local Debugger = {}
Debugger.__index = Debugger

local function checkint(v, n, what)
  if math.type(v) ~= "integer" then
    error(("bad argument #%d to '%s' (integer expected, got %s)"):format(n, what, type(v)), 3)
  end
end

local function checkfn(fn, n, what)
  if fn ~= nil and type(fn) ~= "function" then
    error(("bad argument #%d to '%s' (function or nil expected, got %s)"):format(n, what, type(fn)), 3)
  end
end

--- A debugger for one vCPU. Its breakpoints act in its `run` and `step`; a
-- plain `cpu:run()` returns their "debug" exits as they are.
-- @tparam kvm.vcpu cpu
-- @treturn Debugger
function M.new(cpu)
  if type(cpu) ~= "userdata" or not tostring(cpu):match("^kvm%.vcpu %d") then
    error("bad argument #1 to 'new' (kvm.vcpu expected)", 2)
  end
  return setmetatable({ cpu = cpu, bps = {}, next_id = 1, slots = {} }, Debugger)
end

-- the guest debug configuration for the breakpoints now set
function Debugger:apply()
  local hw, sw = {}, false
  for slot = 1, 4 do
    local bp = self.slots[slot]
    if bp then hw[slot] = { addr = bp.addr, kind = bp.kind, len = bp.len } end
  end
  for _, bp in pairs(self.bps) do
    if bp.type == "sw" then sw = true end
  end
  return self.cpu:set_guest_debug{ sw_bp = sw, hw = next(hw) and hw or nil }
end

local function free_slot(self)
  for slot = 1, 4 do
    if not self.slots[slot] then return slot end
  end
end

-- a breakpoint into the list (and a debug register, or the int3 into memory;
-- `shared`: an int3 another vCPU's Debugger put there, with its gpa and orig)
function Debugger:add(bp)
  if bp.type ~= "sw" then
    local slot = free_slot(self)
    if not slot then return nil, "no free debug register (4 hardware breakpoints and watchpoints at most)" end
    bp.slot = slot
    self.slots[slot] = bp
  elseif not bp.shared then
    local gpa = self.cpu:translate(bp.addr)
    if not gpa then return nil, ("address 0x%x is not mapped"):format(bp.addr) end
    local ok, byte = pcall(self.cpu.vm.read, self.cpu.vm, gpa, 1)
    if not ok then return nil, ("address 0x%x is not in guest memory"):format(bp.addr) end
    bp.gpa, bp.orig = gpa, byte
    self.cpu.vm:write(gpa, "\xcc")
  end
  bp.id, bp.hits = self.next_id, 0
  self.next_id = self.next_id + 1
  self.bps[bp.id] = bp
  local ok, err, errno = self:apply()
  if not ok then
    self:remove(bp.id)
    return nil, err, errno
  end
  return bp.id
end

--- Stop at an instruction.
-- @tparam integer gva its address
-- @tparam[opt] function fn `fn(cpu, exit)`: `true` continues the guest; nil
--   (no function) always stops
-- @tparam[opt] table opts `type` = "hw" (a debug register; the default while
--   one is free) or "sw" (an int3 in guest memory)
-- @treturn integer the breakpoint's id
-- @return[2] fail, why (no free debug register; not mapped)
function Debugger:break_at(gva, fn, opts)
  checkint(gva, 1, "break_at")
  checkfn(fn, 2, "break_at")
  opts = opts or {}
  local t = opts.type or (free_slot(self) and "hw" or "sw")
  if t ~= "hw" and t ~= "sw" then error("bad option 'type' to 'break_at' (\"hw\" or \"sw\" expected)", 2) end
  for _, bp in pairs(self.bps) do
    if bp.addr == gva and (bp.type == "sw" or bp.kind == "exec") then
      error(("a breakpoint is already set at 0x%x (id %d)"):format(gva, bp.id), 2)
    end
  end
  return self:add{ type = t, addr = gva, kind = "exec", len = 1, fn = fn }
end

--- Stop after the guest writes (or, with kind "access", reads or writes)
-- `len` bytes at `gva` (a hardware watchpoint; the address aligned to len).
-- @tparam integer gva
-- @tparam integer len 1, 2, 4 or 8
-- @tparam[opt] function fn `fn(cpu, exit)`: `true` continues
-- @tparam[opt] table opts `kind` = "write" (default) or "access"
-- @treturn integer the watchpoint's id
-- @return[2] fail, why
function Debugger:watch(gva, len, fn, opts)
  checkint(gva, 1, "watch")
  checkint(len, 2, "watch")
  checkfn(fn, 3, "watch")
  if len ~= 1 and len ~= 2 and len ~= 4 and len ~= 8 then
    error("bad argument #2 to 'watch' (1, 2, 4 or 8 expected)", 2)
  end
  if gva & (len - 1) ~= 0 then error("bad argument #1 to 'watch' (address not aligned to the length)", 2) end
  local kind = (opts or {}).kind or "write"
  if kind ~= "write" and kind ~= "access" then
    error("bad option 'kind' to 'watch' (\"write\" or \"access\" expected)", 2)
  end
  return self:add{ type = "watch", addr = gva, kind = kind, len = len, fn = fn }
end

--- Remove a breakpoint or watchpoint (an int3 gives the original byte back).
-- @tparam integer id
-- @treturn boolean whether there was one
function Debugger:remove(id)
  local bp = self.bps[id]
  if not bp then return false end
  self.bps[id] = nil
  if bp.slot then self.slots[bp.slot] = nil end
  if bp.type == "sw" and bp.orig and not bp.shared then self.cpu.vm:write(bp.gpa, bp.orig) end
  assert(self:apply())
  return true
end

--- Remove them all.
function Debugger:clear()
  for id in pairs(self.bps) do self:remove(id) end
end

--- The breakpoints and watchpoints, by id: {id=, type = "hw"|"sw"|"watch",
-- addr=, kind=, len=, hits=, slot= (a debug register, 1..4)}.
-- @treturn table array
function Debugger:list()
  local out = {}
  for id, bp in pairs(self.bps) do
    out[#out + 1] = { id = id, type = bp.type, addr = bp.addr, kind = bp.kind, len = bp.len,
                      hits = bp.hits, slot = bp.slot }
  end
  table.sort(out, function(a, b) return a.id < b.id end)
  return out
end

-- the linear address of the next instruction
function Debugger:pc()
  local r = assert(self.cpu:regs())
  local s = assert(self.cpu:sregs())
  if s.efer & 0x400 ~= 0 and s.cs.l == 1 then return r.rip end
  return (s.cs.base + r.rip) & 0xffffffff
end

-- the software or hardware execute breakpoint at the linear address
function Debugger:at(addr)
  for _, bp in pairs(self.bps) do
    if bp.addr == addr and (bp.type == "sw" or bp.kind == "exec") then return bp end
  end
end

-- the breakpoint a "debug" exit stopped at, and for an int3 move RIP back
-- onto it when KVM left it after the int3
function Debugger:which(e)
  if e.exception == 3 then
    local bp = self:at(e.pc)
    if not bp and self:at(e.pc - 1) then
      bp = self:at(e.pc - 1)
      local r = self.cpu:regs()
      self.cpu:set_regs{ rip = r.rip - 1 }
    end
    return bp
  elseif e.slot then
    return self.slots[e.slot]
  end
end

--- Execute one instruction (`cpu:step`), over a software breakpoint at it
-- when there is one (the original byte back for the step).
-- @tparam[opt] table opts run()'s options
-- @treturn kvm.exit
function Debugger:step(opts)
  local bp = self:at(self:pc())
  if bp and bp.type == "sw" then
    self.cpu.vm:write(bp.gpa, bp.orig)
    local ok, e, err, errno = pcall(self.cpu.step, self.cpu, opts)
    if self.bps[bp.id] then self.cpu.vm:write(bp.gpa, "\xcc") end
    if not ok then error(e, 0) end
    return e, err, errno
  end
  return self.cpu:step(opts)
end

--- Run the vCPU (`cpu:run`) with the breakpoints: each hit calls its
-- function and continues while it returns true. Run again after a
-- breakpoint stopped the run, the guest goes on from it: the instruction there
-- is executed first (a breakpoint where the guest merely starts does stop it).
-- @tparam[opt] table opts run()'s options
-- @treturn kvm.exit the exit that ended the run ("debug" for a breakpoint or
--   watchpoint that stopped it, `e.pc` its address)
-- @treturn ?integer the id of that breakpoint
function Debugger:run(opts)
  local cpu = self.cpu
  local over
  if self.stopped_at then
    local pc = self:pc()
    if pc == self.stopped_at then over = self:at(pc) end
    self.stopped_at = nil
  end
  -- a breakpoint stops the run: from here the next run steps over it
  local function stop(e, bp)
    if bp.type ~= "watch" then self.stopped_at = self:pc() end
    return e, bp.id
  end
  while true do
    if over then
      local e, err, errno = self:step(opts)
      if not e then return nil, err, errno end
      if e.reason ~= "debug" or not e.step or e.slot then
        -- the step ended otherwise (a port exit no device serves, a watchpoint)
        if e.reason == "debug" and e.slot and self.slots[e.slot] then
          local bp = self.slots[e.slot]
          bp.hits = bp.hits + 1
          if not (bp.fn and bp.fn(cpu, e) == true) then return stop(e, bp) end
        elseif e.reason ~= "debug" then
          return e
        end
      end
      over = nil
    end
    local e, err, errno = cpu:run(opts)
    if not e then return nil, err, errno end
    if e.reason ~= "debug" then return e end
    local bp = self:which(e)
    if not bp then return e end
    bp.hits = bp.hits + 1
    if not (bp.fn and bp.fn(cpu, e) == true) then return stop(e, bp) end
    if bp.type ~= "watch" then
      over = self:at(self:pc())      -- fn may have moved RIP elsewhere
    end
  end
end

return M
