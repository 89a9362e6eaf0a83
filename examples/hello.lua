#!/usr/bin/env lua5.4
--- hello.lua: the smallest complete VM. A 64-bit guest (examples/guests/hello.S,
-- assembled by `make`) writes "Hello, KVM!" to port 0x3f8 and halts. The script
-- itself does what firmware would: guest RAM, long mode (page tables, GDT,
-- control registers), registers, then run() until the guest halts.
--
-- Run: make && lua5.4 examples/hello.lua
-- Expected output:
--   Hello, KVM!
--   guest halted: hlt at rip=0x1013
local root = (arg and arg[0] or ""):match("^(.*)/examples/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/?.so;" .. package.cpath

local kvm = require "kvm"
local x86 = require "kvm.x86"

local guest = assert(io.open(root .. "/examples/guests/hello.bin", "rb"),
  "examples/guests/hello.bin is missing: run make first"):read("a")

local vm <close> = assert(kvm.vm())
local ram = assert(vm:memory{ guest = 0, size = 2 << 20 })
ram:write(0x1000, guest)
local cpu = assert(vm:vcpu(0))
x86.long_mode(cpu, vm, { ram_size = ram.size })
cpu:set_regs{ rip = 0x1000, rsp = 0x8000, rflags = x86.RFLAGS_RESERVED }

-- the guest's port writes come back to Lua one by one; C-side dispatch and a
-- built-in UART exist too (vm:on_io, vm:serial): see the README.
if os.getenv("LUAKVM_STARTUP") then   -- for bench/bench.lua's start-up row
  print(("first KVM_RUN at %.6f"):format(kvm.now()))
end
while true do
  local e = cpu:run()
  if e.reason == "io" and e.port == 0x3f8 and e.direction == "out" then
    io.write(e.data)
  else
    print("guest halted: " .. tostring(e))
    break
  end
end
