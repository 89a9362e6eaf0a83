--- vm:virtio (csrc/virtio_lua.c): a virtio device written in Lua on the
-- virtio-mmio transport. A driver written here (spec/virtio_driver.lua) puts
-- chains in guest memory and notifies through dev:write, or a real-mode
-- guest notifies through the run loop (cpu:run, and vm:run's vCPU threads).
-- The contract: chains as views (lengths, reads and writes by offset, bounds
-- errors), the used ring and the interrupt, views that end with their call
-- or at done, chains held for a later call, a handler's error, set_config,
-- several queues, a hostile driver, and every bad option.
local support = require "support"
local vd = require "virtio_driver"

local R = vd.R
local NEXT, WRITE = vd.NEXT, vd.WRITE
local NEEDS_RESET, DRIVER_OK = vd.NEEDS_RESET, vd.DRIVER_OK
local BUF = vd.BUF
local new_vm, w, r, driver, blk_req = vd.new_vm, vd.w, vd.r, vd.driver, vd.blk_req

local tmp = {}
teardown(function() for _, p in ipairs(tmp) do os.remove(p) end end)

-- a device of `opts` (type "entropy" unless given) whose on_queue is fn
local function device(vm, fn, opts)
  opts = opts or {}
  opts.type = opts.type or "entropy"
  opts.on_queue = fn
  return assert(vm:virtio(opts))
end

-- a chain of two readable buffers ("hello", " from guest") and two writable
-- ones (3 and 10 bytes, zeroed), at descriptor `first` on
local function two_by_two(vm, first, at)
  at = at or BUF
  vm:write(at, "hello")
  vm:write(at + 0x40, " from guest")
  vm:write(at + 0x100, ("\0"):rep(3))
  vm:write(at + 0x200, ("\0"):rep(10))
  return { { at, 5, NEXT }, { at + 0x40, 11, NEXT }, { at + 0x100, 3, NEXT | WRITE }, { at + 0x200, 10, WRITE } },
    nil, nil, first
end

-- one writable buffer of n bytes at `at`, as descriptor `first`
local function one_writable(at, n, first)
  return { { at, n, WRITE } }, nil, nil, first
end

-- used ring entry i (from 0): id, len
local function used_entry(vm, i)
  return vm:u32(vd.USED + 4 + 8 * i), vm:u32(vd.USED + 8 + 8 * i)
end

describe("vm:virtio: a virtio device written in Lua #guest", function()
  it("registers: the device id by name or number, features with VERSION_1, config bytes, queues", function()
    support.need_kvm()
    local vm = new_vm()
    local noop = function() end
    local dev = device(vm, noop, { type = "block", features = (1 << 5) | (1 << 9) | (1 << 50),
                                   config = string.pack("<I8", 2048), queues = 3 })
    assert.equal(0x74726976, r(dev, R.MAGIC))
    assert.equal(2, r(dev, R.DEVICE_ID))
    w(dev, R.DEV_FEAT_SEL, 0)
    assert.equal((1 << 5) | (1 << 9), r(dev, R.DEV_FEAT))
    w(dev, R.DEV_FEAT_SEL, 1)
    assert.equal(1 | (1 << 18), r(dev, R.DEV_FEAT))          -- VERSION_1 and bit 50
    assert.equal(2048, dev:read(R.CONFIG, 8))
    assert.equal(0, dev:read(R.CONFIG + 8, 4))
    for qi = 0, 2 do
      w(dev, R.QSEL, qi)
      assert.equal(256, r(dev, R.QNUM_MAX))
    end
    w(dev, R.QSEL, 3)
    assert.equal(0, r(dev, R.QNUM_MAX))
    local info = dev:info()
    assert.same({ "virtio", 2, 0xfeb00000, 16, 3 }, { info.kind, info.device_id, info.base, info.irq, #info.queues })
    assert.equal("kvm.virtio virtio at 0xfeb00000 irq 16", tostring(dev))
    assert.same({ kind = "virtio-lua", first = 0xfeb00000, last = 0xfeb001ff },
      { kind = vm:claims()[1].kind, first = vm:claims()[1].first, last = vm:claims()[1].last })
    assert.equal(4, r(device(vm, noop, { type = "entropy" }), R.DEVICE_ID))
    assert.equal(3, r(device(vm, noop, { type = "console" }), R.DEVICE_ID))
    assert.equal(42, r(device(vm, noop, { type = 42 }), R.DEVICE_ID))
    vm:close()
  end)

  it("on_queue pops a chain: lengths, reads and writes across buffers, done puts it in the used ring " ..
     "and raises the interrupt", function()
    support.need_kvm()
    local vm = new_vm()
    local seen = {}
    local dev
    dev = device(vm, function(q)
      local c = q:pop()
      if not c then return end
      seen.q = { q.index, q.num, q.driver_features, q.device == dev, tostring(q) }
      seen.c = { c.readable, c.writable, c.head, c.queue, tostring(c) }
      seen.reads = { c:read(), c:read(3, 6), c:read(16), c:read(5) }
      seen.wrote = c:write(1, "ABCDEFGH")
      c:done()
      seen.after = q:pop()
      seen.calls = vm:stats().virtio_lua_calls
    end, { features = 1 << 3 })
    local q = driver(vm, dev, { features = 1 << 3 })
    assert.is_nil(seen.c)                                 -- DRIVER_OK: a call with nothing to pop
    q.submit(two_by_two(vm))
    assert.same({ 0, 8, (1 << 32) | (1 << 3), true, "kvm.virtio.queue 0" }, seen.q)
    assert.equal((1 << 32) | (1 << 3), dev.driver_features)
    assert.same({ 16, 13, 0, 0, "kvm.virtio.chain 0 of queue 0: 16 readable, 13 writable" }, seen.c)
    assert.same({ "hello from guest", "lo fro", "", " from guest" }, seen.reads)
    assert.equal(9, seen.wrote)
    assert.is_nil(seen.after)
    assert.equal("\0AB", vm:read(BUF + 0x100, 3))
    assert.equal("CDEFGH\0\0\0\0", vm:read(BUF + 0x200, 10))
    assert.same({ 1, 0, 9 }, { q.used() })                -- written: the furthest write's end
    assert.equal(1, r(dev, R.ISR))
    local s = vm:stats()
    assert.same({ 1, 1, 0 }, { s.virtio_irqs, s.virtio_lua_used, s.virtio_lua_held })
    assert.equal(2, seen.calls)
    w(dev, R.ACK, 1)
    assert.equal(0, r(dev, R.ISR))
    vm:close()
  end)

  it("done(written) says how many bytes; without writes the default is 0; one interrupt a call", function()
    support.need_kvm()
    local vm = new_vm()
    local dev = device(vm, function(q)
      local a, b = q:pop(), q:pop()
      if not a then return end                             -- DRIVER_OK's call
      a:write(0, "xy")
      a:done(7)
      b:done()
    end)
    local q = driver(vm, dev)
    q.put(one_writable(BUF, 16, 0))
    q.submit(one_writable(BUF + 0x100, 16, 2))
    assert.equal(2, vm:u16(vd.USED + 2))
    assert.same({ 0, 7, 2, 0 }, { select(1, used_entry(vm, 0)), select(2, used_entry(vm, 0)),
                                  select(1, used_entry(vm, 1)), select(2, used_entry(vm, 1)) })
    assert.equal("xy", vm:read(BUF, 2))
    assert.equal(1, vm:stats().virtio_irqs)
    vm:close()
  end)

  it("bounds: outside a part, negative offsets and lengths, a written count past the writable part " ..
     "raise; the view stays usable", function()
    support.need_kvm()
    local vm = new_vm()
    local errs
    local dev = device(vm, function(q)
      local c = q:pop()
      if not c then return end
      local function e(name, ...) return support.merr(c, name, ...) end
      errs = {
        e("read", 0, 17), e("read", 17), e("read", 10, 7), e("write", 12, "xy"), e("write", 14, ""),
        e("read", -1), e("read", 0, -1), e("write", 0), e("write", -1, "x"), e("write"),
        e("done", 14), e("done", -1), e("done", "x"),
      }
      assert(c:read(16, 0) == "" and c:write(13, "") == 13 and c:write(11, "zz") == 13)
      c:done(0)
    end)
    local q = driver(vm, dev)
    q.submit(two_by_two(vm))
    local part = "kvm.virtio.chain: %d bytes at offset %d are outside the %s %d bytes"
    assert.same({
      part:format(17, 0, "readable", 16), part:format(0, 17, "readable", 16), part:format(7, 10, "readable", 16),
      part:format(2, 12, "writable", 13), part:format(0, 14, "writable", 13),
      "bad argument #1 to 'read' (offset must not be negative)",
      "bad argument #2 to 'read' (length must not be negative)",
      "bad argument #2 to 'write' (string expected, got no value)",
      "bad argument #1 to 'write' (offset must not be negative)",
      "bad argument #1 to 'write' (number expected, got no value)",
      "kvm.virtio.chain: 14 bytes written, but the writable part is 13 bytes",
      "kvm.virtio.chain: -1 bytes written, but the writable part is 13 bytes",
      "bad argument #1 to 'done' (number expected, got string)",
    }, errs)
    assert.same({ 1, 0, 0 }, { q.used() })
    assert.equal("zz", vm:read(BUF + 0x200 + 8, 2))
    vm:close()
  end)

  it("a chain and its queue are views for the call only: after it, or after done, they raise", function()
    support.need_kvm()
    local vm = new_vm()
    local kept = {}
    local dev = device(vm, function(q)
      local c = q:pop()
      if not c then return end
      if kept.held then
        kept.stale = support.merr(kept.held, "read")   -- the last call's view of the chain popped again
        kept.again = c.head
        c:done()
        return
      end
      local d = q:pop()
      d:done(0)
      kept.in_call = support.merr(d, "write", 0, "x")
      kept.q, kept.c, kept.d, kept.held = q, c, d, c
    end)
    local q = driver(vm, dev)
    q.put(one_writable(BUF, 8, 0))
    q.submit(one_writable(BUF + 0x100, 8, 1))
    local done_msg = "kvm.virtio.chain: used after chain:done (its buffers are the driver's again)"
    local ended = "kvm.virtio.chain: used after its on_queue call returned (a chain is a view for the call only)"
    assert.equal(done_msg, kept.in_call)
    assert.equal(ended, support.merr(kept.c, "read"))
    assert.equal(ended, support.merr(kept.c, "write", 0, "x"))
    assert.equal(ended, support.merr(kept.c, "done"))
    assert.equal(done_msg, support.merr(kept.d, "done"))
    assert.equal("kvm.virtio.queue: used outside its on_queue call (a queue object is valid during the call only)",
      support.merr(kept.q, "pop"))
    assert.equal("kvm.virtio.queue: used outside its on_queue call (a queue object is valid during the call only)",
      support.merr(kept.q, "chains"))
    assert.same({ 0, 8, "kvm.virtio.chain 0 of queue 0: 0 readable, 8 writable (ended)",
                  "kvm.virtio.chain 1 of queue 0: 0 readable, 8 writable (done)", "kvm.virtio.queue 0 (outside its call)" },
      { kept.c.head, kept.c.writable, tostring(kept.c), tostring(kept.d), tostring(kept.q) })
    dev:process(0)                                         -- chain 0 was held: popped again
    assert.equal(ended, kept.stale)
    assert.equal(0, kept.again)
    assert.same({ 2, 0, 0 }, { q.used() })
    vm:close()
  end)

  it("chains not done are held, popped again first (in order) at the next call; dev:process makes one", function()
    support.need_kvm()
    local vm = new_vm()
    local mode, heads = "hold", {}
    local dev = device(vm, function(q)
      for c in q:chains() do
        heads[#heads + 1] = c.head
        if mode == "done" then c:done(c:write(0, "d" .. c.head)) end
      end
    end)
    local q = driver(vm, dev)
    q.put(one_writable(BUF, 8, 0))
    q.submit(one_writable(BUF + 0x100, 8, 2))
    assert.same({ 0, 2 }, heads)
    assert.equal(0, vm:u16(vd.USED + 2))
    assert.equal(2, dev:info().queues[1].last_avail)
    assert.equal(2, vm:stats().virtio_lua_held)
    q.submit(one_writable(BUF + 0x200, 8, 4))
    assert.same({ 0, 2, 0, 2, 4 }, heads)
    assert.equal(0, r(dev, R.ISR))
    mode, heads = "done", {}
    dev:process(0)
    assert.same({ 0, 2, 4 }, heads)
    assert.equal(3, vm:u16(vd.USED + 2))
    assert.same({ 0, 2, 2, 2, 4, 2 }, { select(1, used_entry(vm, 0)), select(2, used_entry(vm, 0)),
      select(1, used_entry(vm, 1)), select(2, used_entry(vm, 1)), select(1, used_entry(vm, 2)), select(2, used_entry(vm, 2)) })
    assert.same({ "d0", "d2", "d4" }, { vm:read(BUF, 2), vm:read(BUF + 0x100, 2), vm:read(BUF + 0x200, 2) })
    assert.equal(1, r(dev, R.ISR))
    heads = {}
    dev:process(0)                                         -- nothing left
    assert.same({}, heads)
    vm:close()
  end)

  it("a handler's error is raised by dev:write; the chain it popped is held", function()
    support.need_kvm()
    local vm = new_vm()
    local mode = "fail"
    local dev = device(vm, function(q)
      local c = q:pop()
      if c and mode == "fail" then error("boom") end
      if c then c:done() end
    end)
    local q = driver(vm, dev)
    q.put(one_writable(BUF, 8, 0))
    assert.equal("boom", support.merr(dev, "write", R.NOTIFY, 4, 0))
    assert.equal(0, vm:u16(vd.USED + 2))
    assert.equal(1, vm:stats().virtio_lua_held)
    assert.equal("boom", support.merr(dev, "process", 0))
    mode = "done"
    dev:process(0)
    assert.same({ 1, 0, 0 }, { q.used() })
    assert.is_nil(dev:info().error)
    vm:close()
  end)

  describe("a guest notifies through the run loop", function()
    -- real mode: mov ax, 0xd000; mov ds, ax; mov dword [0x50], 0 (QueueNotify
    -- of the device at 0xd0000); out 0x99, al (a port handler: kvm.STOP)
    local NOTIFY = "\xb8\x00\xd0\x8e\xd8\x66\xc7\x06\x50\x00\x00\x00\x00\x00\xe6\x99"

    -- a guest with `ncpus` vCPUs (the others wait for a start-up IPI) and
    -- the Lua device on_queue = fn; queue 0 set up, one chain waiting
    local function setup(fn, ncpus)
      local kvm = require "kvm"
      local dev
      local vm, cpu = support.guest(NOTIFY, { size = 0xd0000, setup = function(v)
        assert(v:irqchip())
        v:on_io(0x99, function() return kvm.STOP end)
        dev = device(v, fn, { base = 0xd0000, irq = 5 })
      end })
      local q = driver(vm, dev)
      q.put(one_writable(BUF, 16, 0))
      for i = 1, (ncpus or 1) - 1 do assert(vm:vcpu(i)) end
      return vm, cpu, dev, q
    end

    local function writer(q)
      for c in q:chains() do c:done(c:write(0, "from-the-handler")) end
    end

    it("cpu:run: on_queue runs at the vCPU's exit; the used entry and the interrupt follow", function()
      support.need_kvm()
      local vm, cpu, _, q = setup(writer)
      assert.equal("stopped", cpu:run{ timeout = 5 }.reason)
      assert.equal("from-the-handler", vm:read(BUF, 16))
      assert.same({ 1, 0, 16 }, { q.used() })
      assert.equal(1, vm:stats().virtio_irqs)
      vm:close()
    end)

    it("vm:run with two vCPUs: on_queue runs on the Lua thread for the vCPU thread", function()
      support.need_kvm()
      local vm, _, _, q = setup(writer, 2)
      local e = vm:run{ timeout = 5 }
      assert.same({ "stopped", 0 }, { e.reason, e.cpu })
      assert.equal("from-the-handler", vm:read(BUF, 16))
      assert.same({ 1, 0, 16 }, { q.used() })
      vm:close()
    end)

    for _, n in ipairs{ 1, 2 } do
      it(("a handler's error ends the run (%d vCPU%s) with its traceback; the chain is held"):format(n,
         n == 1 and "" or "s"), function()
        support.need_kvm()
        local mode = "fail"
        local vm, _, dev, q = setup(function(qq)
          local c = qq:pop()
          if c and mode == "fail" then error("boom in on_queue") end
          if c then c:done() end
        end, n)
        local ok, err = pcall(vm.run, vm, { timeout = 5 })
        assert.is_false(ok)
        assert.matches("boom in on_queue", err, 1, true)
        assert.matches("stack traceback:", err, 1, true)
        assert.equal(0, vm:u16(vd.USED + 2))
        mode = "done"
        dev:process(0)
        assert.same({ 1, 0, 0 }, { q.used() })
        vm:close()
      end)
    end
  end)

  it("a console written in Lua: its receive buffer waits for input, which a port handler delivers " ..
     "inside the run loop (dev:process); what the guest transmits reaches the script", function()
    support.need_kvm()
    local kvm = require "kvm"
    -- out 0x98, al (input arrives); ds = 0xd000; mov dword [0x50], 1 (notify the
    -- transmit queue); out 0x99, al (stop)
    local code = "\xe6\x98\xb8\x00\xd0\x8e\xd8\x66\xc7\x06\x50\x00\x01\x00\x00\x00\xe6\x99"
    local typed, sent, dev = {}, {}, nil
    local vm, cpu = support.guest(code, { size = 0xd0000, setup = function(v)
      assert(v:irqchip())
      dev = device(v, function(q)
        if q.index == 1 then
          for c in q:chains() do sent[#sent + 1] = c:read(); c:done(0) end
        else
          while #typed > 0 do
            local c = q:pop()
            if not c then break end
            c:done(c:write(0, table.remove(typed, 1)))
          end
        end
      end, { type = "console", queues = 2, base = 0xd0000, irq = 5 })
      v:on_io(0x98, function() typed[#typed + 1] = "typed"; dev:process(0) end)
      v:on_io(0x99, function() return kvm.STOP end)
    end })
    local rx = driver(vm, dev)
    rx.submit(one_writable(BUF, 16, 0))                   -- no input yet: not taken, it waits
    assert.same({ 0, 0 }, { vm:u16(vd.USED + 2), dev:info().queues[1].last_avail })
    local tx = vd.queue(vm, dev, 1, { desc = 0x13000, avail = 0x14000, used = 0x15000 })
    vm:write(BUF + 0x100, "hello")
    tx.put{ { BUF + 0x100, 5, 0 } }
    assert.equal("stopped", cpu:run{ timeout = 5 }.reason)
    assert.same({ 1, 0, 5 }, { rx.used() })
    assert.equal("typed", vm:read(BUF, 5))
    assert.same({ "hello" }, sent)
    assert.same({ 1, 0, 0 }, { tx.used() })
    vm:close()
  end)

  it("set_config: the new bytes, ConfigGeneration + 1, a configuration interrupt once DRIVER_OK", function()
    support.need_kvm()
    local vm = new_vm()
    local dev = device(vm, function() end, { config = "abc" })
    assert.equal(0x636261, dev:read(R.CONFIG, 4))
    assert.equal(dev, dev:set_config("xyz!"))
    assert.same({ 0x217a7978, 1, 0 }, { dev:read(R.CONFIG, 4), r(dev, R.GEN), r(dev, R.ISR) })
    driver(vm, dev)
    dev:set_config(("x"):rep(256))
    assert.same({ 0x78, 2, 2 }, { dev:read(R.CONFIG + 255, 1), r(dev, R.GEN), r(dev, R.ISR) })
    assert.equal(1, vm:stats().virtio_irqs)
    dev:set_config("")
    assert.equal(0, dev:read(R.CONFIG, 8))
    assert.equal("bad argument #1 to 'set_config' (at most 256 bytes)", support.merr(dev, "set_config", ("x"):rep(257)))
    assert.equal("bad argument #1 to 'set_config' (string expected, got no value)", support.merr(dev, "set_config"))
    assert.equal("bad argument #1 to 'process' (no such queue)", support.merr(dev, "process", 1))
    assert.equal("bad argument #1 to 'process' (no such queue)", support.merr(dev, "process", -1))
    local rng = vm:virtio_rng()
    assert.same({ 0, nil }, { rng.driver_features, rng.bogus })
    assert.equal("set_config: the virtio-rng device is not a Lua device (vm:virtio)", support.merr(rng, "set_config", "x"))
    assert.equal("process: the virtio-rng device is not a Lua device (vm:virtio)", support.merr(rng, "process", 0))
    vm:close()
    assert.equal("attempt to use a closed kvm.virtio", support.merr(dev, "set_config", "x"))
    assert.equal("attempt to use a closed kvm.virtio", support.merr(dev, "process", 0))
    assert.equal("attempt to use a closed kvm.virtio", support.err(function() return dev.driver_features end))
  end)

  it("several queues: each call gets its queue; another queue's call runs at once, its own after it", function()
    support.need_kvm()
    local vm = new_vm()
    local log, first, q0_chain = {}, false, nil
    local dev
    dev = device(vm, function(q)
      log[#log + 1] = "enter " .. q.index
      local c = q:pop()
      if c then c:done(c:write(0, "q" .. q.index)) end
      if q.index == 0 and first then
        first = false
        q0_chain = q:pop()                                 -- a second chain of queue 0, done below
        dev:process(1)
        dev:process(0)
        q0_chain:done(q0_chain:write(0, "late"))
      end
      log[#log + 1] = "leave " .. q.index
    end, { queues = 2 })
    local q0 = driver(vm, dev)
    local q1 = vd.queue(vm, dev, 1, { desc = 0x13000, avail = 0x14000, used = 0x15000 })
    q1.put(one_writable(BUF + 0x300, 8, 0))
    q0.put(one_writable(BUF, 8, 0))
    log, first = {}, true
    q0.submit(one_writable(BUF + 0x100, 8, 1))
    assert.same({ "enter 0", "enter 1", "leave 1", "leave 0", "enter 0", "leave 0" }, log)
    assert.same({ "q0", "late", "q1" }, { vm:read(BUF, 2), vm:read(BUF + 0x100, 4), vm:read(BUF + 0x300, 2) })
    assert.same({ 2, 1, 4 }, { q0.used() })
    assert.same({ 1, 0, 2 }, { q1.used() })
    vm:close()
  end)

  it("a snapshot keeps its transport, and is refused while the script holds a chain", function()
    support.need_kvm()
    local vm = new_vm()
    assert(vm:vcpu(0))
    local heads, hold = {}, true
    local dev = device(vm, function(q)
      for c in q:chains() do
        heads[#heads + 1] = c.head
        if not hold then c:done(0) end
      end
    end)
    local q = driver(vm, dev)
    q.submit(one_writable(BUF, 8, 2))                      -- held by the script
    local ok, msg = vm:snapshot()
    assert.is_nil(ok)
    assert.matches("device virtio%-lua: 1 chain held by the script: finish them %(chain:done%) first", msg)
    hold = false
    dev:process(0)                                         -- done now
    local snap = assert(vm:snapshot())
    local before = dev:info()
    w(dev, R.STATUS, 0)                                    -- a reset
    assert.equal(0, dev:info().status)
    assert.is_true(vm:restore(snap))
    assert.same(before, dev:info())                        -- back as it was
    q.submit(one_writable(BUF + 0x100, 8, 3))              -- and the queue goes on
    assert.same({ 2, 2, 3 }, heads)
    vm:close()
  end)

  describe("a hostile driver gets DEVICE_NEEDS_RESET; pop gives nil", function()
    it("more chains in flight than the queue holds (one descriptor offered three times)", function()
      support.need_kvm()
      local vm = new_vm()
      local pops = {}
      local dev = device(vm, function(q)
        local n = 0
        for _ in q:chains() do n = n + 1 end
        pops[#pops + 1] = n
      end)
      local q = driver(vm, dev, { num = 2 })
      for _ = 1, 3 do q.submit(one_writable(BUF, 8, 0)) end
      assert.same({ 0, 1, 2, 2 }, pops)
      assert.equal("more chains in flight than the queue holds", dev:info().error)
      assert.equal(NEEDS_RESET, dev:info().status & NEEDS_RESET)
      assert.equal(2, r(dev, R.ISR) & 2)
      vm:close()
    end)

    it("a buffer outside guest memory", function()
      support.need_kvm()
      local vm = new_vm()
      local got = "not called"
      local dev = device(vm, function(q) got = q:pop() end)
      local q = driver(vm, dev)
      q.submit{ { vd.RAM - 8, 16, WRITE } }
      assert.is_nil(got)
      assert.equal("a buffer outside guest memory", dev:info().error)
      vm:close()
    end)

    it("a reset drops the held chains; the device works again after it", function()
      support.need_kvm()
      local vm = new_vm()
      local heads, mode = {}, "hold"
      local dev = device(vm, function(q)
        for c in q:chains() do
          heads[#heads + 1] = c.head
          if mode == "done" then c:done() end
        end
      end)
      local q = driver(vm, dev)
      q.submit(one_writable(BUF, 8, 3))
      assert.same({ 3 }, heads)
      mode, heads = "done", {}
      q = driver(vm, dev)                                  -- reset, and the queue anew
      dev:process(0)
      assert.same({}, heads)
      q.submit(one_writable(BUF, 8, 1))
      assert.same({ 1 }, heads)
      assert.same({ 1, 1, 0 }, { q.used() })
      vm:close()
    end)
  end)

  it("a chain's buffers are looked up at each access: memory closed in the call; a VM closed in it", function()
    support.need_kvm()
    local kvm = require "kvm"
    local vm = assert(kvm.vm())
    assert(vm:memory{ guest = 0, size = 0x30000 })
    local high = assert(vm:memory{ guest = 0x100000, size = 0x1000 })
    local errs = {}
    local dev = device(vm, function(q)
      local c = q:pop()
      if not c then return end
      if c.writable == 8 then
        high:close()
        errs[#errs + 1] = support.merr(c, "write", 0, "x")
        c:done(0)
      else
        vm:close()
        errs[#errs + 1] = support.merr(c, "read")
        errs[#errs + 1] = support.merr(q, "pop")
      end
    end)
    local q = driver(vm, dev)
    q.submit(one_writable(0x100000, 8, 0))
    assert.same({ 1, 0, 0 }, { q.used() })
    q.submit{ { BUF, 4, 0 } }
    assert.same({ "kvm.virtio.chain: a buffer of the chain is no longer in guest memory",
                  "attempt to use a closed kvm.virtio", "attempt to use a closed kvm.virtio" }, errs)
    assert.equal("attempt to use a closed kvm.virtio", support.merr(dev, "read", 0, 4))
  end)

  it("examples/cow_disk.lua's device: reads fall through to the image, writes stay in the table, every " ..
     "request traced, the image unchanged", function()
    support.need_kvm()
    local cow = dofile("examples/cow_disk.lua")
    local path = support.write_tmp(("A"):rep(512) .. ("B"):rep(512) .. ("C"):rep(512) .. ("D"):rep(512) .. "tail", tmp)
    local trace = {}
    local disk = assert(cow.new(path, { trace = function(op, sector, n) trace[#trace + 1] = ("%s %d %d"):format(op, sector, n) end }))
    assert.same({ nil, "/nonexistent.img: No such file or directory" }, { cow.new("/nonexistent.img") })
    local vm = new_vm()
    local dev = assert(vm:virtio(disk.options))
    assert.same({ 2, (1 << 2) | (1 << 9), 4, 126 }, { r(dev, R.DEVICE_ID), r(dev, R.DEV_FEAT), dev:read(R.CONFIG, 8),
                                                    dev:read(R.CONFIG + 12, 4) })
    local q = driver(vm, dev, { features = (1 << 2) | (1 << 9) })
    assert.equal(0, blk_req(q, vm, 1, 1, 512, "out", ("z"):rep(512)))            -- OUT sector 1
    assert.equal(0, blk_req(q, vm, 0, 0, 1536, "in"))                              -- IN sectors 0-2
    assert.equal(("A"):rep(512) .. ("z"):rep(512) .. ("C"):rep(512), vm:read(BUF + 0x100, 1536))
    assert.same({ 2, 0, 1537 }, { q.used() })                                    -- data and status
    assert.equal(0, blk_req(q, vm, 4, 0))                                          -- FLUSH
    assert.equal(0, blk_req(q, vm, 8, 0, 20, "in"))                                -- GET_ID
    assert.equal("luakvm-cow" .. ("\0"):rep(10), vm:read(BUF + 0x100, 20))
    assert.equal(2, blk_req(q, vm, 99, 0))                                         -- UNSUPP
    assert.equal(1, blk_req(q, vm, 0, 4, 512, "in"))                               -- past the end (the tail is no sector)
    assert.equal(1, blk_req(q, vm, 0, 3, 1024, "in"))                              -- crosses it
    assert.equal(1, blk_req(q, vm, 1, 0, 100, "out", ("x"):rep(100)))               -- not whole sectors
    assert.equal(1, blk_req(q, vm, 0, -1, 512, "in"))                              -- sector 2^64-1
    q.submit{ { BUF, 8, WRITE } }                                                  -- no header: used, unanswered
    assert.same({ 10, 0, 0 }, { q.used() })
    assert.same({ "W 1 1", "R 0 3", "F 0 0", "I 0 0" }, trace)
    assert.same({ [1] = ("z"):rep(512) }, disk.overlay)
    assert.same({ [0] = true, [1] = true, [2] = true }, disk.read)
    assert.same({ reads = 1, writes = 1, flushes = 1, ids = 1, errors = 4, bad = 1 }, disk.counts)
    assert.is_nil(dev:info().error)
    local saved = support.write_tmp("", tmp)
    assert.is_true(disk.save(saved))
    assert.equal(("A"):rep(512) .. ("z"):rep(512) .. ("C"):rep(512) .. ("D"):rep(512), support.slurp(saved))
    assert.equal(("A"):rep(512) .. ("B"):rep(512) .. ("C"):rep(512) .. ("D"):rep(512) .. "tail", support.slurp(path))
    disk.close()
    vm:close()
  end)

  describe("options", function()
    local fn = function() end
    for _, case in ipairs{
      { {}, "vm:virtio: 'type' must be \"block\", \"console\", \"entropy\" or a device id in 1..65535, got nil" },
      { { type = "disk" }, "vm:virtio: unknown 'type' 'disk' (block, console, entropy or a device id)" },
      { { type = 0 }, "vm:virtio: 'type' must be \"block\", \"console\", \"entropy\" or a device id in 1..65535, got 0" },
      { { type = 65536 },
        "vm:virtio: 'type' must be \"block\", \"console\", \"entropy\" or a device id in 1..65535, got 65536" },
      { { type = 1.5 }, "vm:virtio: 'type' must be \"block\", \"console\", \"entropy\" or a device id in 1..65535, got 1.5" },
      { { type = "block" }, "vm:virtio: 'on_queue' must be a function, got nil" },
      { { type = "block", on_queue = 1 }, "vm:virtio: 'on_queue' must be a function, got number" },
      { { type = "block", on_queue = fn, queues = 0 }, "vm:virtio: 'queues' must be an integer in 1..8, got 0" },
      { { type = "block", on_queue = fn, queues = 9 }, "vm:virtio: 'queues' must be an integer in 1..8, got 9" },
      { { type = "block", on_queue = fn, features = "x" }, "vm:virtio: 'features' must be an integer, got x" },
      { { type = "block", on_queue = fn, features = 1 << 28 },
        "vm:virtio: 'features' bit 28 is the transport's (bits 24-49: it offers VERSION_1 only)" },
      { { type = "block", on_queue = fn, features = (1 << 32) | (1 << 49) },
        "vm:virtio: 'features' bit 49 is the transport's (bits 24-49: it offers VERSION_1 only)" },
      { { type = "block", on_queue = fn, config = 1 }, "vm:virtio: 'config' must be a string, got number" },
      { { type = "block", on_queue = fn, config = ("c"):rep(257) }, "vm:virtio: 'config' is at most 256 bytes, got 257" },
      { { type = "block", on_queue = fn, speed = 1 }, "vm:virtio: unknown option 'speed'" },
      { { type = "block", on_queue = fn, base = 0x1100 }, "vm:virtio: 'base' must be 0x200-aligned" },
      { { type = "block", on_queue = fn, irq = 24 }, "vm:virtio: 'irq' must be an integer in 0..23, got 24" },
    } do
      it("raises " .. case[2], function()
        support.need_kvm()
        local vm = new_vm()
        assert.equal(case[2], support.merr(vm, "virtio", case[1]))
        assert.same({}, vm:claims())
        vm:close()
      end)
    end

    it("VERSION_1 given is fine; the options table is not kept", function()
      support.need_kvm()
      local vm = new_vm()
      local calls = 0
      local o = { type = "block", on_queue = function() calls = calls + 1 end, features = 1 << 32, config = "abcd" }
      local dev = assert(vm:virtio(o))
      o.on_queue, o.config = nil, "changed"
      w(dev, R.DEV_FEAT_SEL, 1)
      assert.equal(1, r(dev, R.DEV_FEAT))
      assert.equal(0x64636261, dev:read(R.CONFIG, 4))
      driver(vm, dev)
      assert.equal(DRIVER_OK, r(dev, R.STATUS) & DRIVER_OK)
      assert.equal(1, calls)
      vm:close()
    end)
  end)
end)
