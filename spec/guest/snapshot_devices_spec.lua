--- vm:snapshot() and vm:restore(snap) for each C device (their DeviceOps.save
-- and .restore): the device is driven into a state, snapshotted, changed,
-- restored, and must then behave exactly as at the snapshot: registers read
-- back the same, FIFO bytes come in order, typed input is not lost, a virtio
-- queue goes on from the same index. A snapshot of a device configured
-- otherwise (another IRQ, another disk) is refused, naming the device, and
-- changes nothing.
--
-- The port devices are driven by spec/guest/portscript.S through a real vCPU
-- (the same exits a guest driver makes): a list of port writes and reads at
-- 0x3000, what it read at 0x4000. The virtio devices through dev:write and
-- dev:read, the access the run loop makes for the guest.
local support = require "support"

local SCRIPT, RESULTS = 0x3000, 0x4000
local COM = 0x3f8
local RBR, IER, IIR, FCR, LCR, MCR, LSR, MSR, SCR = 0, 1, 2, 2, 3, 4, 5, 6, 7

-- a VM running portscript.S, an irqchip, the debug-exit port 0x501; setup(vm)
-- adds the devices
local function pio_vm(setup)
  return support.guest("portscript.bin", { size = 1 << 20, setup = function(vm)
    assert(vm:irqchip())
    vm:debug_exit(0x501)
    if setup then setup(vm) end
  end })
end

local OPS = { out = 1, ["in"] = 2, outl = 3, inl = 4, window = 5 }

