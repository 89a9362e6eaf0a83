--- virtio-mmio (csrc/virtio.c) and its devices (virtio_blk.c, virtio_rng.c):
-- the registers, a driver written here in Lua that sets up a queue in guest
-- memory and makes requests through dev:write (the same access the run loop
-- makes for a guest), and a hostile driver: every rule broken ends in
-- DEVICE_NEEDS_RESET, never a crash or a hang. One real-mode guest reads the
-- registers through the run loop.
local support = require "support"

local vd = require "virtio_driver"

local R = vd.R
local ACK, DRIVER, FEATURES_OK, NEEDS_RESET = vd.ACK, vd.DRIVER, vd.FEATURES_OK, vd.NEEDS_RESET
local NEXT, WRITE, INDIRECT = vd.NEXT, vd.WRITE, vd.INDIRECT
local DESC, USED = vd.DESC, vd.USED
local BUF = vd.BUF
local RAM = vd.RAM
local new_vm, w, r, driver, blk_req = vd.new_vm, vd.w, vd.r, vd.driver, vd.blk_req

local tmp = {}
teardown(function() for _, p in ipairs(tmp) do os.remove(p) end end)

-- an image of n sectors, sector i filled with the letter 'A' + i % 26
local function image(n) return vd.image(n, tmp) end

