#!/usr/bin/env lua5.4
--- port_device.lua: two devices written in Lua, driven by a 16-bit guest
-- (examples/guests/port_device.S, assembled by `make`).
--
-- * A random-number port at 0x5f0: every `in` returns fresh random bits of
--   the access size (byte, word or dword), from Lua's math.random.
-- * A countdown timer at 0x5f8: the guest writes a number of milliseconds;
--   when it runs out the device raises IRQ 5 on the in-kernel 8259 PIC
--   (vm:irqchip(), vm:irq_line). Reading 0x5f9 returns the expiries since the
--   last read and acknowledges them.
--
-- The timer shows how a device that acts on its own fits the run loop: the
-- script asks run() to return at the timer's deadline (run{timeout = ...}),
-- raises the interrupt line and resumes. While the guest sleeps in `hlt` the
-- vCPU waits inside the kernel, using no CPU.
--
-- The guest programs the PIC, reads four random dwords, arms the timer three
-- times (waiting in sti; hlt for each interrupt) and reports the number of
-- interrupts through the debug-exit port 0x501.
--
-- Run: make && lua5.4 examples/port_device.lua [--seed N]
-- Expected output (the random numbers follow from the seed, the times vary):
--   timer: armed for 20 ms, IRQ 5 raised after 20.1 ms
--   timer: armed for 20 ms, IRQ 5 raised after 20.1 ms
--   timer: armed for 20 ms, IRQ 5 raised after 20.1 ms
--   rng: the guest read 0x660276e5 0x9b785431 0xa3bfbd4b 0x09025d55
--   guest done: debug exit code 3 (interrupts seen), hlt wake-ups 3
--   claims: 0x501 debug_exit (1 hit), 0x5f0-0x5f3 lua (4 hits), 0x5f8-0x5f9 lua (6 hits)
--   ok
local root = (arg and arg[0] or ""):match("^(.*)/examples/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/?.so;" .. package.cpath

local kvm = require "kvm"
local x86 = require "kvm.x86"

local seed = 42
if arg[1] == "--seed" and math.tointeger(tonumber(arg[2])) then
  seed = math.tointeger(tonumber(arg[2]))
elseif arg[1] then
  io.stderr:write("usage: lua5.4 examples/port_device.lua [--seed N]\n")
  os.exit(2)
end
math.randomseed(seed)

local f = assert(io.open(root .. "/examples/guests/port_device.bin", "rb"),
  "examples/guests/port_device.bin is missing: run make first")
local guest = f:read("a")
f:close()

local RNG, TIMER, STATUS = 0x5f0, 0x5f8, 0x5f9
local TIMER_IRQ = 5

local vm <close> = assert(kvm.vm())
assert(vm:memory{ guest = 0, size = 1 << 20 })
assert(vm:irqchip())       -- in-kernel PIC, IOAPIC and local APIC: before the vCPU
vm:debug_exit(0x501)

-- The random-number device: a handler for ports 0x5f0-0x5f3. For "in" it
-- returns the value the guest reads; writes are ignored.
local handed_out = {}
vm:on_io({ RNG, RNG + 3 }, function(_, dir, size)
  if dir ~= "in" then return end
  local v = math.random(0) & ((1 << (8 * size)) - 1)   -- size bytes of random bits
  handed_out[#handed_out + 1] = v
  return v
end)

-- The countdown timer: its state lives in Lua; the run loop below checks the
-- deadline, so arming it stops run() (kvm.STOP) to let the loop pick up the new
-- deadline. 0x5f8 (word, out): arm for N ms; 0x5f9 (in): expiries since the
-- last read.
local timer = { deadline = nil, armed_at = nil, ms = 0, expired = 0 }
vm:on_io({ TIMER, STATUS }, function(port, dir, _, value)
  if port == TIMER and dir == "out" then
    timer.ms = value
    timer.armed_at = kvm.now()
    timer.deadline = timer.armed_at + value / 1000
    return kvm.STOP          -- run() returns "stopped": the loop sees the new deadline
  elseif port == STATUS and dir == "in" then
    local n = timer.expired
    timer.expired = 0
    return n
  end
  return nil                 -- other accesses: reads see all ones
end)

local function timer_expire()
  local late = kvm.now() - timer.armed_at
  timer.deadline = nil
  timer.expired = timer.expired + 1
  -- an edge on the PIC's input: the 8259 latches it in IRR
  assert(vm:irq_line(TIMER_IRQ, 1))
  assert(vm:irq_line(TIMER_IRQ, 0))
  print(("timer: armed for %d ms, IRQ %d raised after %.1f ms"):format(timer.ms, TIMER_IRQ, late * 1000))
end

local cpu = assert(vm:vcpu(0))
x86.real_mode(cpu)
vm:write(0x1000, guest)
cpu:set_regs{ rip = 0x1000, rflags = x86.RFLAGS_RESERVED }

-- the run loop, which is also the timer's clock
local started = kvm.now()
local e
while true do
  local timeout = 5
  if timer.deadline then timeout = math.max(timer.deadline - kvm.now(), 1e-4) end
  e = assert(cpu:run{ timeout = timeout })
  if e.reason == "timeout" and timer.deadline and kvm.now() >= timer.deadline then
    timer_expire()
  elseif e.reason ~= "timeout" and e.reason ~= "stopped" or kvm.now() - started > 10 then
    break
  end
end

if e.reason ~= "debug_exit" then
  io.stderr:write("port_device: the guest stopped unexpectedly: ", tostring(e), "\n")
  os.exit(1)
end

-- what the guest stored: the random dwords at 0x2000, counters at 0x2020
local read_back = { string.unpack("<I4I4I4I4", vm:read(0x2000, 16)) }
local words = {}
for i = 1, 4 do words[i] = ("0x%08x"):format(read_back[i]) end
print("rng: the guest read " .. table.concat(words, " "))
local wakes = vm:u16(0x2022)
print(("guest done: debug exit code %d (interrupts seen), hlt wake-ups %d"):format(e.code, wakes))

local claims = {}
for _, c in ipairs(vm:claims()) do
  local range = c.first == c.last and ("0x%x"):format(c.first) or ("0x%x-0x%x"):format(c.first, c.last)
  claims[#claims + 1] = ("%s %s (%d hit%s)"):format(range, c.kind, c.hits, c.hits == 1 and "" or "s")
end
print("claims: " .. table.concat(claims, ", "))

local ok = e.code == 3 and #handed_out == 4
for i = 1, 4 do ok = ok and read_back[i] == handed_out[i] end
print(ok and "ok" or "MISMATCH")
if not ok then os.exit(1) end