-- Run one list of port accesses: {"out", port, value}, {"in", port},
-- {"outl", port, value}, {"inl", port}, and {"window", 0}: interrupts on for
-- a moment. Returns what the ins read, in order.
local function ports(vm, cpu, list)
  local t = {}
  for i, op in ipairs(list) do
    t[i] = string.pack("<BI2I4", assert(OPS[op[1]], op[1]), op[2], op[3] or 0)
  end
  t[#t + 1] = string.pack("<BI2I4", 0, 0, 0)
  vm:write(SCRIPT, table.concat(t))
  cpu:set_regs{ rip = support.BASE, rflags = 2 }
  local e = assert(cpu:run{ timeout = 10 })
  assert.equal("debug_exit", e.reason, tostring(e))
  local out, at = {}, RESULTS
  for _, op in ipairs(list) do
    if op[1] == "in" then out[#out + 1] = vm:u8(at); at = at + 1
    elseif op[1] == "inl" then out[#out + 1] = vm:u32(at); at = at + 4 end
  end
  return out
end

local function snapshot(vm)
  local snap, err = vm:snapshot()
  assert(snap, err)
  return snap
end

local function restore(vm, snap)
  local ok, err = vm:restore(snap)
  assert(ok, err)
end

-- a device part of the snapshot by kind
local function part(snap, name)
  for _, p in ipairs(snap:parts()) do
    if p.kind == "device" and p.name == name then return p end
  end
end

-- reads of every UART register that change nothing but what reading
-- changes (IIR acknowledges THR empty, LSR clears errors, MSR deltas);
-- DLL and DLM behind DLAB, LCR put back
local function uart_regs(lcr)
  return {
    { "in", COM + IER }, { "in", COM + IIR }, { "in", COM + IIR }, { "in", COM + LCR },
    { "in", COM + MCR }, { "in", COM + LSR }, { "in", COM + MSR }, { "in", COM + MSR },
    { "in", COM + SCR },
    { "out", COM + LCR, lcr | 0x80 }, { "in", COM + RBR }, { "in", COM + IER }, { "out", COM + LCR, lcr },
  }
end

-- n reads of LSR then RBR: the bytes received (RBR where LSR had DR)
local function drain_ops(n)
  local t = {}
  for _ = 1, n do t[#t + 1] = { "in", COM + LSR }; t[#t + 1] = { "in", COM + RBR } end
  return t
end

local function drained(r)
  local s = {}
  for i = 1, #r, 2 do
    if r[i] & 1 == 1 then s[#s + 1] = string.char(r[i + 1]) end
  end
  return table.concat(s)
end

-- virtio-mmio: the specs' driver in Lua (spec/virtio_driver.lua)
local vd = require "virtio_driver"
local V = vd.R
local ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET = vd.ACK, vd.DRIVER, vd.DRIVER_OK, vd.FEATURES_OK,
  vd.NEEDS_RESET
local NEXT, WRITE = vd.NEXT, vd.WRITE
local DESC, USED, BUF = vd.DESC, vd.USED, vd.BUF
local w, r = vd.w, vd.r

local tmp = {}
teardown(function() for _, p in ipairs(tmp) do os.remove(p) end end)

local function image(n) return vd.image(n, tmp) end

-- a VM with 1 MiB of RAM and an irqchip; make(vm) adds the device
local function virtio_vm(make)
  local vm = vd.new_vm()
  return vm, assert(make(vm))
end

-- negotiate VERSION_1, queue 0 of 8 entries, DRIVER_OK (vd.driver);
-- q.read_sector(n) reads sector n into BUF + 0x100: its status byte
local function driver(vm, dev)
  local q = vd.driver(vm, dev)
  function q.read_sector(sector) return vd.blk_req(q, vm, 0, sector, 512, "in") end
  return q
end

-- A snapshot file with one device's state changed, every checksum right:
-- saves snap, hands the device section's payload to change(state) and
-- writes what it returns, then loads it back (kvm.load_snapshot).
local function edited(snap, name, change)
  local kvm = require "kvm"
  local build = require "snapfile_build"
  local path = os.tmpname()
  tmp[#tmp + 1] = path
  assert(snap:save(path))
  local f = assert(io.open(path, "rb"))
  local bytes = f:read("a")
  f:close()
  local out, off, found = { bytes:sub(1, build.HDR_LEN) }, build.HDR_LEN, false
  while true do
    local h = bytes:sub(off + 1, off + build.SEC_LEN)
    local kind, id, sname, addr, len = string.unpack("<I4I4c32I8I8", h)
    local payload = bytes:sub(off + build.SEC_LEN + 1, off + build.SEC_LEN + len)
    if kind == build.KIND.device and sname:match("^[^%z]*") == name then
      payload = change(payload)
      found = true
      h = string.pack("<I4I4c32I8I8I4", kind, id, sname, addr, #payload, build.crc32c(payload))
      h = h .. string.pack("<I4", build.crc32c(h))
    end
    out[#out + 1] = h .. payload
    off = off + build.SEC_LEN + len
    if kind == build.KIND.END then break end
  end
  assert(found, "no device " .. name .. " in the file")
  local file = table.concat(out)
  local hdr = file:sub(1, 20) .. string.pack("<I4I8", 0, #file) .. file:sub(33, build.HDR_LEN)
  hdr = hdr:sub(1, 20) .. string.pack("<I4", build.crc32c(hdr)) .. hdr:sub(25)
  f = assert(io.open(path, "wb"))
  f:write(hdr, file:sub(build.HDR_LEN + 1))
  f:close()
  local loaded, err = kvm.load_snapshot(path)
  assert(loaded, err)
  return loaded
end

-- the state with the bytes at offset `at` (0-based) replaced by `v` (a
-- string), or cut to `at` bytes (v == nil)
local function poke(at, v)
  return function(state)
    if v == nil then return state:sub(1, at) end
    return state:sub(1, at) .. v .. state:sub(at + #v + 1)
  end
end

describe("snapshots of devices #guest", function()
  describe("16550A UART", function()
    it("reads back every register as at the snapshot", function()
      support.need_kvm()
      local vm <close>, cpu = pio_vm(function(v) v:serial{ output = false } end)
      ports(vm, cpu, {
        { "out", COM + LCR, 0x80 }, { "out", COM + RBR, 0x34 }, { "out", COM + IER, 0x12 },  -- divisor 0x1234
        { "out", COM + LCR, 0x1b },                      -- 8E1... with DLAB off
        { "out", COM + FCR, 0xc7 },                      -- FIFO on, trigger 14
        { "out", COM + MCR, 0x10 }, { "out", COM + MCR, 0x0b },   -- through loopback: MSR deltas
        { "out", COM + IER, 0x0b },                      -- RDA, THRE, MSR interrupts
        { "out", COM + SCR, 0x77 },
      })
      local snap = snapshot(vm)
      local at_snap = ports(vm, cpu, uart_regs(0x1b))
      -- IER, IIR (THR empty, then the modem status), LCR, MCR, LSR, MSR (deltas, then
      -- cleared), SCR, DLL, DLM
      assert.same({ 0x0b, 0xc2, 0xc0, 0x1b, 0x0b, 0x60, 0xbb, 0xb0, 0x77, 0x34, 0x12 }, at_snap)
      ports(vm, cpu, {
        { "out", COM + LCR, 0x80 }, { "out", COM + RBR, 0x01 }, { "out", COM + IER, 0x00 },
        { "out", COM + LCR, 0x03 }, { "out", COM + FCR, 0x00 }, { "out", COM + MCR, 0x00 },
        { "out", COM + IER, 0x00 }, { "out", COM + SCR, 0x00 },
      })
      assert.are_not.same(at_snap, ports(vm, cpu, uart_regs(0x03)))
      restore(vm, snap)
      assert.same(at_snap, ports(vm, cpu, uart_regs(0x1b)))
    end)

    it("delivers the receive FIFO's bytes in order, once, after the restore", function()
      support.need_kvm()
      local vm <close>, cpu = pio_vm(function(v) v:serial{ output = false } end)
      local list = { { "out", COM + MCR, 0x10 }, { "out", COM + FCR, 0x07 } }   -- loopback, FIFO on
      for c in ("hello"):gmatch(".") do list[#list + 1] = { "out", COM + RBR, c:byte() } end
      ports(vm, cpu, list)
      local snap = snapshot(vm)
      assert.equal("hel", drained(ports(vm, cpu, drain_ops(3))))
      ports(vm, cpu, { { "out", COM + RBR, ("X"):byte() }, { "out", COM + RBR, ("Y"):byte() } })
      restore(vm, snap)
      assert.equal("hello", drained(ports(vm, cpu, drain_ops(8))))
    end)

    it("loses no typed byte: the FIFO's and those a FIFO reset held back come first", function()
      support.need_kvm()
      local fifo = os.tmpname()
      os.remove(fifo)
      assert.equal(0, select(3, os.execute("mkfifo " .. fifo)))
      local rd = assert(io.open(fifo, "r+"))     -- O_RDWR: the open does not wait for a writer
      local wr = assert(io.open(fifo, "w"))
      os.remove(fifo)
      wr:write("0123456789ABCDEF")
      wr:flush()
      local vm <close>, cpu = pio_vm(function(v) v:serial{ output = false, input = rd } end)
      -- receive interrupt and OUT2 on: the UART takes input; LSR polled until it
      -- has pulled in the 16 bytes (or the tick did), two are read, then the FIFO
      -- is reset: the 14 typed bytes left wait in the UART, ahead of anything else
      local list = { { "out", COM + FCR, 0x01 }, { "out", COM + IER, 0x01 }, { "out", COM + MCR, 0x08 } }
      for _ = 1, 9 do list[#list + 1] = { "in", COM + LSR } end
      list[#list + 1] = { "in", COM + RBR }
      list[#list + 1] = { "in", COM + RBR }
      list[#list + 1] = { "out", COM + FCR, 0x03 }
      local got = ports(vm, cpu, list)
      assert.equal(0x61, got[9])
      assert.equal("01", string.char(got[10], got[11]))
      local snap = snapshot(vm)
      wr:write("GHIJ")
      wr:flush()
      assert.equal("23456789ABCDEFGHIJ", drained(ports(vm, cpu, drain_ops(24))))
      restore(vm, snap)
      -- the host's input is spent; what the UART had read from it is not lost
      assert.equal("23456789ABCDEF", drained(ports(vm, cpu, drain_ops(24))))
      wr:close()
      rd:close()
    end)

    it("drives IRQ 4 to the restored level: the next THR-empty interrupt arrives", function()
      support.need_kvm()
      local vm <close>, cpu = pio_vm(function(v) v:serial{ output = false } end)
      vm:write(0x30, string.pack("<I2I2", support.BASE + 0x100, 0))   -- IVT 0x0c (IRQ 4): the counter
      vm:write(0x5000, "\0\0")
      ports(vm, cpu, {
        { "out", 0x20, 0x11 }, { "out", 0x21, 0x08 }, { "out", 0x21, 0x04 }, { "out", 0x21, 0x01 },
        { "out", 0x21, 0xef },                           -- the 8259: vectors 8-15, only IRQ 4 on
        { "out", COM + MCR, 0x08 },                      -- OUT2: the line is the UART's
      })
      local snap = snapshot(vm)                          -- IER 0: the line low
      local enable = { { "out", COM + IER, 0x02 }, { "window", 0 } }
      ports(vm, cpu, enable)
      assert.equal(1, vm:u16(0x5000))                    -- THR empty: the line went high
      restore(vm, snap)
      assert.equal(0, vm:u16(0x5000))
      ports(vm, cpu, enable)
      assert.equal(1, vm:u16(0x5000))                    -- low after the restore, so high again is an edge
    end)

    it("is refused by a UART on another IRQ, which keeps its state", function()
      support.need_kvm()
      local vm <close>, cpu = pio_vm(function(v) v:serial{ output = false } end)
      local snap = snapshot(vm)
      local vm2 <close>, cpu2 = pio_vm(function(v) v:serial{ output = false, irq = 3 } end)
      ports(vm2, cpu2, { { "out", COM + SCR, 0x99 } })
      local ok, err = vm2:restore(snap)
      assert.is_nil(ok)
      assert.equal("vm:restore: device serial at port 0x3f8: a UART on IRQ 4, this one is on IRQ 3", err)
      assert.same({ 0x99 }, ports(vm2, cpu2, { { "in", COM + SCR } }))
    end)
  end)

  describe("legacy ports", function()
    it("keep CMOS, the clock, the i8042's queue, port 0x61, PCI's address and the POST code", function()
      support.need_kvm()
      local vm <close>, cpu = pio_vm(function(v) v:legacy_ports() end)
      ports(vm, cpu, {
        { "out", 0x70, 0x0e }, { "out", 0x71, 0x5a },                     -- CMOS RAM 0x0e
        { "out", 0x70, 0x0b }, { "out", 0x71, 0x82 },                     -- set the clock: year 99
        { "out", 0x70, 0x09 }, { "out", 0x71, 0x99 },
        { "out", 0x70, 0x0b }, { "out", 0x71, 0x02 },
        { "out", 0x70, 0x8f },                                            -- index 0x0f, NMI off
        { "out", 0x64, 0xaa }, { "out", 0x64, 0xd2 }, { "out", 0x60, 0x42 },  -- queue 0x55, 0x42
        { "out", 0x61, 0x03 },
        { "outl", 0xcf8, 0x80001234 },
        { "out", 0x80, 0x2a },
      })
      local snap = snapshot(vm)
      local read = {
        { "in", 0x70 }, { "in", 0x64 }, { "in", 0x60 }, { "in", 0x60 }, { "in", 0x64 },
        { "in", 0x61 }, { "inl", 0xcf8 }, { "in", 0x80 },
        { "out", 0x70, 0x0e }, { "in", 0x71 }, { "out", 0x70, 0x09 }, { "in", 0x71 },
      }
      local at_snap = ports(vm, cpu, read)
      assert.same({ 0x8f, 0x15, 0x55, 0x42, 0x14, 0x33, 0x80001234, 0x2a, 0x5a, 0x99 }, at_snap)
      ports(vm, cpu, {
        { "out", 0x70, 0x0e }, { "out", 0x71, 0x00 },
        { "out", 0x70, 0x0b }, { "out", 0x71, 0x82 }, { "out", 0x70, 0x09 }, { "out", 0x71, 0x10 },
        { "out", 0x70, 0x0b }, { "out", 0x71, 0x02 },
        { "out", 0x64, 0xab },
        { "out", 0x61, 0x00 }, { "outl", 0xcf8, 0 }, { "out", 0x80, 0x11 },
      })
      restore(vm, snap)
      assert.same(at_snap, ports(vm, cpu, read))
    end)

    it("drive IRQ 1 to the restored level: the next i8042 byte interrupts", function()
      support.need_kvm()
      local vm <close>, cpu = pio_vm(function(v) v:legacy_ports() end)
      vm:write(0x24, string.pack("<I2I2", support.BASE + 0x100, 0))   -- IVT 9 (IRQ 1): the counter
      vm:write(0x5000, "\0\0")
      ports(vm, cpu, { { "out", 0x20, 0x11 }, { "out", 0x21, 0x08 }, { "out", 0x21, 0x04 },
                       { "out", 0x21, 0x01 }, { "out", 0x21, 0xfd } })   -- only IRQ 1 on
      local snap = snapshot(vm)                          -- nothing queued: the line low
      local self_test = { { "out", 0x64, 0xaa }, { "window", 0 } }
      ports(vm, cpu, self_test)
      assert.equal(1, vm:u16(0x5000))
      restore(vm, snap)
      assert.equal(0, vm:u16(0x5000))
      ports(vm, cpu, self_test)
      assert.equal(1, vm:u16(0x5000))
      assert.same({ 0x55 }, ports(vm, cpu, { { "in", 0x60 } }))
    end)

    it("are refused by legacy ports with other parts", function()
      support.need_kvm()
      local vm <close> = pio_vm(function(v) v:legacy_ports() end)
      local snap = snapshot(vm)
      local vm2 <close> = pio_vm(function(v) v:legacy_ports{ pci = false } end)
      local ok, err = vm2:restore(snap)
      assert.is_nil(ok)
      assert.equal("vm:restore: device legacy at port 0x60: legacy ports with parts 0x1f, these have 0x1d", err)
    end)
  end)

  describe("ACPI power", function()
    it("keeps PM1a_EN and PM1a_CNT", function()
      support.need_kvm()
      local vm <close>, cpu = pio_vm(function(v) v:power() end)
      ports(vm, cpu, { { "out", 0x602, 0x20 }, { "out", 0x603, 0x01 }, { "out", 0x604, 0x06 } })
      local snap = snapshot(vm)
      local read = { { "in", 0x602 }, { "in", 0x603 }, { "in", 0x604 }, { "in", 0x605 } }
      assert.same({ 0x20, 0x01, 0x07, 0x00 }, ports(vm, cpu, read))
      ports(vm, cpu, { { "out", 0x602, 0 }, { "out", 0x603, 0 }, { "out", 0x604, 0 } })
      assert.same({ 0, 0, 0x01, 0 }, ports(vm, cpu, read))
      restore(vm, snap)
      assert.same({ 0x20, 0x01, 0x07, 0x00 }, ports(vm, cpu, read))
    end)

    it("is refused by a power device with another S5 sleep type", function()
      support.need_kvm()
      local vm <close> = pio_vm(function(v) v:power() end)
      local snap = snapshot(vm)
      local vm2 <close> = pio_vm(function(v) v:power{ s5 = 3 } end)
      local ok, err = vm2:restore(snap)
      assert.is_nil(ok)
      assert.equal("vm:restore: device power at port 0x600: S5 sleep type 5, this device's is 3", err)
    end)
  end)

  describe("debug console and debug exit", function()
    it("are in the snapshot and come back", function()
      support.need_kvm()
      local out = {}
      local vm <close>, cpu = pio_vm(function(v) v:debugcon{ output = function(b) out[#out + 1] = b end } end)
      local snap = snapshot(vm)
      assert.same({ "debug_exit", 0x501, 4 }, { part(snap, "debug_exit").name, part(snap, "debug_exit").addr,
                                                part(snap, "debug_exit").bytes })
      assert.same({ 0xe9, 8 }, { part(snap, "debugcon").addr, part(snap, "debugcon").bytes })
      ports(vm, cpu, { { "out", 0xe9, ("a"):byte() } })
      restore(vm, snap)
      assert.same({ 0xe9 }, ports(vm, cpu, { { "out", 0xe9, ("b"):byte() }, { "in", 0xe9 } }))
      assert.equal("ab", table.concat(out))
    end)
  end)

  describe("virtio", function()
    it("a block device's queue goes on from the snapshot's index, with its ISR and selectors", function()
      support.need_kvm()
      local vm <close>, dev = virtio_vm(function(v) return v:virtio_blk{ path = image(8), discard = false } end)
      local q = driver(vm, dev)
      assert.equal(0, q.read_sector(1))
      assert.equal(0, q.read_sector(2))
      w(dev, V.DEV_FEAT_SEL, 1)
      local snap = snapshot(vm)
      local info = dev:info()
      assert.same({ 8, true, 2, 2 }, { info.queues[1].num, info.queues[1].ready, info.queues[1].last_avail,
                                        info.queues[1].used_idx })
      for sector = 3, 5 do assert.equal(0, q.read_sector(sector)) end
      w(dev, V.ACK, 1)
      w(dev, V.DEV_FEAT_SEL, 0)
      assert.equal(5, dev:info().queues[1].used_idx)
      restore(vm, snap)
      assert.same(info, dev:info())
      assert.equal(1, r(dev, V.ISR))
      assert.equal(1, r(dev, V.DEV_FEAT))       -- selector 1: VERSION_1
      assert.equal(2, vm:u16(USED + 2))          -- guest memory came back too
      q.idx = 2                                   -- the driver's count lives in the guest
      assert.equal(0, q.read_sector(6))
      assert.equal(("G"):rep(512), vm:read(BUF + 0x100, 512))
      assert.same({ 3, 0, 513 }, { vm:u16(USED + 2), vm:u32(USED + 4 + 8 * 2), vm:u32(USED + 8 + 8 * 2) })
      assert.same({ 3, 3 }, { dev:info().queues[1].last_avail, dev:info().queues[1].used_idx })
    end)

    it("drives its interrupt line to the restored ISR's level: the next request interrupts again", function()
      support.need_kvm()
      local vm <close>, dev = virtio_vm(function(v) return v:virtio_rng() end)
      local q = driver(vm, dev)
      local snap = snapshot(vm)                  -- ISR 0, the line low
      q.submit{ { BUF, 16, WRITE } }
      assert.same({ 1, 1 }, { r(dev, V.ISR), vm:stats().virtio_irqs })   -- the line went high
      restore(vm, snap)
      assert.equal(0, r(dev, V.ISR))
      q.idx = 0
      q.submit{ { BUF, 16, WRITE } }
      assert.same({ 1, 2 }, { r(dev, V.ISR), vm:stats().virtio_irqs })   -- and high again: a new edge
    end)

    for _, kind in ipairs{ "virtio_blk", "virtio_rng", "virtio_console" } do
      it(kind .. ": the transport (status, features, queue) comes back after a reset", function()
        support.need_kvm()
        local vm <close>, dev = virtio_vm(function(v)
          return v[kind](v, kind == "virtio_blk" and { path = image(1) } or { output = kind == "virtio_console" and false or nil })
        end)
        driver(vm, dev)
        local snap = snapshot(vm)
        local info = dev:info()
        assert.equal(ACK | DRIVER | FEATURES_OK | DRIVER_OK, info.status)
        assert.equal(1 << 32, info.driver_features)
        w(dev, V.STATUS, 0)
        assert.equal(0, dev:info().status)
        restore(vm, snap)
        assert.same(info, dev:info())
      end)
    end

    it("a device that needs a reset still does, and says why", function()
      support.need_kvm()
      local vm <close>, dev = virtio_vm(function(v) return v:virtio_rng() end)
      local q = driver(vm, dev)
      q.submit{ { BUF, 16, NEXT | WRITE, 1 }, { BUF + 16, 16, NEXT | WRITE, 0 } }    -- a loop
      local why = "a descriptor chain is longer than the queue (a loop?)"
      assert.equal(why, dev:info().error)
      local snap = snapshot(vm)
      w(dev, V.STATUS, 0)
      assert.is_nil(dev:info().error)
      assert.equal(0, r(dev, V.ISR))
      restore(vm, snap)
      assert.equal(why, dev:info().error)
      assert.equal(NEEDS_RESET, dev:info().status & NEEDS_RESET)
      assert.equal(2, r(dev, V.ISR))             -- the configuration-change interrupt, unacknowledged
    end)

    it("a block device refuses a snapshot of another disk's size or mode and keeps its state", function()
      support.need_kvm()
      local vm <close> = virtio_vm(function(v) return v:virtio_blk{ path = image(8), discard = false } end)
      local snap = snapshot(vm)
      for _, case in ipairs{
        { { path = image(4) }, "a disk of 8 sectors, this one has 4" },
        { { path = image(8), readonly = true }, "a read-write disk, this one is read-only" },
      } do
        local vm2 <close>, dev2 = virtio_vm(function(v) return v:virtio_blk(case[1]) end)
        driver(vm2, dev2)
        local before = dev2:info()
        local ok, err = vm2:restore(snap)
        assert.is_nil(ok)
        assert.equal("vm:restore: device virtio-blk at MMIO 0xfeb00000: " .. case[2], err)
        assert.same(before, dev2:info())
      end
    end)
  end)

  describe("a corrupt device state in a snapshot file", function()
    local u8, u16, u32 = function(v) return string.pack("<I1", v) end, function(v) return string.pack("<I2", v) end,
      function(v) return string.pack("<I4", v) end
    -- {name, its claim, a change, the message}; the UART's state: version, port, irq, IER FCR LCR MCR
    -- LSR MSR SCR DLL DLM RBR THRI polls (offsets 12-23), the FIFO's count (24) and bytes, the held
    -- typeahead's; the power device's: version, evt, cnt, s5, STS EN CNT (16, 18, 20); the legacy
    -- ports': version, parts, 0x61 and the i8042's five (8-13), the queue's count (14, and 2 bytes an
    -- entry; empty here), CMOS index (15), NMI mask (16), RAM, the clock's offset (145, s64)
    local cases = {
      { "serial", "port 0x3f8", poke(0, u32(2)), "state version 2 (this build reads 1)" },
      { "serial", "port 0x3f8", poke(2), "state of 2 bytes, too short for a version" },
      { "serial", "port 0x3f8", poke(25), "state truncated (25 bytes)" },
      { "serial", "port 0x3f8", function(st) return st .. "x" end, "state of 27 bytes, 1 more than its fields" },
      { "serial", "port 0x3f8", poke(24, u8(17)), "receive FIFO holds 17 bytes (at most 16)" },
      { "serial", "port 0x3f8", poke(24, u8(2) .. "ab\0"), "receive FIFO holds 2 bytes with the FIFO off (at most 1)" },
      { "serial", "port 0x3f8", poke(25, u8(33)), "33 bytes of typeahead held (at most 32)" },
      { "serial", "port 0x3f8", poke(12, u8(0xff)), "IER 0xff (bits 3-0 only)" },
      { "serial", "port 0x3f8", poke(13, u8(0x06)), "FCR 0x06 (0, or FIFO enable with bits 7, 6, 3)" },
      { "serial", "port 0x3f8", poke(15, u8(0x20)), "MCR 0x20 (bits 4-0 only)" },
      { "serial", "port 0x3f8", poke(16, u8(0x21)), "LSR 0x21 (only the error bits are kept)" },
      { "serial", "port 0x3f8", poke(22, u8(2)), "THR-empty pending 2 (0 or 1)" },
      { "serial", "port 0x3f8", poke(23, u8(9)), "9 LSR polls in a row (at most 8)" },
      { "serial", "port 0x3f8", poke(4, u32(0x2f8)), "a UART at port 0x2f8, this one is at 0x3f8" },
      { "legacy", "port 0x60", poke(14, u8(9)), "i8042 queue holds 9 bytes (at most 8)" },
      { "legacy", "port 0x60", poke(14, u8(1) .. "\x55\x04"), "i8042 queue entry 0 has flags 0x4 (0-3)" },
      { "legacy", "port 0x60", poke(15, u8(0x80)), "CMOS index 0x80 (0-0x7f)" },
      { "legacy", "port 0x60", poke(16, u8(2)), "CMOS NMI mask 2 (0 or 1)" },
      { "legacy", "port 0x60", poke(145, string.pack("<i8", math.mininteger)),
        "clock offset -9223372036854775808 s (at most 2^40)" },
      { "legacy", "port 0x60", poke(157, u8(0x04)), "reset control 0x04 (bits 3, 1 only)" },
      { "power", "port 0x600", poke(20, u16(0)), "PM1a_CNT 0x0000 (SCI_EN always set, SLP_EN never)" },
      { "power", "port 0x600", poke(20, u16(0x2001)), "PM1a_CNT 0x2001 (SCI_EN always set, SLP_EN never)" },
      { "debugcon", "port 0xe9", poke(4, u32(0xea)), "a debug console at port 0xea, this one is at 0xe9" },
      { "debug_exit", "port 0x501", function(st) return st .. "\0" end, "state of 5 bytes, 1 more than its fields" },
    }
    for _, case in ipairs(cases) do
      it(("%s: %s"):format(case[1], case[4]), function()
        support.need_kvm()
        local vm <close>, cpu = pio_vm(function(v)
          v:serial{ output = false }
          v:legacy_ports()
          v:power()
          v:debugcon{ output = false }
        end)
        local snap = edited(snapshot(vm), case[1], case[3])
        ports(vm, cpu, { { "out", COM + SCR, 0x42 }, { "out", 0x70, 0x0e }, { "out", 0x71, 0x24 },
                         { "out", 0x602, 0x20 } })
        local ok, err = vm:restore(snap)
        assert.is_nil(ok)
        assert.equal(("vm:restore: device %s at %s: %s"):format(case[1], case[2], case[4]), err)
        -- nothing changed: the devices, memory (the script is still there)
        assert.same({ 0x42, 0x24, 0x20 }, ports(vm, cpu, { { "in", COM + SCR }, { "out", 0x70, 0x0e },
                                                            { "in", 0x71 }, { "in", 0x602 } }))
      end)
    end

    -- the virtio transport's state: version, device id, queues, irq (0-15), features offered
    -- (16) and accepted (24), the three selectors (32-43), status (44), ISR (48), config
    -- generation (52), config space (56-311), the error's length (312) and bytes, per queue
    -- num, ready, desc, avail, used, last_avail, used_idx (313 on, with no error), then the
    -- type's length and state (virtio-blk: version, sectors, read-only)
    local vcases = {
      { poke(4, u32(4)), "virtio device 4 with 1 queues, this one is device 2 with 1" },
      { poke(12, u32(5)), "a device on IRQ 5, this one is on IRQ 16" },
      { poke(16, string.pack("<I8", 1 << 32)), "features 0x100000000 offered, this device offers 0x100000204" },
      { poke(44, u32(0x100)), "status 0x100 (a byte)" },
      { poke(24, string.pack("<I8", 1 << 40)), "FEATURES_OK with features 0x10000000000 accepted of 0x100000204 offered" },
      { poke(48, u32(4)), "InterruptStatus 0x4 (bits 1-0 only)" },
      { poke(44, u32(15 | 64)), "DEVICE_NEEDS_RESET set without a message why" },
      { function(st) return poke(44, u32(15 | 64))(st):sub(1, 312) .. "\3a\nb" .. st:sub(314) end,
        "a byte 0x0a in the error message" },
      { function(st) return st:sub(1, 312) .. "\3why" .. st:sub(314) end,
        "DEVICE_NEEDS_RESET clear with a message why" },
      { poke(312, u8(96)), "an error message of 96 bytes (at most 95)" },
      { poke(313, u32(512)), "queue 0: QueueNum is not a power of two up to QueueNumMax" },
      { poke(313, u32(6)), "queue 0: QueueNum is not a power of two up to QueueNumMax" },
      { poke(317, u32(2)), "queue 0: QueueReady is neither 0 nor 1" },
      { poke(321, string.pack("<I8", DESC + 8)), "queue 0: a ring is misaligned" },
      { poke(349, u32(17)), "the device type's state of 17 bytes runs past the state's end" },
      { poke(357, string.pack("<I8", 9)), "a disk of 9 sectors, this one has 8" },
      { poke(365, u32(2)), "a read-only disk, this one is read-write" },
      { poke(353, u32(7)), "state version 7 (this build reads 1)" },
    }
    -- the disks have discard off: the features these messages name must not
    -- depend on whether the file system under /tmp punches holes
    for _, case in ipairs(vcases) do
      it("virtio-blk: " .. case[2], function()
        support.need_kvm()
        local vm <close>, dev = virtio_vm(function(v) return v:virtio_blk{ path = image(8), discard = false } end)
        local q = driver(vm, dev)
        assert.equal(0, q.read_sector(1))
        local snap = edited(snapshot(vm), "virtio-blk", case[1])
        w(dev, V.STATUS, 0)
        local before = dev:info()
        local ok, err = vm:restore(snap)
        assert.is_nil(ok)
        assert.equal("vm:restore: device virtio-blk at MMIO 0xfeb00000: " .. case[2], err)
        assert.same(before, dev:info())
      end)
    end

    it("a ready queue's rings outside guest memory: restored, then the device needs a reset", function()
      support.need_kvm()
      local vm <close>, dev = virtio_vm(function(v) return v:virtio_blk{ path = image(8), discard = false } end)
      local q = driver(vm, dev)
      assert.equal(0, q.read_sector(1))
      w(dev, V.ACK, 1)
      local snap = edited(snapshot(vm), "virtio-blk", poke(321, string.pack("<I8", 1 << 20)))
      restore(vm, snap)
      local info = dev:info()
      assert.same({ "a ring outside guest memory", NEEDS_RESET, false, 1 << 20 },
                  { info.error, info.status & NEEDS_RESET, info.queues[1].ready, info.queues[1].desc })
      assert.equal(2, r(dev, V.ISR))             -- the configuration-change interrupt
      q.idx = 1
      assert.equal(0xee, q.read_sector(2))       -- no more requests taken
    end)

    it("an unchanged file restores", function()
      support.need_kvm()
      local vm <close>, dev = virtio_vm(function(v) return v:virtio_blk{ path = image(8), discard = false } end)
      local q = driver(vm, dev)
      assert.equal(0, q.read_sector(1))
      local info = dev:info()
      local snap = edited(snapshot(vm), "virtio-blk", function(st) return st end)
      w(dev, V.STATUS, 0)
      restore(vm, snap)
      assert.same(info, dev:info())
    end)
  end)
end)