describe("virtio-mmio #guest", function()
  describe("registers", function()
    it("a block device: magic, version 2, device 2, features, capacity and seg_max in config", function()
      support.need_kvm()
      local vm = new_vm()
      local dev = assert(vm:virtio_blk{ path = image(3), discard = false })
      assert.equal(0x74726976, r(dev, R.MAGIC))
      assert.equal(2, r(dev, R.VERSION))
      assert.equal(2, r(dev, R.DEVICE_ID))
      assert.equal(0x4d564b4c, r(dev, R.VENDOR))
      w(dev, R.DEV_FEAT_SEL, 0)
      assert.equal((1 << 2) | (1 << 9), r(dev, R.DEV_FEAT))   -- SEG_MAX, FLUSH
      w(dev, R.DEV_FEAT_SEL, 1)
      assert.equal(1, r(dev, R.DEV_FEAT))                      -- VERSION_1
      w(dev, R.DEV_FEAT_SEL, 2)
      assert.equal(0, r(dev, R.DEV_FEAT))
      assert.equal(256, r(dev, R.QNUM_MAX))
      w(dev, R.QSEL, 1)
      assert.equal(0, r(dev, R.QNUM_MAX))                      -- one queue
      assert.equal(3, dev:read(R.CONFIG, 8))                   -- capacity in sectors
      assert.equal(3, dev:read(R.CONFIG, 1))
      assert.equal(254, dev:read(R.CONFIG + 12, 4))            -- seg_max
      assert.equal(0, r(dev, R.GEN))
      assert.equal(0, dev:read(R.MAGIC, 2))                    -- registers answer 32-bit reads only
      local info = dev:info()
      assert.same({ "virtio-blk", 2, 0xfeb00000, 0x200, 16, 0 },
        { info.kind, info.device_id, info.base, info.size, info.irq, info.status })
      assert.equal("kvm.virtio virtio-blk at 0xfeb00000 irq 16", tostring(dev))
      vm:close()
    end)

    it("DISCARD and WRITE_ZEROES offered where the image's file system punches holes, with their limits", function()
      support.need_kvm()
      local vm = new_vm()
      local path = image(3)
      local dev = assert(vm:virtio_blk{ path = path })
      w(dev, R.DEV_FEAT_SEL, 0)
      if support.punches_holes(path) then
        assert.equal((1 << 2) | (1 << 9) | (1 << 13) | (1 << 14), r(dev, R.DEV_FEAT))
        local bs = tonumber(support.sh("stat -c %o '" .. path .. "'"):match("%d+"))   -- st_blksize
        assert.same({ 1 << 22, 32, bs // 512, 1 << 22, 32, 1 },
          { dev:read(R.CONFIG + 36, 4), dev:read(R.CONFIG + 40, 4), dev:read(R.CONFIG + 44, 4),
            dev:read(R.CONFIG + 48, 4), dev:read(R.CONFIG + 52, 4), dev:read(R.CONFIG + 56, 1) })
      else
        assert.equal((1 << 2) | (1 << 9), r(dev, R.DEV_FEAT))
      end
      -- never on a file that cannot punch (a character device), nor read-only
      local zero = assert(vm:virtio_blk{ path = "/dev/zero" })
      local ro = assert(vm:virtio_blk{ path = path, readonly = true })
      for _, d in ipairs{ zero, ro } do
        w(d, R.DEV_FEAT_SEL, 0)
        assert.equal(0, r(d, R.DEV_FEAT) & (3 << 13))
        assert.equal(0, d:read(R.CONFIG + 36, 8))
      end
      vm:close()
    end)

    it("read-only: VIRTIO_BLK_F_RO offered; an entropy device is device 4 in the next slot", function()
      support.need_kvm()
      local vm = new_vm()
      local dev = assert(vm:virtio_blk{ path = image(1), readonly = true })
      assert.equal((1 << 2) | (1 << 5) | (1 << 9), r(dev, R.DEV_FEAT))
      local rng = vm:virtio_rng()
      assert.equal(4, r(rng, R.DEVICE_ID))
      assert.same({ 0xfeb00200, 17 }, { rng:info().base, rng:info().irq })
      local kinds = {}
      for _, c in ipairs(vm:claims()) do kinds[#kinds + 1] = ("%s 0x%x-0x%x"):format(c.kind, c.first, c.last) end
      assert.same({ "virtio-blk 0xfeb00000-0xfeb001ff", "virtio-rng 0xfeb00200-0xfeb003ff" }, kinds)
      vm:close()
    end)

    it("FEATURES_OK stays clear for features not offered, or without VERSION_1", function()
      support.need_kvm()
      local vm = new_vm()
      local dev = assert(vm:virtio_blk{ path = image(1) })
      for _, case in ipairs{ { 1 << 5, 1 }, { 0, 0 }, { 0, 3 } } do
        w(dev, R.STATUS, 0)
        w(dev, R.STATUS, ACK | DRIVER)
        w(dev, R.DRV_FEAT_SEL, 0); w(dev, R.DRV_FEAT, case[1])
        w(dev, R.DRV_FEAT_SEL, 1); w(dev, R.DRV_FEAT, case[2])
        w(dev, R.STATUS, ACK | DRIVER | FEATURES_OK)
        assert.equal(ACK | DRIVER, r(dev, R.STATUS))
      end
      vm:close()
    end)

    it("a real-mode guest reads the magic through the run loop", function()
      support.need_kvm()
      local code = "\xb8\x00\xd0"        -- mov ax, 0xd000
        .. "\x8e\xd8"                     -- mov ds, ax
        .. "\x66\xa1\x00\x00"             -- mov eax, [0]      (base + 0: MagicValue)
        .. "\x66\x8b\x1e\x08\x00"         -- mov ebx, [8]      (DeviceID)
        .. "\x31\xc9\x8e\xd9"             -- xor cx, cx; mov ds, cx
        .. "\x66\xa3\x00\x20"             -- mov [0x2000], eax
        .. "\x66\x89\x1e\x04\x20"         -- mov [0x2004], ebx
        .. "\xf4"                         -- hlt
      local vm, cpu, ram = support.guest(code, { size = 0xd0000, setup = function(v)
        v:virtio_rng{ base = 0xd0000, irq = 5 }
      end })
      assert.equal("hlt", cpu:run{ timeout = 5 }.reason)
      assert.equal(0x74726976, ram:u32(0x2000))
      assert.equal(4, ram:u32(0x2004))
      vm:close()
    end)
  end)

  describe("virtio-blk requests", function()
    it("reads sectors into the guest's buffer, then raises and acks the interrupt", function()
      support.need_kvm()
      local vm = new_vm()
      local dev = assert(vm:virtio_blk{ path = image(4) })
      local q = driver(vm, dev)
      assert.equal(0, blk_req(q, vm, 0, 1, 1024, "in"))
      assert.equal(("B"):rep(512) .. ("C"):rep(512), vm:read(BUF + 0x100, 1024))
      local idx, id, len = q.used()
      assert.same({ 1, 0, 1025 }, { idx, id, len })
      assert.equal(1, r(dev, R.ISR))
      assert.equal(1, vm:stats().virtio_irqs)
      w(dev, R.ACK, 1)
      assert.equal(0, r(dev, R.ISR))
      assert.equal(1, vm:stats().blk_reads)
      vm:close()
    end)

    it("writes, flushes (the file changes), answers GET_ID, UNSUPP and IOERR past the end", function()
      support.need_kvm()
      local vm = new_vm()
      local path = image(2)
      local dev = assert(vm:virtio_blk{ path = path, serial = "disk-one" })
      local q = driver(vm, dev)
      assert.equal(0, blk_req(q, vm, 1, 1, 512, "out", ("z"):rep(512)))
      assert.equal(0, blk_req(q, vm, 4, 0))                               -- FLUSH
      assert.equal(("A"):rep(512) .. ("z"):rep(512), support.slurp(path))
      assert.equal(0, blk_req(q, vm, 8, 0, 20, "in"))                     -- GET_ID
      assert.equal("disk-one" .. ("\0"):rep(12), vm:read(BUF + 0x100, 20))
      assert.equal(2, blk_req(q, vm, 99, 0))                              -- UNSUPP
      assert.equal(1, blk_req(q, vm, 0, 2, 512, "in"))                    -- past the end
      assert.equal(1, blk_req(q, vm, 0, 1, 1024, "in"))                   -- crosses the end
      assert.equal(1, blk_req(q, vm, 0, 0, 100, "in"))                    -- not whole sectors
      assert.equal(1, blk_req(q, vm, 0, -1, 512, "in"))                   -- sector 2^64-1
      assert.equal(0, blk_req(q, vm, 0, 0, 0, "in"))                      -- no data: nothing to read
      local s = vm:stats()
      assert.same({ 1, 1, 512, 4 }, { s.blk_writes, s.blk_flushes, s.blk_write_bytes, s.blk_io_errors })
      assert.equal(0, dev:info().status & NEEDS_RESET)
      vm:close()
    end)

    it("read-only: a write fails with IOERR and the file stays as it was", function()
      support.need_kvm()
      local vm = new_vm()
      local path = image(2)
      local before = support.slurp(path)
      local dev = assert(vm:virtio_blk{ path = path, readonly = true })
      local q = driver(vm, dev, { features = 1 << 5 })
      assert.equal(1, blk_req(q, vm, 1, 0, 512, "out", ("z"):rep(512)))
      assert.equal(0, blk_req(q, vm, 0, 0, 512, "in"))
      assert.equal(0, blk_req(q, vm, 4, 0))
      vm:close()
      assert.equal(before, support.slurp(path))
    end)

    it("takes header, data and status split across buffers however the driver splits them", function()
      support.need_kvm()
      local vm = new_vm()
      local dev = assert(vm:virtio_blk{ path = image(2) })
      local q = driver(vm, dev)
      vm:write(BUF, string.pack("<I4I4I8", 0, 0, 0))
      -- header in 3 pieces; 512 data bytes + status as 300 + 213 writable bytes
      q.submit{ { BUF, 5, NEXT }, { BUF + 5, 7, NEXT }, { BUF + 12, 4, NEXT },
                { BUF + 0x100, 300, NEXT | WRITE }, { BUF + 0x300, 213, WRITE } }
      assert.equal(("A"):rep(300), vm:read(BUF + 0x100, 300))
      assert.equal(("A"):rep(212) .. "\0", vm:read(BUF + 0x300, 213))
      assert.same({ 1, 0, 513 }, { q.used() })
      vm:close()
    end)

    it("reads and writes a request of 250 buffers (a preadv/pwritev each)", function()
      support.need_kvm()
      local vm = new_vm()
      local path = image(300)
      local dev = assert(vm:virtio_blk{ path = path })
      local q = driver(vm, dev, { num = 256 })
      local function chain(dir)
        local d = { { BUF, 16, NEXT } }
        for i = 0, 249 do d[#d + 1] = { 0x40000 + i * 0x400, 512, NEXT | (dir == "in" and WRITE or 0) } end
        d[#d + 1] = { BUF + 0x80, 1, WRITE }
        return d
      end
      vm:write(BUF, string.pack("<I4I4I8", 0, 0, 10))                      -- IN sectors 10..259
      q.submit(chain("in"))
      assert.equal(0, vm:u8(BUF + 0x80))
      assert.same({ 1, 0, 250 * 512 + 1 }, { q.used() })
      for i = 0, 249, 83 do
        assert.equal(string.char(65 + (10 + i) % 26):rep(512), vm:read(0x40000 + i * 0x400, 512))
      end
      for i = 0, 249 do vm:write(0x40000 + i * 0x400, string.char(97 + i % 26):rep(512)) end
      vm:write(BUF, string.pack("<I4I4I8", 1, 0, 20))                      -- OUT to sectors 20..269
      q.submit(chain("out"))
      assert.equal(0, vm:u8(BUF + 0x80))
      local data = support.slurp(path)
      for i = 0, 249, 50 do
        assert.equal(string.char(97 + i % 26):rep(512), data:sub((20 + i) * 512 + 1, (21 + i) * 512))
      end
      assert.equal(("T"):rep(512), data:sub(19 * 512 + 1, 20 * 512))      -- sector 19 untouched
      vm:close()
    end)
  end)

  describe("virtio-blk DISCARD and WRITE_ZEROES", function()
    local DISCARD, WRITE_ZEROES = 11, 13
    local F_DISCARD, F_WZ = 1 << 13, 1 << 14
    -- segments {sector, num_sectors, flags}
    local function segs(t)
      local b = {}
      for i, sg in ipairs(t) do b[i] = string.pack("<I8I4I4", sg[1], sg[2], sg[3] or 0) end
      return table.concat(b)
    end
    local function req(q, vm, typ, t, len)
      local data = segs(t)
      return blk_req(q, vm, typ, 0, len or #data, "out", data)
    end
    -- a writable disk on a file system that punches holes, the features negotiated
    local function disk(n, features)
      local vm = new_vm()
      local path = image(n)
      if not support.punches_holes(path) then
        vm:close()
        return pending("the file system of " .. path .. " punches no holes: DISCARD is not offered")
      end
      local dev = assert(vm:virtio_blk{ path = path })
      return vm, dev, driver(vm, dev, { features = features or (F_DISCARD | F_WZ) }), path
    end
    local function blocks(path) return tonumber(support.sh("stat -c %b '" .. path .. "'"):match("%d+")) end

    it("DISCARD punches the sectors out of the file: they read zero, the size stays, blocks are freed", function()
      support.need_kvm()
      local vm, dev, q, path = disk(64)
      if not vm then return end
      local before = blocks(path)
      assert.equal(0, req(q, vm, DISCARD, { { 8, 16 }, { 40, 1 } }))
      local data = support.slurp(path)
      assert.equal(64 * 512, #data)
      assert.equal(("\0"):rep(16 * 512), data:sub(8 * 512 + 1, 24 * 512))
      assert.equal(("\0"):rep(512), data:sub(40 * 512 + 1, 41 * 512))
      assert.equal(("H"):rep(512), data:sub(7 * 512 + 1, 8 * 512))                -- sector 7 untouched
      assert.equal(("Y"):rep(512), data:sub(24 * 512 + 1, 25 * 512))              -- and sector 24
      assert.is_true(blocks(path) < before, "no blocks freed")
      assert.equal(0, blk_req(q, vm, 0, 8, 512, "in"))                            -- the guest reads zeros
      assert.equal(("\0"):rep(512), vm:read(BUF + 0x100, 512))
      assert.equal(1, vm:stats().blk_discards)
      assert.is_nil(dev:info().error)
      vm:close()
    end)

    it("WRITE_ZEROES, with and without unmap: the sectors read zero", function()
      support.need_kvm()
      local vm, _, q, path = disk(16)
      if not vm then return end
      assert.equal(0, req(q, vm, WRITE_ZEROES, { { 1, 2 } }))
      assert.equal(0, req(q, vm, WRITE_ZEROES, { { 5, 1, 1 } }))                 -- unmap
      local data, first = support.slurp(path), {}
      for i = 0, 6 do first[i + 1] = data:sub(i * 512 + 1, i * 512 + 1) end
      assert.equal("A\0\0DE\0G", table.concat(first))
      assert.equal(("\0"):rep(1024), data:sub(513, 1536))
      assert.equal(("\0"):rep(512), data:sub(5 * 512 + 1, 6 * 512))
      assert.equal(2, vm:stats().blk_write_zeroes)
      vm:close()
    end)

    -- each: the request's segments (or raw data length), the status, and the file unchanged
    local CASES = {
      { "no segment", DISCARD, {}, 1 },
      { "a length not a multiple of 16", DISCARD, { { 0, 1 } }, 1, 12 },
      { "33 segments (max_discard_seg is 32)", DISCARD, (function()
          local t = {}
          for i = 1, 33 do t[i] = { i - 1, 1 } end
          return t
        end)(), 1 },
      { "a segment past the end", DISCARD, { { 0, 1 }, { 15, 2 } }, 1 },
      { "a segment at sector 2^64-1", DISCARD, { { -1, 1 } }, 1 },
      { "a segment longer than max_discard_sectors", DISCARD, { { 0, (1 << 22) + 1 } }, 1 },
      { "the unmap flag on a DISCARD", DISCARD, { { 0, 1, 1 } }, 2 },
      { "an unknown flag on a DISCARD", DISCARD, { { 0, 1, 4 } }, 2 },
      { "an unknown flag on a WRITE_ZEROES", WRITE_ZEROES, { { 0, 1, 2 } }, 2 },
      { "a segment past the end of a WRITE_ZEROES", WRITE_ZEROES, { { 0, 1 }, { 16, 1 } }, 1 },
    }
    for _, case in ipairs(CASES) do
      it(("%s: %s, nothing changed"):format(case[1], case[4] == 1 and "IOERR" or "UNSUPP"), function()
        support.need_kvm()
        local vm, dev, q, path = disk(16)
        if not vm then return end
        local before = support.slurp(path)
        assert.equal(case[4], req(q, vm, case[2], case[3], case[5]))
        assert.equal(before, support.slurp(path))
        assert.is_nil(dev:info().error)
        local s = vm:stats()
        assert.same({ 0, 0 }, { s.blk_discards, s.blk_write_zeroes })
        vm:close()
      end)
    end

    it("UNSUPP when the driver did not accept the feature; a read-only disk offers neither", function()
      support.need_kvm()
      local vm, _, q, path = disk(4, 0)
      if not vm then return end
      local before = support.slurp(path)
      assert.equal(2, req(q, vm, DISCARD, { { 0, 1 } }))
      assert.equal(2, req(q, vm, WRITE_ZEROES, { { 0, 1 } }))
      local ro = assert(vm:virtio_blk{ path = path, readonly = true })
      local q2 = driver(vm, ro, { features = 1 << 5 })
      assert.equal(2, req(q2, vm, DISCARD, { { 0, 1 } }))
      vm:close()
      assert.equal(before, support.slurp(path))
    end)

    it("raises on a discard option that is not a boolean", function()
      support.need_kvm()
      local vm = new_vm()
      assert.equal("vm:virtio_blk: 'discard' must be a boolean", support.merr(vm, "virtio_blk", { path = "x", discard = 1 }))
      vm:close()
    end)
  end)

  describe("virtio-rng", function()
    it("fills the writable buffers from getrandom", function()
      support.need_kvm()
      local vm = new_vm()
      local dev = vm:virtio_rng()
      local q = driver(vm, dev)
      vm:write(BUF, ("\0"):rep(64))
      q.submit{ { BUF, 32, NEXT | WRITE }, { BUF + 32, 32, WRITE } }
      assert.same({ 1, 0, 64 }, { q.used() })
      assert.not_equal(("\0"):rep(64), vm:read(BUF, 64))
      assert.equal(64, vm:stats().rng_bytes)
      vm:close()
    end)
  end)

  describe("virtio-console", function()
    -- queue 1 (transmit) of 8 at 0x13000/0x14000/0x15000; one chain of `text`
    local function transmit(vm, dev, text)
      w(dev, R.QSEL, 1); w(dev, R.QNUM, 8)
      w(dev, R.DESC, 0x13000); w(dev, R.DRIVER, 0x14000); w(dev, R.DEVICE, 0x15000)
      w(dev, R.QREADY, 1)
      vm:write(0x30000, text)
      vm:write(0x13000, string.pack("<I8I4I2I2", 0x30000, #text, 0, 0))
      vm:write(0x14000, string.pack("<I2I2I2", 0, 1, 0))
      w(dev, R.NOTIFY, 1)
      return vm:u16(0x15002)
    end

    it("hands what the guest transmits to the output when run() returns; input fills receive buffers", function()
      support.need_kvm()
      local got = {}
      local input = support.write_tmp("typed", tmp)
      local dev
      local vm, cpu = support.guest("\xf4", { setup = function(v)
        dev = v:virtio_console{ output = function(b) got[#got + 1] = b end, input = io.open(input, "rb") }
      end })
      assert.equal(3, r(dev, R.DEVICE_ID))
      local q = driver(vm, dev)                            -- queue 0: receive
      q.submit{ { BUF, 64, WRITE } }
      assert.same({ 1, 0, 5 }, { q.used() })
      assert.equal("typed", vm:read(BUF, 5))
      assert.equal(1, transmit(vm, dev, "hello hvc\n"))
      assert.equal("hlt", cpu:run{ timeout = 5 }.reason)
      assert.equal("hello hvc\n", table.concat(got))
      local s = vm:stats()
      assert.same({ 10, 5 }, { s.console_tx, s.console_rx })
      vm:close()
    end)

    it("leaves receive buffers in their queue while no input waits", function()
      support.need_kvm()
      local vm = new_vm()
      local dev = vm:virtio_console{ output = false }
      local q = driver(vm, dev)
      q.submit{ { BUF, 64, WRITE } }
      assert.equal(0, vm:u16(USED + 2))
      assert.equal(0, dev:info().queues[1].last_avail)
      assert.is_nil(dev:info().error)
      vm:close()
    end)

    it("raises on a bad output or input before claiming anything", function()
      support.need_kvm()
      local vm = new_vm()
      assert.equal("vm:virtio_console: 'output' must be a file, a function or false, got number",
        support.merr(vm, "virtio_console", { output = 1 }))
      assert.equal("vm:virtio_console: 'input' must be a file, got string",
        support.merr(vm, "virtio_console", { input = "x" }))
      assert.equal("vm:virtio_console: unknown option 'speed'", support.merr(vm, "virtio_console", { speed = 1 }))
      assert.same({}, vm:claims())
      vm:close()
    end)
  end)

  describe("a hostile driver gets DEVICE_NEEDS_RESET", function()
    -- each: a chain (or a queue set-up) that breaks a rule, and the message
    local CASES = {
      { "a buffer outside guest memory", { { RAM - 8, 16, WRITE } } },
      { "a buffer outside guest memory", { { -8, 16, WRITE } } },           -- wraps around
      { "a buffer outside guest memory", { { BUF, 0xffffffff, WRITE } } },  -- 4 GiB long
      { "a descriptor chain is longer than the queue (a loop?)", { { BUF, 1, NEXT, 0 } } },
      { "a descriptor chain is longer than the queue (a loop?)",
        { { BUF, 1, NEXT, 1 }, { BUF, 1, NEXT, 0 } } },
      { "a descriptor's next is past the queue", { { BUF, 1, NEXT, 8 } } },
      { "a descriptor's next is past the queue", { { BUF, 1, NEXT, 0xffff } } },
      { "an indirect descriptor (not offered)", { { BUF, 16, INDIRECT } } },
      { "a readable descriptor after a writable one", { { BUF, 1, NEXT | WRITE }, { BUF, 16, 0 } } },
      { "an avail ring entry past the queue", { { BUF, 1, WRITE } }, 8 },
      { "an avail ring entry past the queue", { { BUF, 1, WRITE } }, 0xffff },
      { "the avail index is more than a queue ahead", { { BUF, 1, WRITE } }, 0, 9 },
      { "the avail index is more than a queue ahead", { { BUF, 1, WRITE } }, 0, 0x8000 },
      { "a block request without a status byte", { { BUF, 16, 0 } } },
    }
    for _, case in ipairs(CASES) do
      it(case[1] .. (case[3] and (" (head " .. case[3] .. ")") or "")
         .. (case[4] and (" (avail idx " .. case[4] .. ")") or ""), function()
        support.need_kvm()
        local vm = new_vm()
        local dev = assert(vm:virtio_blk{ path = image(2) })
        local q = driver(vm, dev)
        vm:write(BUF, string.pack("<I4I4I8", 0, 0, 0))
        q.submit(case[2], case[3], case[4])
        local info = dev:info()
        assert.equal(case[1], info.error)
        assert.equal(NEEDS_RESET, info.status & NEEDS_RESET)
        assert.equal(2, r(dev, R.ISR) & 2)                 -- a configuration interrupt
        assert.equal(0, vm:u16(USED + 2))                  -- nothing used
        assert.equal(1, vm:stats().virtio_errors)
        -- no more requests until a reset; after it the device works again
        w(dev, R.NOTIFY, 0)
        assert.equal(0, vm:u16(USED + 2))
        local q2 = driver(vm, dev)
        assert.is_nil(dev:info().error)
        assert.equal(0, blk_req(q2, vm, 0, 0, 512, "in"))
        vm:close()
      end)
    end

    for _, case in ipairs{
      { "QueueNum is not a power of two up to QueueNumMax", { num = 3 } },
      { "QueueNum is not a power of two up to QueueNumMax", { num = 512 } },
      { "QueueNum is not a power of two up to QueueNumMax", { num = 0 } },
      { "a ring is misaligned", { desc = DESC + 8 } },
      { "a ring is misaligned", { used = USED + 2 } },
      { "a ring outside guest memory", { used = RAM - 16 } },
      { "a ring outside guest memory", { desc = 0xfffffffffff0 } },
    } do
      it(case[1] .. " at QueueReady", function()
        support.need_kvm()
        local vm = new_vm()
        local dev = assert(vm:virtio_blk{ path = image(1) })
        local ok, err = pcall(driver, vm, dev, case[2])
        assert.is_true(ok, err)
        assert.equal(case[1], dev:info().error)
        assert.is_false(dev:info().queues[1].ready)
        assert.equal(0, r(dev, R.QREADY))
        vm:close()
      end)
    end

    it("a ring that leaves guest memory after QueueReady (the memory closed)", function()
      support.need_kvm()
      local kvm = require "kvm"
      local vm = assert(kvm.vm())
      local low = assert(vm:memory{ guest = 0, size = 0x20000 })
      local high = assert(vm:memory{ guest = 0x100000, size = 0x10000 })
      local dev = assert(vm:virtio_rng())
      local q = driver(vm, dev, { used = 0x100000 })
      high:close()
      q.submit{ { BUF - 0x10000, 8, WRITE } }
      assert.equal("a ring outside guest memory", dev:info().error)
      low:close()
      vm:close()
    end)

    it("ring set-up registers are ignored while the queue is ready; QueueNum past max reads back", function()
      support.need_kvm()
      local vm = new_vm()
      local dev = assert(vm:virtio_blk{ path = image(1) })
      driver(vm, dev)
      w(dev, R.QNUM, 4); w(dev, R.DESC, 0x40000)
      assert.same({ 8, DESC }, { r(dev, R.QNUM), r(dev, R.DESC) })
      w(dev, R.NOTIFY, 7)                                   -- no such queue: ignored
      w(dev, R.QSEL, 5); w(dev, R.QREADY, 1)                -- nor that one
      assert.is_nil(dev:info().error)
      vm:close()
    end)
  end)

  describe("vm:virtio_blk and vm:virtio_rng arguments", function()
    it("returns fail, message, errno for a file that does not open, and claims nothing", function()
      support.need_kvm()
      local vm = new_vm()
      local d, msg, en = vm:virtio_blk{ path = "/nonexistent/disk.img" }
      assert.same({ nil, "open /nonexistent/disk.img: No such file or directory", 2 }, { d, msg, en })
      assert.same({}, vm:claims())
      vm:close()
    end)

    for _, case in ipairs{
      { {}, "vm:virtio_blk: 'path' (a string) is required" },
      { { path = "x", bogus = 1 }, "vm:virtio_blk: unknown option 'bogus'" },
      { { path = "x", readonly = 1 }, "vm:virtio_blk: 'readonly' must be a boolean" },
      { { path = "x", serial = ("s"):rep(21) }, "vm:virtio_blk: 'serial' is at most 20 bytes" },
      { { path = "x", irq = 24 }, "vm:virtio_blk: 'irq' must be an integer in 0..23, got 24" },
      { { path = "x", base = 0x1100 }, "vm:virtio_blk: 'base' must be 0x200-aligned" },
      { { path = "x", base = -512 }, "vm:virtio_blk: 'base' must be an integer in 0..0xfffffffffe00, got -512" },
    } do
      it("raises " .. case[2], function()
        support.need_kvm()
        local vm = new_vm()
        assert.equal(case[2], support.merr(vm, "virtio_blk", case[1]))
        vm:close()
      end)
    end

    it("raises on a taken range and on a closed device", function()
      support.need_kvm()
      local vm = new_vm()
      local dev = vm:virtio_rng{ base = 0x40000000 }
      assert.equal("vm:virtio_rng: address 0x40000000 already claimed by 0x40000000-0x400001ff",
        support.merr(vm, "virtio_rng", { base = 0x40000000 }))
      assert.equal("bad argument #1 to 'read' (offset outside the device's 0x200 bytes)",
        support.merr(dev, "read", 0x1fe, 4))
      assert.equal("bad argument #2 to 'write' (size must be 1, 2, 4 or 8)",
        support.merr(dev, "write", 0, 3, 0))
      vm:close()
      assert.equal("attempt to use a closed kvm.virtio", support.merr(dev, "read", 0, 4))
      assert.equal("kvm.virtio virtio-rng (closed)", tostring(dev))
    end)
  end)
end)
