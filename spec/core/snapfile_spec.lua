--- Snapshot files (csrc/snapfile.c): snap:save(path), kvm.load_snapshot(path),
-- snap.meta. Files are built by hand (spec/snapfile_build.lua, the format
-- written out with string.pack): a good one loads and saves back to the
-- same bytes; truncated, bit-flipped, lying, other-version and other-CPU
-- ones are refused with fail, an exact message and an errno, never an
-- error raised and never a snapshot object; saving writes PATH.tmp and
-- renames it, so a failed save leaves nothing behind.
local support = require "support"
local build = require "snapfile_build"

local EINVAL, ENOENT, EISDIR, EACCES, ENOTSUP = 22, 2, 21, 13, 95

describe("snapshot files", function()
  local kvm = require "kvm"
  local tmpfiles = {}

  local function write_tmp(bytes) return support.write_tmp(bytes, tmpfiles) end

  local function tmpname()
    local p = os.tmpname()
    tmpfiles[#tmpfiles + 1] = p
    tmpfiles[#tmpfiles + 1] = p .. ".tmp"
    return p
  end

  after_each(function()
    for _, p in ipairs(tmpfiles) do os.remove(p) end
    tmpfiles = {}
    support.gc()
  end)

  -- the good file: the VM's part, two vCPUs (this host's supported CPUID),
  -- a device, meta, a 64 KiB region (16 pages: a bitmap word in part) with
  -- three pages stored and a 1 MiB one (4 words) with one
  local function good(t)
    t = t or {}
    local f = {
      parts = t.parts or { { kind = build.KIND.vm, data = build.record(1, ("p"):rep(520)) },
                           build.vcpu(0), build.vcpu(1),
                           { kind = build.KIND.device, id = 2, name = "uart", addr = 0x3f8, data = "\1\0\0\0state" } },
      meta = t.meta == nil and "booted" or t.meta or nil,
      mem = t.mem or { { slot = 0, size = 0x10000, pages = { [0] = "first", [5] = "five", [15] = "last" } },
                       { slot = 1, guest = 0x100000, size = 0x100000, pages = { [64] = "x" } } },
    }
    for k, v in pairs(t) do if f[k] == nil then f[k] = v end end
    return build.file(f)
  end

  -- what the sections of good() are called in messages
  local GOOD_DESC = { "vm", "vcpu 0", "vcpu 1", "device 'uart' 2", "meta", "memory", "memory", "END" }

  --- kvm.load_snapshot on bytes must give fail, "snapshot file PATH: want", errno
  local function refused(bytes, want, errno)
    support.need_kvm()
    local path = write_tmp(bytes)
    local r = table.pack(pcall(kvm.load_snapshot, path))
    assert.is_true(r[1], "load_snapshot raised: " .. tostring(r[2]))
    assert.is_nil(r[2], "a bad file was accepted")
    assert.equal("snapshot file " .. path .. ": " .. want, r[3])
    assert.equal(errno or EINVAL, r[4])
    assert.equal(4, r.n)
  end

  local function poke(s, off, fmt, ...)
    local v = string.pack(fmt, ...)
    return s:sub(1, off) .. v .. s:sub(off + #v + 1)
  end

  local function flip(s, off, bit)
    return s:sub(1, off) .. string.char(s:byte(off + 1) ~ (1 << (bit or 0))) .. s:sub(off + 2)
  end

  describe("a good file", function()
    it("loads and saves back to the same bytes", function()
      support.need_kvm()
      local bytes = good()
      local snap = assert(kvm.load_snapshot(write_tmp(bytes)))
      assert.equal("kvm.snapshot (2 vCPUs, 2 memory regions, 1 MiB)", tostring(snap))
      assert.equal("booted", snap.meta)
      local out = tmpname()
      assert.equal(true, snap:save(out))
      assert.equal(bytes, support.slurp(out))
      assert.is_false(support.exists(out .. ".tmp"))
    end)

    it("without meta has no meta section, and snap.meta is nil", function()
      support.need_kvm()
      local bytes = good{ meta = false }
      local snap = assert(kvm.load_snapshot(write_tmp(bytes)))
      assert.is_nil(snap.meta)
      local out = tmpname()
      assert(snap:save(out))
      assert.equal(bytes, support.slurp(out))
    end)

    it("keeps every byte of the stored pages and nothing of the zero ones", function()
      support.need_kvm()
      local page = {}
      for i = 0, 4095 do page[i + 1] = string.char((i * 7 + 3) % 256) end
      page = table.concat(page)
      local bytes = good{ mem = { { size = 64 * 4096 * 2 + 4096, pages = { [0] = page, [63] = page, [64] = page,
                                                                          [128] = page:reverse() } } } }
      -- 4 pages stored of 129, a 3-word bitmap: the file holds 4 pages, no more
      local snap = assert(kvm.load_snapshot(write_tmp(bytes)))
      local out = tmpname()
      assert(snap:save(out))
      assert.equal(bytes, support.slurp(out))
      assert.is_true(#bytes < 6 * 4096 + 10000)
    end)

    it("snap.meta: set, replaced, cleared, saved with the snapshot", function()
      support.need_kvm()
      local snap = assert(kvm.load_snapshot(write_tmp(good{ meta = false })))
      snap.meta = "first"
      assert.equal("first", snap.meta)
      snap.meta = "with\0a zero byte"
      assert.equal("with\0a zero byte", snap.meta)
      local out = tmpname()
      assert(snap:save(out))
      assert.equal(good{ meta = "with\0a zero byte" }, support.slurp(out))
      local again = assert(kvm.load_snapshot(out))
      assert.equal("with\0a zero byte", again.meta)
      snap.meta = ""
      assert.equal("", snap.meta)
      assert(snap:save(out))
      assert.equal(good{ meta = "" }, support.slurp(out))
      snap.meta = nil
      assert.is_nil(snap.meta)
      assert(snap:save(out))
      assert.equal(good{ meta = false }, support.slurp(out))
    end)

    it("saving over a file replaces it whole", function()
      support.need_kvm()
      local out = tmpname()
      local f = assert(io.open(out, "wb"))
      f:write(("old"):rep(100000))
      f:close()
      local snap = assert(kvm.load_snapshot(write_tmp(good())))
      assert(snap:save(out))
      assert.equal(good(), support.slurp(out))
      assert.is_false(support.exists(out .. ".tmp"))
    end)

    it("a snapshot with nothing in it", function()
      support.need_kvm()
      local bytes = good{ parts = {}, mem = {}, meta = false }
      assert.equal(96 + 64, #bytes)
      local snap = assert(kvm.load_snapshot(write_tmp(bytes)))
      assert.equal("kvm.snapshot (0 vCPUs, 0 memory regions, 0 MiB)", tostring(snap))
      local out = tmpname()
      assert(snap:save(out))
      assert.equal(bytes, support.slurp(out))
    end)
  end)

  describe("refuses", function()
    it("an empty file, a folder, a missing file", function()
      support.need_kvm()
      refused("", "empty")
      support.need_kvm()
      local dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir " .. dir))
      local ok, msg, en = kvm.load_snapshot(dir)
      os.remove(dir)
      assert.is_nil(ok)
      assert.equal("snapshot file " .. dir .. ": Is a directory", msg)
      assert.equal(EISDIR, en)
      ok, msg, en = kvm.load_snapshot(dir .. "/none")
      assert.is_nil(ok)
      assert.equal("snapshot file " .. dir .. "/none: No such file or directory", msg)
      assert.equal(ENOENT, en)
      -- a FIFO with no writer: refused at once, not waited on
      local fifo = tmpname()
      os.remove(fifo)
      assert(os.execute("mkfifo " .. fifo))
      ok, msg, en = kvm.load_snapshot(fifo)
      assert.is_nil(ok)
      assert.equal("snapshot file " .. fifo .. ": not a regular file", msg)
      assert.equal(EINVAL, en)
    end)

    it("another file, another version, a header cut short", function()

      support.need_kvm()
      local bytes = good()
      refused("NOTASNAP" .. bytes:sub(9), 'not a luakvm snapshot (no "LKVMSNAP" at its start)')
      refused("LKVM", 'not a luakvm snapshot (no "LKVMSNAP" at its start)')
      refused(("\0"):rep(4096), 'not a luakvm snapshot (no "LKVMSNAP" at its start)')
      refused(poke(bytes, 8, "<I4", 2), "format version 2, this luakvm reads 1")
      refused(poke(bytes, 8, "<I4", 0), "format version 0, this luakvm reads 1")
      refused(good{ version = 2 }, "format version 2, this luakvm reads 1")
      -- a version 2 file's header may be anything after its version
      refused(good{ version = 2 }:sub(1, 12), "format version 2, this luakvm reads 1")
      refused(bytes:sub(1, 10), "truncated in its header (10 bytes of 96)")
      refused(bytes:sub(1, 50), "truncated in its header (50 bytes of 96)")
      refused(bytes:sub(1, 95), "truncated in its header (95 bytes of 96)")
    end)

    it("a file truncated at every section boundary", function()

      support.need_kvm()
      local bytes, at = good()
      for k, off in ipairs(at) do
        refused(bytes:sub(1, off), ("truncated at section %d (%d of %d bytes)"):format(k, off, #bytes))
      end
    end)

    it("a file truncated inside each section's header and its payload", function()

      support.need_kvm()
      local bytes, at = good()
      for k, off in ipairs(at) do
        refused(bytes:sub(1, off + 10), ("truncated at section %d (%d of %d bytes)"):format(k, off + 10, #bytes))
        local len = string.unpack("<I8", bytes, off + 48 + 1)
        if len > 0 then
          refused(bytes:sub(1, off + 64 + len - 1),
                  ("truncated at section %d (%s): %d bytes, %d left in the file"):format(k, GOOD_DESC[k], len, len - 1))
        end
      end
    end)

    it("a bit flipped in the header, a section's header, a payload, a bitmap, a page", function()

      support.need_kvm()
      local bytes, at = good()
      refused(flip(bytes, 41), "bad checksum in the header")              -- the vendor
      refused(flip(bytes, 24, 3), "bad checksum in the header")           -- the file length
      refused(flip(bytes, 16), "bad checksum in the header")              -- the flags
      refused(flip(bytes, 21), "bad checksum in the header")              -- the CRC itself
      for k, off in ipairs(at) do
        refused(flip(bytes, off + 48, 2), ("bad checksum in the header of section %d"):format(k))
        refused(flip(bytes, off + 63, 7), ("bad checksum in the header of section %d"):format(k))
      end
      refused(flip(bytes, at[1] + 64 + 100), "bad checksum in section 1 (vm)")
      refused(flip(bytes, at[3] + 64 + 200), "bad checksum in section 3 (vcpu 1)")
      refused(flip(bytes, at[4] + 64 + 6), "bad checksum in section 4 (device 'uart' 2)")
      refused(flip(bytes, at[5] + 64), "bad checksum in section 5 (meta)")
      -- memory: the head's slot, a page (the second stored of slot 0), a
      -- bitmap bit that does not change the count (two flips)
      -- (a flip that leaves the head valid: guest + 2^40; one that does not
      -- is refused for what it says, below)
      refused(flip(bytes, at[6] + 64 + 8 + 5), "bad checksum in section 6 (memory slot 0)")
      refused(flip(bytes, at[6] + 64 + 32 + 8 + 4096 + 3000, 5), "bad checksum in section 6 (memory slot 0)")
      refused(flip(flip(bytes, at[7] + 64 + 32 + 8, 0), at[7] + 64 + 32 + 8, 1),
              "bad checksum in section 7 (memory slot 1)")
      -- a flip that changes the bitmap's count is caught before the CRC
      refused(flip(bytes, at[6] + 64 + 32, 1), "section 6 (memory slot 0): its bitmap has 4 pages, its head says 3")
    end)

    it("every byte of a small file changed", function()
      support.need_kvm()
      local bytes = good{ parts = { build.vcpu(0, { { func = 0, index = 0, eax = 1, ebx = 0x68747541,
                                                      ecx = 0x444d4163, edx = 0x69746e65 } }) },
                          mem = { { size = 0x4000, pages = { [1] = "x" } } } }
      local path = write_tmp(bytes)
      assert(kvm.load_snapshot(path))
      local f = assert(io.open(path, "r+b"))
      for off = 0, #bytes - 1 do
        f:seek("set", off)
        f:write(string.char(bytes:byte(off + 1) ~ (1 << (off % 8))))
        f:flush()
        local snap, msg, en = kvm.load_snapshot(path)
        assert.is_nil(snap, "a change at byte " .. off .. " went unseen")
        assert.matches("^snapshot file " .. path:gsub("%p", "%%%0") .. ": ", msg)
        assert.equal(EINVAL, en)
        f:seek("set", off)
        f:write(bytes:sub(off + 1, off + 1))
      end
      f:close()
      assert(kvm.load_snapshot(path))
    end)

    it("lengths and counts that lie, every checksum right", function()

      support.need_kvm()
      local B = build.KIND
      local vm = { kind = B.vm, data = build.record(1, "x") }
      local function parts(p) return good{ parts = p, meta = false, mem = {} } end
      refused(parts{ vm, { kind = B.vcpu, data = "", len = 1 << 40 } },
              "section 2 (vcpu 0): 1099511627776 bytes, 64 left in the file")
      refused(parts{ vm, { kind = B.device, name = ("n"):rep(32), data = "" } },
              "section 2: its name is not NUL-terminated")
      refused(parts{ vm, { kind = 9, data = "" } }, "section 2: unknown kind 9")
      refused(parts{ { kind = B.vm, name = "vm", data = "" } },
              "section 1 (vm): only a device has a name and an address")
      refused(parts{ { kind = B.vcpu, addr = 1, data = "" } },
              "section 1 (vcpu 0): only a device has a name and an address")
      refused(parts{ { kind = B.vcpu, data = build.record(2, "abc"):sub(1, -2) } },
              "section 1 (vcpu 0): its records run past its end")
      refused(parts{ { kind = B.vcpu, data = build.record(build.R_CPUID, ("c"):rep(41)) } },
              "section 1 (vcpu 0): its records run past its end")
      refused(parts{ { kind = B.vm, data = "\1\0\0" } }, "section 1 (vm): its records run past its end")
      -- memory
      local function mem(m)
        local t = { slot = 0, size = 0x10000, pages = { [1] = "a" } }
        for k, v in pairs(m) do t[k] = v end
        return good{ parts = { vm }, meta = false, mem = { t } }
      end
      refused(mem{ slot = 32 }, "section 2 (memory): slot 32 (0..31)")
      refused(mem{ flags = 4 }, "section 2 (memory slot 0): unknown flags 0x4")
      refused(mem{ size = 0x10001 }, "section 2 (memory slot 0): a region of 0x10001 bytes at 0x0 "
              .. "(page-aligned, at most 2^46 bytes, below 2^52)")
      refused(mem{ guest = 0x800 }, "section 2 (memory slot 0): a region of 0x10000 bytes at 0x800 "
              .. "(page-aligned, at most 2^46 bytes, below 2^52)")
      refused(mem{ guest = (1 << 52) - 0x1000 }, "section 2 (memory slot 0): a region of 0x10000 bytes at "
              .. "0xffffffffff000 (page-aligned, at most 2^46 bytes, below 2^52)")
      refused(mem{ size = 1 << 47, bitmap = string.pack("<I8", 2) }, "section 2 (memory slot 0): a region of 0x800000000000 bytes at 0x0 "
              .. "(page-aligned, at most 2^46 bytes, below 2^52)")
      -- a 64 TiB region wants a 2 GiB bitmap the file does not have
      refused(mem{ size = 1 << 46, bitmap = string.pack("<I8", 2) }, "section 2 (memory slot 0): 4136 bytes do not hold a 17179869184-page "
              .. "bitmap and 1 pages")
      refused(mem{ stored = 2 }, "section 2 (memory slot 0): 4136 bytes do not hold a 16-page bitmap and 2 pages")
      refused(mem{ stored = 2, data = ("\1"):rep(8192) },
              "section 2 (memory slot 0): its bitmap has 1 pages, its head says 2")
      refused(mem{ size = 0x8000, bitmap = string.pack("<I8", 1 << 9) },
              "section 2 (memory slot 0): its bitmap marks pages past the region's end")
      refused(mem{ size = 0 }, "section 2 (memory slot 0): a region of 0x0 bytes at 0x0 "
              .. "(page-aligned, at most 2^46 bytes, below 2^52)")
      refused(good{ parts = {}, meta = false, mem = { { size = 0x10000 }, { slot = 1, guest = 0xf000, size = 0x1000 } } },
              "section 2 (memory slot 1): overlaps slot 0")
      refused(good{ parts = {}, meta = false, mem = { { size = 0x10000 }, { guest = 0x10000, size = 0x1000 } } },
              "section 2 (memory slot 0): a second region in that slot")
      -- the header and END
      refused(good{ sections = 9 }, "section 8 (END): the header says there are 9 sections, there were 7")
      refused(good{ sections = 6 }, "section 7 (memory): the header says there are 6")
      refused(good{ sections = 0xffffffff }, "4294967295 sections, more than a snapshot has (1048609)")
      refused(good{ end_id = 3 }, "section 8 (END): it counts 3 sections before it, there were 7")
      refused(good() .. "junk", "4 bytes after the END section")
      local bytes = good()
      refused(good{ file_len = #bytes + 64 }, ("the header says the file has %d bytes, it has %d"):format(#bytes + 64, #bytes))
      refused(good{ file_len = #bytes - 1 }, ("the header says the file has %d bytes, it has %d"):format(#bytes - 1, #bytes))
      refused(good{ flags = 1 }, "unknown flags 0x1")
      refused(good{ hdr_len = 128 }, "a header of 128 bytes, version 1's has 96")
      local _, at = good{ parts = {}, mem = {}, meta = "a" }
      refused(good{ parts = {}, mem = {}, meta = "a", file_len = at.END }:sub(1, at.END),
              "no END section: the file ends at section 2")
    end)

    it("a second meta section", function()

      support.need_kvm()
      local B = build.KIND
      refused(good{ parts = { { kind = B.meta, data = "one" } }, meta = "two", mem = {} },
              "section 2: a second meta section")
      refused(good{ parts = { { kind = B.meta, id = 1, data = "one" } }, meta = false, mem = {} },
              "section 1 (meta): only a device has a name and an address")
    end)

    it("a part larger than 64 MiB (a sparse file)", function()
      support.need_kvm()
      local big = 65 << 20
      local bytes = good{ parts = { { kind = build.KIND.device, name = "big", data = "", len = big } },
                          meta = false, mem = {}, file_len = 96 + 64 + big + 64 }
      -- the header and the part's header, a hole of `big` bytes, END
      local path = write_tmp(bytes:sub(1, 96 + 64))
      local f = assert(io.open(path, "r+b"))
      f:seek("set", 96 + 64 + big)
      f:write(bytes:sub(96 + 64 + 1))
      f:close()
      local ok, msg, en = kvm.load_snapshot(path)
      assert.is_nil(ok)
      assert.equal("snapshot file " .. path .. ": section 1 (device 'big' 0): 68157440 bytes, more than a "
                   .. "part holds (64 MiB)", msg)
      assert.equal(EINVAL, en)
    end)

    it("a file from another CPU vendor", function()
      support.need_kvm()
      local vendor = build.host()
      local other = vendor == "AuthenticAMD" and "GenuineIntel" or "AuthenticAMD"
      refused(good{ vendor = other }, ('saved on a host whose CPU is "%s", this one\'s is "%s": a guest does '
              .. "not move between CPU vendors"):format(other, vendor), ENOTSUP)
    end)

    it("vCPUs given CPU features this host's KVM does not have", function()
      support.need_kvm()
      local _, _, entries = build.host()
      local function with(changes)
        local t = {}
        for i, e in ipairs(entries) do
          t[i] = {}
          for k, v in pairs(e) do t[i][k] = v end
        end
        for _, c in ipairs(changes) do
          local e = build.find(t, c[1], c[2])
          e[c[3]] = e[c[3]] | (1 << c[4])
        end
        return t
      end
      -- reserved bits no KVM reports: CPUID.1:ECX[16], CPUID.7.0:EDX[0]
      refused(good{ parts = { build.vcpu(0), build.vcpu(1, with{ { 1, 0, "ecx", 16 }, { 7, 0, "edx", 0 } }) } },
              "vCPU 1 needs CPU features this host's KVM lacks: CPUID 0x1.0 ECX bit 16, CPUID 0x7.0 EDX bit 0",
              ENOTSUP)
      -- what a VMM or the guest's CR4 sets is not asked of the host: the
      -- hypervisor bit, OSXSAVE, OSPKE, HTT
      local ok = kvm.load_snapshot(write_tmp(good{ parts = { build.vcpu(0, with{ { 1, 0, "ecx", 31 }, { 1, 0, "ecx", 27 },
                                                                  { 7, 0, "ecx", 4 }, { 1, 0, "edx", 28 } }) } }))
      assert.is_not_nil(ok)
      -- TSC-deadline: the host's KVM has it as a capability (or in its CPUID)
      local tsc = kvm.check_extension("tsc_deadline_timer") > 0 or (build.find(entries, 1, 0).ecx >> 24) & 1 == 1
      local snap, msg = kvm.load_snapshot(write_tmp(good{ parts = { build.vcpu(0, with{ { 1, 0, "ecx", 24 } }) } }))
      if tsc then
        assert.is_not_nil(snap, msg)
      else
        assert.matches("CPUID 0x1.0 ECX bit 24 (tsc_deadline_timer)", msg, 1, true)
      end
    end)

    it("and leaves no file descriptor open", function()
      support.need_kvm()
      local bytes, at = good()
      support.gc()
      local before = support.fd_count()
      for _ = 1, 3 do
        kvm.load_snapshot(write_tmp(bytes:sub(1, at[4] + 70)))
        kvm.load_snapshot(write_tmp(flip(bytes, at[6] + 200)))
        kvm.load_snapshot("/nonexistent/snap")
        kvm.load_snapshot(write_tmp(good{ vendor = "OtherVendor!" }))
      end
      support.gc()
      assert.equal(before, support.fd_count())
    end)
  end)

  describe("of a running VM (vm:snapshot)", function()
    local core = require "kvm.core"
    -- real mode at 0x1000: count in memory at 0x5000 and tell port 0x10
    local COUNT = "\xff\x06\x00\x50"   -- inc word [0x5000]
               .. "\xa1\x00\x50"       -- mov ax, [0x5000]
               .. "\xe7\x10"           -- out 0x10, ax
               .. "\xeb\xf5"           -- jmp 0x1000

    local function counter(stop_at)
      local vm, cpu, ram = support.guest(COUNT)
      local t = { seen = {}, stop_at = stop_at }
      vm:on_io(0x10, function(_, _, _, v)
        t.seen[#t.seen + 1] = v
        if v >= t.stop_at then return core.STOP end
      end)
      return vm, cpu, ram, t
    end

    --- the offsets of the sections of a file's bytes, and its END's
    local function sections(bytes)
      local at, off = {}, build.HDR_LEN
      while off < #bytes do
        at[#at + 1] = off
        off = off + build.SEC_LEN + string.unpack("<I8", bytes, off + 48 + 1)
      end
      return at
    end

    it("saves, loads the same parts, memory and meta, and saves back the same bytes", function()
      support.need_kvm()
      local vm, cpu = counter(100)
      assert.equal("stopped", cpu:run().reason)
      local snap = assert(vm:snapshot())
      snap.meta = "counted to 100"
      local a, b = tmpname(), tmpname()
      assert.equal(true, snap:save(a))
      local again = assert(kvm.load_snapshot(a))
      assert.same(snap:parts(), again:parts())
      assert.same(snap:memory(), again:memory())
      assert.equal("counted to 100", again.meta)
      assert.equal(tostring(snap), tostring(again))
      assert(again:save(b))
      assert.equal(support.slurp(a), support.slurp(b))
      -- zero pages are not in the file: the guest uses a few pages of 2 MiB
      local pages = snap:memory()[1].pages
      assert.is_true(pages >= 2 and pages < 10, pages)
      local bytes = support.slurp(a)
      local at = sections(bytes)
      local mem = at[#at - 1]
      assert.equal(build.KIND.memory, string.unpack("<I4", bytes, mem + 1))
      assert.equal(32 + (support.RAM // 4096 // 64) * 8 + pages * 4096, string.unpack("<I8", bytes, mem + 48 + 1))
      vm:close()
    end)

    it("restores into a fresh VM in another process, which counts on", function()
      support.need_kvm()
      local path = tmpname()
      local code, out = support.child(([[
        local support = require "support"
        local kvm = require "kvm.core"
        local vm, cpu = support.guest(%q)
        vm:on_io(0x10, function(_, _, _, v) if v >= 100 then return kvm.STOP end end)
        assert(cpu:run().reason == "stopped")
        local snap = assert(vm:snapshot())
        snap.meta = "from the child"
        assert(snap:save(%q))
        print(tostring(snap))
      ]]):format(COUNT, path))
      assert.equal(0, code, out)
      assert.equal("kvm.snapshot (1 vCPUs, 1 memory regions, 2 MiB)\n", out)
      local snap = assert(kvm.load_snapshot(path))
      assert.equal("from the child", snap.meta)
      local vm, cpu, ram, t = counter(103)
      assert.equal(0, ram:u16(0x5000))
      assert.is_true((vm:restore(snap)))
      assert.equal(100, ram:u16(0x5000))
      assert.equal(100, cpu:regs().rax & 0xffff)
      assert.equal("stopped", cpu:run().reason)
      assert.same({ 101, 102, 103 }, t.seen)
      vm:close()
    end)

    it("a real file cut at every section and bit-flipped in each: refused, the VM left as it was", function()
      support.need_kvm()
      local vm, cpu, ram = counter(50)
      assert.equal("stopped", cpu:run().reason)
      local path = tmpname()
      assert(assert(vm:snapshot()):save(path))
      local bytes = support.slurp(path)
      local at = sections(bytes)
      local regs, mem = cpu:regs(), ram:read(0, support.RAM)
      for k, off in ipairs(at) do
        refused(bytes:sub(1, off), ("truncated at section %d (%d of %d bytes)"):format(k, off, #bytes))
        local len = string.unpack("<I8", bytes, off + 48 + 1)
        local kind, id = string.unpack("<I4I4", bytes, off + 1)
        local name = string.unpack("z", bytes, off + 8 + 1)
        local desc = ({ "vm", "vcpu " .. id, ("device '%s' %d"):format(name, id) })[kind]
                     or ({ [16] = "memory", [17] = "meta" })[kind]
        if len > 0 then
          refused(bytes:sub(1, off + 64 + len // 2),
                  ("truncated at section %d (%s): %d bytes, %d left in the file"):format(k, desc, len, len // 2))
          local sdesc = kind == 16 and "memory slot " .. string.unpack("<I4", bytes, off + 64 + 1) or desc
          -- the payload's last byte: a record's, a device's, a memory page's
          refused(flip(bytes, off + 64 + len - 1), ("bad checksum in section %d (%s)"):format(k, sdesc))
        end
        refused(flip(bytes, off + 4), ("bad checksum in the header of section %d"):format(k))
      end
      assert.same(regs, cpu:regs())
      assert.is_true(mem == ram:read(0, support.RAM))
      vm:close()
    end)
  end)

  describe("saving", function()
    local function snap()
      return assert(kvm.load_snapshot(write_tmp(good())))
    end

    it("to a missing folder, an unwritable one, over a folder: fail, and no PATH.tmp left", function()
      support.need_kvm()
      local s = snap()
      local ok, msg, en = s:save("/nonexistent-folder/x.snap")
      assert.is_nil(ok)
      assert.equal("snapshot file /nonexistent-folder/x.snap: open /nonexistent-folder/x.snap.tmp: "
                   .. "No such file or directory", msg)
      assert.equal(ENOENT, en)
      ok, msg, en = s:save("/sys/x.snap")
      assert.is_nil(ok)
      assert.equal("snapshot file /sys/x.snap: open /sys/x.snap.tmp: Permission denied", msg)
      assert.equal(EACCES, en)
      local dir = tmpname()
      os.remove(dir)
      assert(os.execute("mkdir " .. dir))
      ok, msg, en = s:save(dir)
      assert.is_true(os.remove(dir))
      assert.is_nil(ok)
      assert.equal(("snapshot file %s: rename %s.tmp to %s: Is a directory"):format(dir, dir, dir), msg)
      assert.equal(EISDIR, en)
      assert.is_false(support.exists(dir .. ".tmp"))
    end)

    it("raises for bad arguments only", function()
      support.need_kvm()
      local s = snap()
      assert.equal("bad argument #1 to 'load_snapshot' (string expected, got no value)",
                   support.err(function() kvm.load_snapshot() end))
      assert.equal("bad argument #1 to 'save' (string expected, got no value)", support.merr(s, "save"))
      assert.equal("bad argument #1 to 'save' (string expected, got table)", support.merr(s, "save", {}))
      assert.equal("bad argument #1 to 'save' (kvm.snapshot expected, got table)",
                   support.err(function() s.save({}, "x") end))
      assert.equal("kvm.snapshot: meta must be a string or nil, not a number",
                   support.err(function() s.meta = 1 end))
      assert.equal("kvm.snapshot: no field 'other' to set (only 'meta')",
                   support.err(function() s.other = 1 end))
      assert.is_nil(s.other)
      assert.equal("booted", s.meta)
    end)
  end)
end)
